"""`lmlab merge`: merge models into one HF folder (linear, slerp, task arithmetic, TIES, DARE).

The library does the work (``lmlab.merge``); this module turns options (or a mergekit-style YAML
file) into a MergeSpec, shows progress on stderr and prints the result and the comparison.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lmlab.cli.common import err, out, print_json
from lmlab.errors import LmlabError


def merge(
    models: list[str] = typer.Argument(None, help="The models to merge: names, HF folders or .gguf files."),
    method: str = typer.Option(
        "linear", "--method", help="linear | slerp | task-arithmetic | ties | dare-ties | dare-linear."
    ),
    out_dir: str = typer.Option(None, "--out", "-o", help="The folder to write the merged HF model to (new or empty)."),
    weights: str = typer.Option(
        None, "--weights", help="One weight per model, comma-separated (the base takes none); default 1 each."
    ),
    t: str = typer.Option(None, "--t", help="slerp: 0 = the base, 1 = the other; a list (0,0.5,1) varies by layer."),
    base: str = typer.Option(
        None, "--base", help="The base model (slerp's t=0; the task vectors' origin). Default: the first."
    ),
    density: float = typer.Option(None, "--density", help="ties/dare: the fraction of each task vector kept (0..1)."),
    lam: float = typer.Option(None, "--lambda", help="Task-arithmetic family: scale of the combined task vector."),
    normalize: bool = typer.Option(
        None, "--normalize/--no-normalize", help="Divide by the sum of the weights (method's default)."
    ),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="base: vocabularies of different size keep the base model's tokens."
    ),
    dtype: str = typer.Option(None, "--dtype", help="The dtype to merge in (default: the inputs')."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="The dtype written (default: the merge's)."),
    seed: int = typer.Option(None, "--seed", help="DARE's random drops: same seed, same model."),
    config_file: Path = typer.Option(
        None, "--config", help="A mergekit-style YAML merge config instead of the options."
    ),
    no_compare: bool = typer.Option(False, "--no-compare", help="Skip the perplexity and answers comparison."),
    text_file: Path = typer.Option(None, "--text", help="A text file to compare perplexities on (default: a sample)."),
    prompts: list[str] = typer.Option(None, "--prompt", help="A prompt to compare greedy answers on (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this run in the run store."),
):
    """Merge models into one: (A+B)/2 and beyond, with mergekit's methods; the result is a HF model folder."""
    from lmlab.merge import spec_from_options, spec_from_yaml

    if not out_dir:
        raise LmlabError("say where to write the merged model with -o DIR.")
    if config_file is not None:
        given = [
            f"--{n}"
            for n, v in (
                ("weights", weights),
                ("t", t),
                ("base", base),
                ("density", density),
                ("lambda", lam),
                ("tokenizer", tokenizer),
                ("dtype", dtype),
                ("out-dtype", out_dtype),
                ("normalize", normalize),
            )
            if v is not None
        ]
        if models or given or method != "linear":
            what = "models" if models else (given[0] if given else "--method")
            raise LmlabError(f"--config holds the whole merge; drop {what} (or drop --config and use the options).")
        spec = spec_from_yaml(config_file)
    else:
        if not models or len(models) < 1:
            raise LmlabError("name the models to merge (lmlab merge A B -o DIR), or pass --config merge.yaml.")
        spec = spec_from_options(
            models,
            method,
            weights=weights,
            t=t,
            base=base,
            density=density,
            lam=lam,
            normalize=normalize,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer=tokenizer,
        )
    compare = None
    if not no_compare:
        from lmlab.merge.compare import PROMPTS, SAMPLE_TEXT

        compare = {"text": SAMPLE_TEXT, "prompts": list(prompts or PROMPTS), "source": "the sample text"}
        if text_file is not None:
            try:
                compare["text"] = Path(text_file).read_text(encoding="utf-8", errors="replace")
                compare["source"] = str(text_file)
            except OSError as e:
                raise LmlabError(f"--text {text_file} cannot be read ({e.strerror}); pass a text file.") from None
    err.print(_describe(spec), markup=False, highlight=False, soft_wrap=True)
    summary = _run(spec, out_dir, seed, compare, not no_record)
    if json_out:
        print_json(summary)
        return
    mb = summary["bytes"] / 2**20
    out.print(
        f"merged {len(summary['models'])} models with {summary['method']} into {summary['out']} · "
        f"{summary['tensors']} tensors · {mb:,.1f} MiB in {summary['shards']} safetensors file"
        f"{'s' if summary['shards'] > 1 else ''} · {summary['seconds']:.1f} s",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if summary.get("comparison"):
        _print_comparison(summary["comparison"], compare)
    if summary.get("run_id"):
        err.print(f"recorded as run {summary['run_id']}", markup=False, highlight=False)


def _describe(spec) -> str:
    parts = [f"{spec.method}"]
    if spec.base is not None:
        parts.append(f"base {spec.base}")
    for m in spec.models:
        if m.params:
            parts.append(f"{m.model} " + " ".join(f"{k}={v}" for k, v in m.params.items()))
    if spec.params:
        parts.append(" ".join(f"{k}={v}" for k, v in spec.params.items()))
    return "merging: " + " · ".join(parts)


def _run(spec, out_dir: str, seed, compare: dict | None, record: bool) -> dict:
    from lmlab.merge import merge_models

    log = (lambda msg: err.print(msg, markup=False, highlight=False)) if compare else None
    if not err.is_terminal:
        return merge_models(spec, out_dir, seed=seed, compare=compare, record=record, log=log)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        return merge_models(spec, out_dir, seed=seed, compare=compare, record=record, progress=progress, log=log)


def _short(text: str, n: int = 48) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"


def _print_comparison(rows: list[dict], compare: dict) -> None:
    from rich import box
    from rich.table import Table

    n_words = len(compare["text"].split())
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold")
    table.add_column("perplexity", justify="right")
    for p in compare["prompts"]:
        table.add_column(f"{p!r} →", overflow="fold")
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") is not None else r.get("note", "—")
        answers = [_short(a) for a in r.get("answers") or []] + ["—"] * (
            len(compare["prompts"]) - len(r.get("answers") or [])
        )
        table.add_row(r["label"], ppl, *answers)
    out.print(f"perplexity on {compare['source']} ({n_words} words) and greedy answers:", markup=False, highlight=False)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
