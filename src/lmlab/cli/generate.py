"""`lmlab generate` and `lmlab chat`: every sampling knob, streaming, stats on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.text import Text

from lmlab.cli.common import err, load_model, out, print_json, print_stats, quant_opt, write_text
from lmlab.errors import LmlabError

DEFAULT_MODEL = "smollm2-135m"


def sampling_kwargs(
    temperature,
    top_k,
    top_p,
    min_p,
    typical_p,
    repetition_penalty,
    frequency_penalty,
    presence_penalty,
    no_repeat_ngram,
    seed,
    n,
) -> dict:
    return dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        no_repeat_ngram_size=no_repeat_ngram,
        seed=seed,
        n=n,
    )


def prob_style(p: float) -> str:
    """Colour of a token by its probability: green (sure) through yellow to red (surprising)."""
    if p >= 0.8:
        return "bold green"
    if p >= 0.5:
        return "green"
    if p >= 0.2:
        return "yellow"
    if p >= 0.05:
        return "dark_orange"
    return "bold red"


def stats_parts(timings: dict, load_s: float | None = None) -> list[str]:
    """The figures of the stats line. With no decode step (one token generated) the decode rate is '–'."""
    parts = []
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    parts += [
        f"prompt {timings.get('prompt_tokens', 0)} tok"
        + (f" ({timings['cached_prompt_tokens']} cached)" if timings.get("cached_prompt_tokens") else ""),
        f"generated {timings.get('generated_tokens', 0)} tok",
        f"TTFT {timings.get('ttft_ms', 0):.0f} ms",
        f"prefill {timings.get('prefill_tok_s', 0):.0f} tok/s",
        f"decode {timings['decode_tok_s']:.1f} tok/s" if timings.get("decode_tok_s") else "decode – tok/s",
        f"peak mem {timings.get('peak_memory_bytes', 0) / 2**20:.0f} MiB",
    ]
    return parts


def format_stats(timings: dict, load_s: float | None = None) -> str:
    return " · ".join(stats_parts(timings, load_s))


def _read_prompts(path: Path) -> list[str]:
    if path.is_dir():
        raise LmlabError(f"--prompts {path} is a folder; pass a text file with one prompt per line.")
    if not path.is_file():
        raise LmlabError(f"prompts file {path} does not exist; pass a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LmlabError(f"prompts file {path} is not UTF-8 text; pass a text file with one prompt per line.") from None
    except OSError as e:
        raise LmlabError(
            f"could not read prompts file {path} ({e.strerror or e}); pass a readable text file."
        ) from None
    if "\x00" in text:
        raise LmlabError(f"prompts file {path} is binary, not text; pass a text file with one prompt per line.")
    prompts = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LmlabError(f"prompts file {path} has no prompts; put one prompt per line.")
    return prompts


def generate(
    prompt: list[str] = typer.Argument(
        None, metavar="PROMPT", help="The prompt, in quotes (omit with --prompts FILE).", show_default=False
    ),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="Model name, path or hub id."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-t", help="Tokens to generate per sequence."),
    temperature: float = typer.Option(0.7, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus: keep the smallest set with this mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    typical_p: float = typer.Option(1.0, "--typical-p", help="Locally typical sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty"),
    no_repeat_ngram: int = typer.Option(0, "--no-repeat-ngram", help="Never repeat an n-gram of this size."),
    seed: int = typer.Option(None, help="Same seed, same output."),
    n: int = typer.Option(1, "-n", help="Samples per prompt."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Do not stop at the end-of-sequence token: run to --max-new-tokens."
    ),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Stream tokens (default on a terminal)."),
    show_probs: bool = typer.Option(False, "--show-probs", help="Colour each token by its probability."),
    alternatives: int = typer.Option(0, "--alternatives", help="Show the top K alternatives of each token."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    prompts_file: Path = typer.Option(None, "--prompts", help="File with one prompt per line, run as one batch."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    fake_chat: bool = typer.Option(
        False, "--fake-chat", help="Prompt a base model as an assistant (a transcript it continues)."
    ),
    few_shot: Path = typer.Option(None, "--few-shot", help="Text file of examples to put before the prompt."),
    truncate: str = typer.Option(None, "--truncate", help="'left': keep the end of a prompt longer than the context."),
    dtype: str = typer.Option(
        None, help="float32 | bfloat16 | float16 (default float32; a GGUF file runs its own quantized blocks)"
    ),
    quant: str = quant_opt(),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    adapter: Path = typer.Option(
        None, "--adapter", help="A LoRA adapter folder (lmlab's --save-adapter or PEFT's) applied to -m, unmerged."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute everything each step (slow; for checking)."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this run in the run store."),
    wandb: bool = typer.Option(False, "--wandb", help="Mirror the run to wandb."),
):
    """Generate text from a prompt with every sampling knob; stats go to stderr."""
    from lmlab.engine.prompting import read_few_shot, render
    from lmlab.runs import record_run

    prompt = _one_prompt(prompt)
    if prompt is None and prompts_file is None:
        raise LmlabError(
            'no prompt was given; pass a prompt, e.g. lmlab generate "Once upon a time", or --prompts FILE.'
        )
    if prompt is not None and prompts_file is not None:
        raise LmlabError(f"both a prompt ({prompt!r}) and --prompts {prompts_file} were given; pass one or the other.")
    if truncate not in (None, "left"):
        raise LmlabError(f"--truncate takes 'left', got {truncate!r}.")
    prompts = _read_prompts(prompts_file) if prompts_file else [prompt]
    sk = sampling_kwargs(
        temperature,
        top_k,
        top_p,
        min_p,
        typical_p,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        no_repeat_ngram,
        seed,
        n,
    )
    from lmlab.engine.sampling import SamplingParams

    SamplingParams(**sk).validate()  # bad values fail before the model loads
    if max_new_tokens <= 0:
        raise LmlabError(
            f"max_new_tokens must be a positive integer, got {max_new_tokens}; use e.g. --max-new-tokens 64."
        )
    adapter_path = _adapter_path(adapter)
    lm = load_model(model, dtype, device, quant=quant, adapter=adapter_path)
    if chat and not fake_chat and (lm.tokenizer is None or not lm.tokenizer.chat_template):
        raise LmlabError(
            f"{model} has no chat template (a base model); use --fake-chat to prompt it as an assistant, "
            "or drop --chat to continue the text."
        )
    shots = read_few_shot(few_shot) if few_shot else None
    stops = list(stop or [])
    add_special = True
    if chat or fake_chat:
        mode = "fake" if fake_chat else "template"
        rendered = [render(lm.tokenizer, [{"role": "user", "content": p}], mode, shots) for p in prompts]
        texts = [r[0] for r in rendered]
        stops += rendered[0][1]
        add_special = rendered[0][2]
    else:
        texts = [(shots or "") + p for p in prompts]

    if stream is None:
        stream = sys.stdout.isatty() and not json_out
    if len(texts) > 1 or n > 1 or json_out:
        stream = False
    gen_kw = dict(
        max_new_tokens=max_new_tokens,
        stop=stops,
        alternatives=max(alternatives, 5 if show_probs else 0),
        use_cache=not no_cache,
        truncate=truncate,
        add_special=add_special,
        ignore_eos=ignore_eos,
        **sk,
    )
    config = dict(
        dtype=str(lm.dtype).removeprefix("torch."),
        quant=getattr(lm, "quant", "none"),
        device=device,
        chat=chat,
        fake_chat=fake_chat,
        few_shot=str(few_shot) if few_shot else None,
        adapter=adapter_path,
        **gen_kw,
    )
    with record_run(
        "generate",
        model=model,
        model_path=_model_path(lm),
        config=config,
        seed=seed,
        inputs={"prompts": prompts, "rendered": texts},
        record=not no_record,
        wandb=wandb or None,
    ) as run:
        if stream:
            _stream_one(lm, texts[0], gen_kw, show_probs, alternatives, run)
        else:
            _batch(lm, prompts, texts, gen_kw, show_probs, alternatives, json_out, run)


def _one_prompt(words: list[str] | None) -> str | None:
    """The prompt argument: one string. Several words mean the quotes were left out."""
    words = [words] if isinstance(words, str) else list(words or [])
    if len(words) > 1:
        raise LmlabError(
            f"expected one prompt but got {len(words)} words; put the prompt in quotes, "
            f'e.g. lmlab generate "{" ".join(words)}".'
        )
    return words[0] if words else None


def _adapter_path(adapter) -> str | None:
    """--adapter as an absolute path (what the run records), checked before the model loads."""
    if adapter is None:
        return None
    from lmlab.finetune.adapter import check_adapter_folder

    return str(check_adapter_folder(adapter))


def _model_path(lm):
    return str(lm.resolved.path) if lm.resolved is not None else None


def _stream_one(lm, text, gen_kw, show_probs, alternatives, run):
    """Print tokens as they come. Ctrl-C prints what was generated and the stats so far, exit 130."""
    gen = lm.stream(text, **gen_kw)
    pieces, ids, alts = [], [], []
    try:
        for ev in gen:
            pieces.append(ev.text)
            ids.append(ev.id)
            if show_probs:
                out.print(Text(ev.text, style=prob_style(2.718281828**ev.logprob)), end="", soft_wrap=True)
                sys.stdout.flush()
            else:
                write_text(ev.text)
            if alternatives:
                alts.append([(p, round(q, 4)) for _, p, q in ev.alternatives[:alternatives]])
    except KeyboardInterrupt:
        write_text("\n")
        timings = gen.stats.as_dict()
        print_stats([f"interrupted after {len(ids)} tokens", *stats_parts(timings, lm.load_seconds)], style="yellow")
        run.outputs = {"texts": ["".join(pieces)], "token_ids": [ids], "finish_reasons": ["interrupted"]}
        run.timings = timings
        raise
    write_text("\n")
    timings = gen.stats.as_dict()
    if alternatives:
        _print_alternatives(lm, ids, alts)
    print_stats(stats_parts(timings, lm.load_seconds))
    run.outputs = {"texts": ["".join(pieces)], "token_ids": [ids], "finish_reasons": [gen.result().finish_reason]}
    run.timings = timings
    run.add_metrics(
        decode_tok_s=timings["decode_tok_s"], prefill_tok_s=timings["prefill_tok_s"], ttft_ms=timings["ttft_ms"]
    )


def _batch(lm, prompts, texts, gen_kw, show_probs, alternatives, json_out, run):
    try:
        results = lm.generate(texts, **gen_kw)
    except KeyboardInterrupt as e:
        partial = getattr(e, "partial", [])
        for r in partial:
            write_text(r.text + "\n")
        if partial:
            print_stats(["interrupted", *stats_parts(partial[0].timings, lm.load_seconds)], style="yellow")
            run.outputs = {"texts": [r.text for r in partial], "finish_reasons": ["interrupted"] * len(partial)}
        raise
    timings = results[0].timings
    run.outputs = {
        "texts": [r.text for r in results],
        "token_ids": [r.token_ids for r in results],
        "finish_reasons": [r.finish_reason for r in results],
    }
    run.timings = timings
    run.add_metrics(
        decode_tok_s=timings["decode_tok_s"], prefill_tok_s=timings["prefill_tok_s"], ttft_ms=timings["ttft_ms"]
    )
    if json_out:
        print_json(
            {
                "model": lm.name,
                "results": [
                    {
                        "prompt": prompts[i // max(1, len(results) // len(prompts))],
                        **{k: v for k, v in r.to_dict().items() if k != "prompt"},
                    }
                    for i, r in enumerate(results)
                ],
                "timings": timings,
                "run_id": run.id,
            }
        )
        return
    for i, r in enumerate(results):
        if len(results) > 1:
            err.print(f"[dim]--- {i + 1}/{len(results)} ({r.finish_reason})[/]")
        if show_probs:
            line = Text()
            for tid, lp in zip(r.token_ids, r.logprobs):
                line.append(lm.tokenizer.decode([tid]), style=prob_style(2.718281828**lp))
            out.print(line, soft_wrap=True)
        else:
            write_text(r.text + "\n")  # exactly the generated text, then a newline
        if alternatives:
            _print_alternatives(
                lm, r.token_ids, [[(p, round(q, 4)) for _, p, q in a[:alternatives]] for a in r.alternatives]
            )
    print_stats(stats_parts(timings, lm.load_seconds))


def _print_alternatives(lm, ids, alts):
    from rich.table import Table

    t = Table(title="top alternatives per generated token")
    t.add_column("#", justify="right")
    t.add_column("token")
    t.add_column("alternatives (probability)")
    for i, (tid, a) in enumerate(zip(ids, alts)):
        t.add_row(str(i), repr(lm.tokenizer.token_str(tid)), "  ".join(f"{p!r} {q:.3f}" for p, q in a))
    err.print(t)


# ----------------------------------------------------------------------------- chat

CHAT_KNOBS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "max_new_tokens", "seed")
CHAT_HELP = (
    "commands: /reset  /set KNOB VALUE "
    "(temperature top_k top_p min_p typical_p repetition_penalty max_new_tokens seed)  /show  /quit"
)


def chat(
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model"),
    system: str = typer.Option(None, "--system", help="System prompt."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    seed: int = typer.Option(None),
    fake_chat: bool = typer.Option(False, "--fake-chat", help="Base model: a transcript format it can continue."),
    few_shot: Path = typer.Option(None, "--few-shot", help="Examples to put before the conversation (base models)."),
    dtype: str = typer.Option("float32"),
    quant: str = quant_opt(),
    device: str = typer.Option("cpu"),
    adapter: Path = typer.Option(
        None, "--adapter", help="A LoRA adapter folder (lmlab's --save-adapter or PEFT's) applied to -m, unmerged."
    ),
    no_record: bool = typer.Option(False, "--no-record"),
):
    """Chat with a model: history, /reset, /set KNOB VALUE, stats after each answer."""
    from lmlab.engine.chat import Chat
    from lmlab.engine.prompting import default_mode, read_few_shot
    from lmlab.engine.sampling import SamplingParams
    from lmlab.runs import record_run

    knobs = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        typical_p=1.0,
    )
    SamplingParams(**knobs)  # bad values fail before the model loads
    if max_new_tokens <= 0:
        raise LmlabError(
            f"max_new_tokens must be a positive integer, got {max_new_tokens}; use e.g. --max-new-tokens 256."
        )
    adapter_path = _adapter_path(adapter)
    lm = load_model(model, dtype, device, quant=quant, adapter=adapter_path)
    mode = "fake" if fake_chat else default_mode(lm.tokenizer)
    conv = Chat(
        lm,
        system=system,
        mode=mode,
        few_shot=read_few_shot(few_shot) if few_shot else None,
        max_new_tokens=max_new_tokens,
        **knobs,
    )
    err.print(
        f"chatting with {lm.name} ({'chat template' if mode == 'template' else 'fake-chat transcript'}); {CHAT_HELP}"
    )
    with record_run(
        "chat",
        model=model,
        model_path=_model_path(lm),
        config=dict(mode=mode, dtype=dtype, quant=lm.quant, adapter=adapter_path, **conv.settings),
        seed=seed,
        inputs={"system": system},
        record=not no_record,
    ) as run:
        run.outputs = {"turns": conv.turns}
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                out.print()
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _chat_command(line, conv):
                    break
                continue
            try:
                turn = conv.send(line)
            except LmlabError as e:
                err.print(f"error: {e}")
                continue
            if turn.dropped_exchanges:
                n = turn.dropped_exchanges
                err.print(
                    f"[dim](dropped the oldest {n} exchange{'s' if n > 1 else ''} to fit the "
                    f"{lm.config.max_seq_len}-token context)[/]"
                )
            write_text("bot> ")
            try:
                for ev in turn:
                    write_text(ev.text)
            except KeyboardInterrupt:
                write_text("\n")
                err.print("[yellow](answer interrupted)[/]")
            write_text("\n")
            print_stats(stats_parts(turn.stats.as_dict()), style="dim")
            run.checkpoint()


def _chat_command(line: str, conv) -> bool:
    """Handle a /command on the Chat; False means quit."""
    parts = line.split()
    cmd = parts[0].lower()
    if cmd in ("/quit", "/exit", "/q"):
        return False
    if cmd == "/reset":
        conv.reset()
        err.print("history cleared")
    elif cmd == "/show":
        err.print(" ".join(f"{k}={v}" for k, v in conv.settings.items() if k in CHAT_KNOBS))
    elif cmd == "/set" and len(parts) == 3:
        key, raw = parts[1].replace("-", "_"), parts[2]
        if key not in CHAT_KNOBS:
            err.print(f"unknown knob {key!r}; one of: {', '.join(CHAT_KNOBS)}")
            return True
        try:
            value = (
                None
                if raw.lower() == "none"
                else (int(raw) if key in ("top_k", "max_new_tokens", "seed") else float(raw))
            )
            conv.set(key, value)
        except ValueError:
            err.print(f"{raw!r} is not a number for {key}")
            return True
        except LmlabError as e:
            err.print(f"error: {e}")
            return True
        err.print(f"{key} = {value}")
    else:
        err.print(CHAT_HELP)
    return True


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
