"""`lmlab train`: train a tiny GPT (gpt2 or llama shape) from scratch, or compare two runs' loss curves.

The library does the work (``lmlab.train``); this module turns options into a TrainConfig:
the defaults, then ``--preset`` or ``--size``, then ``--config FILE.toml``, then the options
given on the command line. Under ``torchrun`` the same command runs DDP.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lmlab.cli.common import err, out, print_json
from lmlab.errors import LmlabError

# option name -> TrainConfig field, for the options that map one to one
FIELDS = (
    "data",
    "arch",
    "tokenizer",
    "steps",
    "batch_size",
    "block_size",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "n_layers",
    "d_model",
    "n_heads",
    "eval_every",
    "eval_iters",
    "log_every",
    "sample_every",
    "sample_tokens",
    "save_every",
    "seed",
    "dtype",
    "device",
    "compile",
    "workers",
    "out",
)


def train(
    data: str = typer.Option(
        None, "--data", help="A text file or folder of text files (default: Python's stdlib source)."
    ),
    size: str = typer.Option(None, "--size", help="Model size: 1M | 5M | 10M | 25M | 50M (default 10M)."),
    arch: str = typer.Option(None, "--arch", help="gpt2 | llama (default gpt2)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="char | bytes | bpe:N | a model name or folder."),
    preset: str = typer.Option(None, "--preset", help="A named config, e.g. nanogpt-baby (nanoGPT's CPU baby GPT)."),
    config_file: Path = typer.Option(None, "--config", help="A TOML file of TrainConfig fields."),
    steps: int = typer.Option(None, "--steps", help="Optimiser steps (overrides the preset's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Rows per micro-step, over all processes."),
    block_size: int = typer.Option(None, "--block-size", help="Tokens of context per row."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-steps per optimiser step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    min_lr: float = typer.Option(None, "--min-lr", help="Learning rate at the end of the cosine decay."),
    warmup: int = typer.Option(None, "--warmup", help="Warmup steps."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW decoupled weight decay (matrices only)."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this (0 = off)."),
    n_layers: int = typer.Option(None, "--n-layers", help="Override the size's layers."),
    d_model: int = typer.Option(None, "--d-model", help="Override the size's width."),
    n_heads: int = typer.Option(None, "--n-heads", help="Override the size's heads."),
    eval_every: int = typer.Option(None, "--eval-every", help="Steps between train/val loss estimates."),
    eval_iters: int = typer.Option(None, "--eval-iters", help="Batches per loss estimate."),
    log_every: int = typer.Option(None, "--log-every", help="Steps between points of the recorded loss curve."),
    sample_every: int = typer.Option(None, "--sample-every", help="Steps between printed samples (0 = at the end)."),
    sample_tokens: int = typer.Option(None, "--sample-tokens", help="Tokens per sample."),
    save_every: int = typer.Option(None, "--save-every", help="Steps between checkpoints (0 = at each eval)."),
    seed: int = typer.Option(None, "--seed", help="Same seed, same run."),
    dtype: str = typer.Option(None, "--dtype", help="auto (bf16 where the hardware has it) | float32 | bfloat16."),
    device: str = typer.Option(None, "--device", help="cpu | cuda | auto."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: GPU only)."),
    workers: int = typer.Option(
        None,
        "--workers",
        help="CPU threads that each train a share of every batch's rows on a replica of the model, one torch "
        "thread each (default 0: as many as torch's threads that divide the batch; 1: all rows on all threads).",
    ),
    out_dir: str = typer.Option(
        None, "--out", "-o", help="Output folder: checkpoint, then the HF model (default ./out)."
    ),
    resume: str = typer.Option(None, "--resume", help="Continue the run whose --out folder (or checkpoint) this is."),
    compare: tuple[str, str] = typer.Option(
        None,
        "--compare",
        help="Overlay two train runs' loss curves: each a run id (a prefix, last, last-1) or a run's --out folder.",
    ),
    plot: Path = typer.Option(None, "--plot", help="With --compare: the image to write (.png or .svg)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="The progress bar (default on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this run in the run store."),
    wandb: bool = typer.Option(False, "--wandb", help="Mirror the run to wandb."),
):
    """Train a small GPT from scratch and watch its samples improve; the result is a HF model folder."""
    if compare and compare[0] is not None:
        return _compare(compare, plot, json_out)
    from lmlab.train.config import TrainConfig, preset_values, size_values, toml_values
    from lmlab.train.loop import train as run_training

    values = dict(locals())
    given = {f: values[f if f != "out" else "out_dir"] for f in FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    if preset and size:
        raise LmlabError("--preset and --size both set the model's shape; pass one of them.")
    base: dict = {}
    if preset:
        base.update(preset_values(preset))
    elif size:
        base.update(size_values(size))
    if config_file is not None:
        base.update(toml_values(config_file))
    asked = {**(toml_values(config_file) if config_file is not None else {}), **given}
    if size:
        asked.update(size_values(size))
    tc = TrainConfig.from_dict({**TrainConfig().to_dict(), **base, **given})
    summary = run_training(
        tc,
        resume=resume,
        asked=asked if resume else None,
        record=not no_record,
        wandb=wandb or None,
        progress=progress,
        log=lambda msg: err.print(msg, markup=False, highlight=False, soft_wrap=True),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    if json_out:
        print_json(summary)
    else:
        tps = f"{summary['tokens_per_s']:,.0f} tok/s" if summary.get("tokens_per_s") else "—"
        mfu = f"MFU {100 * summary['mfu']:.1f}%" if summary.get("mfu") else "MFU —"
        out.print(
            f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s · train loss {summary['train_loss']:.4f} · "
            f"val loss {summary['val_loss']:.4f} (unigram baseline {summary['unigram_loss']:.3f}) · {tps} · {mfu}\n"
            f'model: {summary["out"]}  (lmlab generate -m {summary["out"]} "...")',
            markup=False,
            highlight=False,
        )


def _train_run(store, ref: str) -> dict:
    """A run by its id (a prefix, 'last', 'last-N'), or, where ``ref`` is a folder, the newest train
    run that wrote it."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return store.get(ref)
    where = str(folder.resolve())
    for run in store.list(limit=None, command="train"):
        if (run.get("outputs") or {}).get("folder") == where:
            return run
    raise LmlabError(
        f"no recorded train run wrote {ref}; pass a run id instead (`lmlab runs list --command train` shows them)."
    )


def _compare(ids: tuple[str, str], plot: Path | None, json_out: bool) -> None:
    from lmlab.runs import RunStore
    from lmlab.train.plots import save_loss_plot

    with RunStore() as store:
        runs = [_train_run(store, i) for i in ids]
    for r in runs:
        if r.get("command") != "train":
            raise LmlabError(f"run {r['id']} is a {r.get('command')} run, not a train run; pass two train runs' ids.")
    series = [(r["id"], (r.get("metrics") or {}).get("points") or []) for r in runs]
    path = plot or Path(f"loss-{runs[0]['id']}-vs-{runs[1]['id']}.png")
    if path.suffix.lower() not in (".png", ".svg"):
        raise LmlabError(f"--plot {path}: write a .png or .svg file.")
    save_loss_plot(series, path, title=f"{runs[0]['id']} vs {runs[1]['id']}")
    rows = []
    for r in runs:
        m = r.get("metrics") or {}
        rows.append(
            {
                "id": r["id"],
                "train_loss": m.get("train_loss"),
                "val_loss": m.get("val_loss"),
                "tokens_per_s": m.get("tokens_per_s"),
                "mfu": m.get("mfu"),
                "steps": m.get("steps"),
            }
        )
    if json_out:
        print_json({"plot": str(path), "runs": rows})
        return
    for r in rows:
        out.print(
            f"{r['id']}  steps {r['steps']}  train loss {r['train_loss']}  val loss {r['val_loss']}  "
            f"{r['tokens_per_s']} tok/s",
            markup=False,
            highlight=False,
        )
    err.print(f"loss curves of both runs: {path}", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
