"""`lmlab inspect | attention | lens | ablate | patch | steer | shapes | induction`: look inside, change, measure.

Content (tables, heatmaps, JSON) goes to stdout; load times and progress to stderr. Every
command takes -m/--model (default smollm2-135m), the load-time knobs --rope-theta,
--max-seq-len and --n-layers, and --json; the heatmap commands take --png FILE.
A prompt is text, or token ids with --ids 1,2,3 (for models without a tokenizer).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmlab.cli.common import err, load_model, out, print_json, quant_opt
from lmlab.errors import LmlabError


def rich_table(*args, **kw):
    from lmlab.inspect.display import rich_table as table  # imports torch: only when a command runs

    return table(*args, **kw)


def _token(text: str) -> str:
    from lmlab.inspect.display import show_token

    return show_token(text)


DEFAULT_MODEL = "smollm2-135m"


# ----------------------------------------------------------------------------- shared options


def _model_opt():
    return typer.Option(DEFAULT_MODEL, "-m", "--model", help="Model name, path or hub id.")


def _json_opt():
    return typer.Option(False, "--json", help="Machine-readable output on stdout.")


def _png_opt():
    return typer.Option(None, "--png", help="Also write the heatmap to this PNG file.")


def _ids_opt():
    return typer.Option(None, "--ids", help="Token ids instead of text, e.g. 1,15,27 (for models without a tokenizer).")


def _dtype_opt():
    return typer.Option("float32", help="float32 | bfloat16 | float16")


def _device_opt():
    return typer.Option("cpu", help="cpu | cuda | auto")


def _rope_opt():
    return typer.Option(None, "--rope-theta", help="Load with this RoPE base instead of the model's (RoPE models).")


def _ctx_opt():
    return typer.Option(None, "--max-seq-len", help="Load with this context length (tokens).")


def _layers_opt():
    return typer.Option(None, "--n-layers", help="Keep only the first N blocks.")


def _load(model: str, dtype: str, device: str, rope_theta, max_seq_len, n_layers, quant=None):
    """Load with the load-time knobs; the load time goes to stderr."""
    overrides = {}
    if rope_theta is not None:
        overrides["rope_theta"] = float(rope_theta)
    if max_seq_len is not None:
        overrides["max_seq_len"] = int(max_seq_len)
    lm = load_model(model, dtype, device, overrides=overrides or None, n_layers=n_layers, quant=quant)
    if rope_theta is not None and lm.config.pos != "rope":
        raise LmlabError(
            f"--rope-theta applies to RoPE models, but {model} ({lm.config.family}) learns its positions; "
            "drop the option."
        )
    knobs = [f"{k}={v:g}" for k, v in overrides.items()] + ([f"n_layers={n_layers}"] if n_layers else [])
    knobs += [f"quant {lm.quant}"] if lm.quant != "none" else []
    err.print(
        f"{lm.name} loaded in {lm.load_seconds:.2f} s" + (f" ({', '.join(knobs)})" if knobs else ""),
        style="dim",
        markup=False,
        highlight=False,
    )
    _start_record(lm)
    return lm


# ----------------------------------------------------------------------------- recording

# The command being run: (name, its arguments, ExitStack, record?, wandb?) and, once the model is
# loaded, its Run. Every command records one run (see lmlab.runs); --no-record skips it.
_CURRENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lmlab_inspect_run", default=None)
_INPUT_ARGS = ("prompt", "clean", "corrupt", "toward", "away", "ids", "answer", "wrong")


def _start_record(lm) -> None:
    """Open the run record once the model is loaded (so its file is hashed)."""
    cur = _CURRENT.get()
    if cur is None or cur.get("run") is not None:
        return
    from lmlab.runs import record_run

    args = cur["args"]
    inputs = {k: args[k] for k in _INPUT_ARGS if args.get(k) is not None}
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if k not in _INPUT_ARGS and k != "json_out"
    }
    path = str(lm.resolved.path) if getattr(lm, "resolved", None) is not None else None
    cur["run"] = cur["stack"].enter_context(
        record_run(
            cur["name"],
            model=args.get("model"),
            model_path=path,
            config=config,
            seed=args.get("seed"),
            inputs=inputs,
            record=cur["record"],
            wandb=cur["wandb"] or None,
        )
    )


def _emit(payload: dict, json_out: bool) -> bool:
    """Keep the command's result as the run's outputs; print it as JSON when asked, with the run's
    id (None with --no-record) so a script can find the run again (returns json_out)."""
    cur = _CURRENT.get()
    run = cur.get("run") if cur is not None else None
    if run is not None:
        payload = {**payload, "run_id": run.id}
        run.outputs = payload
    if json_out:
        print_json(payload)
    return json_out


def _model_and_prompt(words: list[str] | None, model: str) -> tuple[str, str | None]:
    """The positional words: [PROMPT] or [MODEL, PROMPT]."""
    words = [words] if isinstance(words, str) else list(words or [])
    if len(words) > 2:
        raise LmlabError(
            f"expected a prompt (optionally after the model name) but got {len(words)} words; "
            'put the prompt in quotes, e.g. "The cat sat on the".'
        )
    if len(words) == 2:
        return words[0], words[1]
    return model, (words[0] if words else None)


def _recorded(name: str, fn):
    """The command fn with --no-record/--wandb added, run inside its run record."""
    sig = inspect.signature(fn)
    extra = [
        inspect.Parameter(
            "no_record",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--no-record", help="Do not record this run in the run store."),
        ),
        inspect.Parameter(
            "wandb",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--wandb", help="Mirror the run to wandb."),
        ),
    ]

    takes_prompt = "prompt" in sig.parameters

    @functools.wraps(fn)
    def command(*args, no_record: bool = False, wandb: bool = False, **kwargs):
        if takes_prompt:
            kwargs["model"], kwargs["prompt"] = _model_and_prompt(kwargs.get("prompt"), kwargs["model"])
        bound = sig.bind(*args, **kwargs)
        with ExitStack() as stack:
            token = _CURRENT.set(
                {
                    "name": name,
                    "args": dict(bound.arguments),
                    "stack": stack,
                    "record": not no_record,
                    "wandb": wandb,
                    "run": None,
                }
            )
            try:
                return fn(*args, **kwargs)
            finally:
                _CURRENT.reset(token)

    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
        for p in sig.parameters.values()
    ]
    if takes_prompt:  # `lmlab shapes "prompt"` and `lmlab shapes MODEL "prompt"` both work
        params = [
            p.replace(
                annotation=list[str],
                default=typer.Argument(
                    None,
                    metavar="[MODEL] PROMPT",
                    help="The prompt, optionally after the model (same as -m MODEL).",
                    show_default=False,
                ),
            )
            if p.name == "prompt"
            else p
            for p in params
        ]
    command.__signature__ = sig.replace(parameters=params + extra)
    command.__annotations__ = {
        **fn.__annotations__,
        **({"prompt": list[str]} if takes_prompt else {}),
        "no_record": bool,
        "wandb": bool,
    }
    return command


def _prompt(prompt: str | None, ids: str | None):
    """The prompt as text, or as a list of ids from --ids."""
    if ids is not None:
        try:
            return [int(t) for t in ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise LmlabError(f"--ids takes comma-separated token ids such as 1,15,27, got {ids!r}.") from None
    if prompt is None:
        raise LmlabError('no prompt was given; pass it as text, e.g. "The cat sat on the", or as --ids 1,15,27.')
    return prompt


@contextmanager
def _progress(label: str):
    """A progress bar on stderr; yields a callback(done, total) (None when stderr is not a terminal)."""
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _write_png(obj, png: Path | None) -> None:
    if png is not None:
        obj.save_png(png)
        err.print(f"[dim]wrote {png}[/dim]")


# ----------------------------------------------------------------------------- inspect


def inspect_cmd(
    prompt: str = typer.Argument(None, help="The prompt."),
    model: str = _model_opt(),
    top_k: int = typer.Option(10, "--top-k", "-k", help="How many next tokens to show."),
    ids: str = _ids_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Tokens with their ids and log-probabilities, then the top next tokens and the entropy."""
    from lmlab.inspect import as_token_ids, token_labels

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    x = as_token_ids(lm, _prompt(prompt, ids))
    t0 = time.perf_counter()
    logits = lm(x)[0].float()  # (T, V)
    ms = (time.perf_counter() - t0) * 1e3
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp).nan_to_num().sum(-1)  # (T,) nats
    ids_list = x[0].tolist()
    labels = token_labels(lm, ids_list)
    # log p of each token given the ones before it (the first has no prediction)
    token_lp = [None] + logp[:-1].gather(-1, x[0, 1:, None]).squeeze(-1).tolist()
    top = logp[-1].topk(min(top_k, lm.config.vocab_size))
    next_rows = [
        {"id": i, "token": t, "prob": p.exp().item(), "logprob": p.item()}
        for i, t, p in zip(top.indices.tolist(), token_labels(lm, top.indices), top.values)
    ]
    if _emit(
        {
            "model": model,
            "tokens": [
                {"pos": i, "id": tid, "token": lab, "logprob": lp, "entropy_after": e}
                for i, (tid, lab, lp, e) in enumerate(zip(ids_list, labels, token_lp, ent.tolist()))
            ],
            "next": next_rows,
            "entropy": ent[-1].item(),
            "forward_ms": ms,
        },
        json_out,
    ):
        return
    rows = [
        [i, tid, _token(lab), "" if lp is None else f"{lp:.3f}", f"{e:.3f}"]
        for i, (tid, lab, lp, e) in enumerate(zip(ids_list, labels, token_lp, ent.tolist()))
    ]
    out.print(
        rich_table(["pos", "id", "token", "log p(token)", "entropy after (nats)"], rows, f"{len(ids_list)} tokens")
    )
    rows = [[r["id"], _token(r["token"]), f"{r['prob']:.4f}", f"{r['logprob']:.3f}"] for r in next_rows]
    out.print(
        rich_table(
            ["id", "token", "prob", "log p"],
            rows,
            f"top {len(next_rows)} next tokens (entropy {ent[-1].item():.3f} nats)",
        )
    )
    err.print(f"[dim]forward {ms:.1f} ms[/dim]")


# ----------------------------------------------------------------------------- attention


def attention_cmd(
    prompt: str = typer.Argument(None, help="The prompt."),
    layer: int = typer.Option(..., "--layer", "-l", help="Layer (0-based)."),
    head: int = typer.Option(None, "--head", help="Head (0-based); omit for the mean over heads."),
    model: str = _model_opt(),
    ids: str = _ids_opt(),
    png: Path = _png_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """A terminal heatmap of one head's attention pattern (rows: query tokens, columns: keys)."""
    from lmlab.inspect import run_with_cache
    from lmlab.inspect.hooks import check_head, check_layer

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    check_layer(lm.config, layer) if head is None else check_head(lm.config, layer, head)
    _, cache = run_with_cache(lm, _prompt(prompt, ids), f"blocks.{layer}.attn.pattern")
    pattern = cache.attention(layer, head)
    _write_png(pattern, png)
    if _emit({"model": model, **pattern.to_dict()}, json_out):
        return
    out.print(pattern)


# ----------------------------------------------------------------------------- lens


def lens_cmd(
    prompt: str = typer.Argument(None, help="The prompt."),
    model: str = _model_opt(),
    k: int = typer.Option(5, "-k", "--top-k", help="Tokens per layer and position (JSON)."),
    layers: str = typer.Option(None, "--layers", help="Layers to show, e.g. '0-5,29' (default: all)."),
    generate: int = typer.Option(0, "--generate", "-g", help="Generate N tokens (greedy) and lens each one instead."),
    ids: str = _ids_opt(),
    png: Path = _png_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Logit lens: every layer's top next token at every position (final norm, then unembedding)."""
    from lmlab.inspect import logit_lens, logit_lens_generation, parse_layers

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    chosen = parse_layers(lm.config, layers) if layers else None
    p = _prompt(prompt, ids)
    result, gen = (
        logit_lens_generation(lm, p, k, chosen, max_new_tokens=generate)
        if generate
        else (logit_lens(lm, p, k, chosen), None)
    )
    _write_png(result, png)
    d = {"model": model, **result.to_dict()}
    if gen is not None:
        d["generated"] = {"text": gen.text, "token_ids": gen.token_ids}
    if _emit(d, json_out):
        return
    out.print(result)
    if gen is not None:
        err.print(f"[dim]generated {len(gen.token_ids)} tokens; columns: the token read at each step[/dim]")


# ----------------------------------------------------------------------------- ablate / steer


def _diff_and_effect(lm, p, ivs, max_new_tokens, seed, temperature, json_out, model, steering=None):
    from lmlab.inspect import effect, generation_diff
    from lmlab.inspect.metrics import steering_shift

    eff = effect(lm, p, ivs)
    diff = (
        generation_diff(lm, p, ivs, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature)
        if max_new_tokens
        else None
    )
    shift = steering_shift(lm, p, *steering, ivs, diff) if steering else None
    payload = {"model": model, "effect": eff.to_dict(), "generation": diff.to_dict() if diff else None}
    if shift is not None:
        payload["steering"] = shift
    if _emit(payload, json_out):
        return
    out.print(eff)
    if diff is not None:
        out.print(diff)
    if shift is not None:
        b, m = shift["preference_base"], shift["preference_steered"]
        out.print(
            f"preference: log p({shift['toward']!r}) - log p({shift['away']!r}) right after the prompt "
            f"{b:+.2f} → {m:+.2f} nats ({m - b:+.2f})",
            markup=False,
        )
        if diff is not None:
            out.print(
                f"fluency: the unmodified model's perplexity of the generated text {shift['perplexity_base_text']:.1f} "
                f"(unmodified) → {shift['perplexity_steered_text']:.1f} (steered)",
                markup=False,
            )


def ablate_cmd(
    prompt: str = typer.Argument(None, help="The prompt."),
    heads: str = typer.Option(None, "--heads", help="Heads to ablate as LAYER.HEAD, e.g. '3.5,4.*'."),
    skip_layers: str = typer.Option(None, "--skip-layers", help="Blocks to skip, e.g. '7' or '3,5-6'."),
    mode: str = typer.Option("zero", help="zero | mean (each head's mean output over the prompt's positions)."),
    model: str = _model_opt(),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-t", help="Tokens for the generation diff (0: none)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of the generation diff (0 = greedy)."),
    seed: int = typer.Option(0, help="Seed of both generations."),
    ids: str = _ids_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Ablate heads and/or skip layers: Δlog p of the top token and KL per position, and a generation diff.

    Δlog p is what to read: -0.69 halves the token's probability. --json also has Δlogit, the raw
    logit's change, which can have the opposite sign: softmax only sees logits relative to each
    other, so a logit that rises less than the others still loses probability.
    """
    from lmlab.inspect import AblateHeads, SkipLayers

    if not heads and not skip_layers:
        raise LmlabError("nothing to ablate; pass --heads LAYER.HEAD (e.g. '3.5,4.*') and/or --skip-layers N.")
    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    ivs = ([AblateHeads(heads, mode)] if heads else []) + ([SkipLayers(skip_layers)] if skip_layers else [])
    _diff_and_effect(lm, _prompt(prompt, ids), ivs, max_new_tokens, seed, temperature, json_out, model)


def steer_cmd(
    prompt: str = typer.Argument(None, help="The prompt to generate from."),
    toward: str = typer.Option(
        ..., "--toward", help="Text whose mean activation to steer toward (a word, even one token, or a phrase)."
    ),
    away: str = typer.Option(..., "--away", help="Text whose mean activation to steer away from."),
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose input (resid_pre) gets the vector."),
    scale: float = typer.Option(
        0.5,
        "--scale",
        "-s",
        help="Multiple of (toward - away) to add at every position (negative: the other way). On SmolLM2, 0.5 "
        "shifts the text's sentiment and keeps it fluent; 1 and more shifts further and breaks it.",
    ),
    point: str = typer.Option("resid_pre", help="resid_pre | resid_mid | resid_post | attn_out | mlp_out"),
    model: str = _model_opt(),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-t"),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int = typer.Option(0),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Add a steering vector (mean activation of --toward minus --away, times --scale) and compare.

    Reports the effect per position (Δlog p of the top token, KL), the generation with and without
    the vector, how much more the model prefers --toward over --away as its next words, and the
    unmodified model's perplexity of each generation (near the unsteered one's: still fluent).
    """
    from lmlab.inspect import Steer

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    p = _prompt(prompt, None)
    steer = Steer.from_prompts(lm, toward, away, layer, scale, point)
    err.print(f"[dim]{steer.describe()}[/dim]")
    _diff_and_effect(lm, p, [steer], max_new_tokens, seed, temperature, json_out, model, (toward, away))


# ----------------------------------------------------------------------------- patch


def patch_cmd(
    clean: str = typer.Option(..., "--clean", help="The clean prompt (or ids:1,2,3 for token ids)."),
    corrupt: str = typer.Option(..., "--corrupt", help="The corrupted prompt, same number of tokens (or ids:...)."),
    answer: str = typer.Option(None, "--answer", help="The clean answer token (default: the clean run's top token)."),
    wrong: str = typer.Option(
        None, "--wrong", help="The corrupted answer token (default: the corrupted run's top token)."
    ),
    point: str = typer.Option("resid_pre", help="resid_pre | resid_mid | resid_post | attn_out | mlp_out"),
    layers: str = typer.Option(None, "--layers", help="Layers to sweep, e.g. '0-10' (default: all)."),
    model: str = _model_opt(),
    png: Path = _png_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Activation patching: which layer x position of the clean run restores its answer in the corrupted run."""
    from lmlab.inspect import parse_layers, patching_sweep

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    chosen = parse_layers(lm.config, layers) if layers else None
    clean_p = _parse_maybe_ids(clean)
    corrupt_p = _parse_maybe_ids(corrupt)
    answer_t = int(answer) if answer is not None and answer.isdigit() and lm.tokenizer is None else answer
    wrong_t = int(wrong) if wrong is not None and wrong.isdigit() and lm.tokenizer is None else wrong
    t0 = time.perf_counter()
    with _progress("patching") as progress:
        result = patching_sweep(
            lm, clean_p, corrupt_p, answer_t, wrong_t, point=point, layers=chosen, progress=progress
        )
    _write_png(result, png)
    if _emit({"model": model, **result.to_dict()}, json_out):
        return
    out.print(result)
    layer, pos, frac = result.best()
    out.print(
        f"clean logit diff {result.clean_metric:.3f}, corrupted {result.corrupt_metric:.3f}; "
        f"strongest single patch: layer {layer}, "
        f"position {pos} ({_token(result.clean_tokens[pos])}) restores {frac:.0%}"
    )
    err.print(
        f"[dim]{len(result.layers) * len(result.positions)} patched runs in {time.perf_counter() - t0:.1f} s[/dim]"
    )


def _parse_maybe_ids(text: str):
    """'ids:1,2,3' -> [1, 2, 3] (for models without a tokenizer); anything else is text."""
    if text.startswith("ids:"):
        return _prompt(None, text[4:])
    return text


# ----------------------------------------------------------------------------- shapes


def shapes_cmd(
    prompt: str = typer.Argument(None, help="The prompt."),
    model: str = _model_opt(),
    all_layers: bool = typer.Option(False, "--all-layers", help="One row per layer instead of one per block point."),
    ids: str = _ids_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Every tensor shape through one prefill and one decode step, with named dims and the KV cache's growth."""
    from lmlab.inspect import shape_trace

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    trace = shape_trace(lm, _prompt(prompt, ids), collapse_layers=not all_layers)
    if _emit(trace.to_dict(), json_out):
        return
    out.print(trace)
    if not trace.all_ok:
        err.print(
            "[red]some shapes differ from docs/hooks.md (marked MISMATCH); please report this as an lmlab bug[/red]"
        )


# ----------------------------------------------------------------------------- induction


def induction_cmd(
    model: str = _model_opt(),
    seq_len: int = typer.Option(40, "--seq-len", help="Random tokens per repeat."),
    n_seqs: int = typer.Option(4, "--n-seqs", help="Sequences (their losses are averaged)."),
    seed: int = typer.Option(0, help="Seed of the random tokens."),
    top_layers: int = typer.Option(
        3, "--top-layers", help="Scan single heads in this many of the most important layers."
    ),
    png: Path = _png_opt(),
    json_out: bool = _json_opt(),
    dtype: str = _dtype_opt(),
    quant: str = quant_opt(),
    device: str = _device_opt(),
    rope_theta: float = _rope_opt(),
    max_seq_len: int = _ctx_opt(),
    n_layers: int = _layers_opt(),
):
    """Random tokens repeated twice: the induction and previous-token heads, and the circuit they form.

    Heads are named by their attention pattern; beside each, how much of the loss drop on the second
    repeat its ablation removes.
    """
    from lmlab.inspect import induction_experiment

    lm = _load(model, dtype, device, rope_theta, max_seq_len, n_layers, quant)
    with _progress("ablating") as progress:
        result = induction_experiment(lm, seq_len, n_seqs, seed, top_layers, progress=progress)
    _write_png(result, png)
    if _emit(result.to_dict(), json_out):
        return
    out.print(result)


COMMANDS = {
    "inspect": inspect_cmd,
    "attention": attention_cmd,
    "lens": lens_cmd,
    "ablate": ablate_cmd,
    "patch": patch_cmd,
    "steer": steer_cmd,
    "shapes": shapes_cmd,
    "induction": induction_cmd,
}


def register(app: typer.Typer) -> None:
    for name, fn in COMMANDS.items():
        app.command(name)(_recorded(name, fn))
