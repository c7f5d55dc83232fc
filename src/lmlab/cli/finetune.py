"""`lmlab finetune`: LoRA or full fine-tuning on JSONL rows; `lmlab lora merge`: fold an adapter in.

The library does the work (``lmlab.finetune``); this module turns options into a FinetuneConfig
and prints the before/after comparison.
"""

from __future__ import annotations

import typer

from lmlab.cli.common import err, model_opt, one_model, out, print_json
from lmlab.errors import LmlabError

lora_app = typer.Typer(help="LoRA adapters: merge one into its base model.", no_args_is_help=True)


def finetune(
    model: str = typer.Argument(None, help="The base model: a name, HF folder or .gguf file."),
    model_option: str = model_opt(),
    data: str = typer.Option(None, "--data", help="JSONL rows: messages, prompt/completion or text."),
    lora: str = typer.Option(
        None, "--lora", help="r=16,alpha=32,dropout=0,targets=q,k,v,o,gate,up,down (rslora=1 for rsLoRA)."
    ),
    full: bool = typer.Option(False, "--full", help="Train every weight instead of a LoRA adapter."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training rows."),
    steps: int = typer.Option(0, "--steps", help="Optimiser steps (0: from --epochs)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 2e-4 with LoRA, 2e-5 with --full)."),
    warmup: int = typer.Option(-1, "--warmup", help="Warmup steps (-1: 5% of the steps)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay on matrices."),
    max_len: int = typer.Option(512, "--max-len", help="Tokens a row is cut to."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="Rows held out (at least one)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Steps between held-out losses (0: each epoch)."),
    samples: int = typer.Option(3, "--samples", help="Held-out prompts answered before and after."),
    sample_tokens: int = typer.Option(32, "--sample-tokens", help="Tokens per sample answer."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 (autocast) | auto."),
    quant: str = typer.Option(
        "none",
        "--quant",
        help="The frozen base's weights: none (float32) | native (a GGUF file's own blocks) | q8 | q4 "
        "(QLoRA-style: the adapter trains against the quantized weights and applies to the float base too).",
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same run."),
    out_dir: str = typer.Option("finetune-out", "--out", "-o", help="Checkpoint and adapter folder."),
    save_adapter: str = typer.Option(None, "--save-adapter", help="Also write the adapter (PEFT format) here."),
    resume: str = typer.Option(None, "--resume", help="Continue the run whose --out folder this is."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="The progress bar (default on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this run in the run store."),
):
    """Fine-tune a pretrained model with LoRA (or --full) and compare it before and after."""
    from lmlab.finetune.run import FinetuneConfig
    from lmlab.finetune.run import finetune as run_finetune

    model = one_model(model, model_option)
    if resume is None:
        if model is None:
            raise LmlabError("name the base model: lmlab finetune MODEL --data train.jsonl (or -m MODEL).")
        if data is None:
            raise LmlabError("--data is required: a JSONL file of messages, prompt/completion or text rows.")
        if full and lora:
            raise LmlabError("--full trains every weight and --lora an adapter; pass one of them.")
    fc = FinetuneConfig(
        model=model or "",
        data=data or "",
        full=full,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr if lr is not None else (2e-5 if full else 2e-4),
        warmup=warmup,
        weight_decay=weight_decay,
        max_len=max_len,
        val_fraction=val_fraction,
        eval_every=eval_every,
        samples=samples,
        sample_tokens=sample_tokens,
        dtype=dtype,
        quant=quant,
        seed=seed,
        out=out_dir,
        save_adapter=save_adapter,
    )
    if lora:
        fc.lora = lora

    def show(text):
        err.print(text, soft_wrap=True)

    summary = run_finetune(
        fc,
        resume=resume,
        record=not no_record,
        progress=progress,
        preview=show,
        log=lambda msg: err.print(msg, markup=False, highlight=False, soft_wrap=True),
    )
    if json_out:
        print_json(summary)
        return
    tps = f"{summary['tokens_per_s']:,.0f} tok/s" if summary.get("tokens_per_s") else "—"
    out.print(
        f"fine-tuned {summary['steps']} steps in {summary['wall_s']:.0f} s · held-out loss "
        f"{summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f} · {tps}",
        markup=False,
        highlight=False,
    )
    for b, a in zip(summary["samples_before"], summary["samples_after"]):
        out.print(f"--- line {a['line']}: {a['prompt'][-120:]!r}", markup=False, highlight=False)
        out.print(f"    expected {a['expected'][:120]!r}", markup=False, highlight=False)
        out.print(f"    before   {b['output'][:120]!r}", markup=False, highlight=False)
        out.print(f"    after    {a['output'][:120]!r}", markup=False, highlight=False)
    for d in summary["adapters"]:
        out.print(f"adapter (PEFT format): {d}", markup=False, highlight=False)
    if summary["adapters"]:
        d, m = summary["adapters"][-1], fc.model or "MODEL"
        out.print(
            f'use it: lmlab.load("{m}", adapter="{d}") · fold it in: lmlab lora merge {m} {d} -o DIR',
            markup=False,
            highlight=False,
        )
    if summary.get("model"):
        out.print(f"model: {summary['model']}", markup=False, highlight=False)


@lora_app.command("merge")
def lora_merge(
    model: str | None = typer.Argument(None, help="The base model the adapter was trained on (or -m)."),
    adapter: str | None = typer.Argument(None, help="The adapter folder (lmlab's or PEFT's)."),
    model_option: str | None = model_opt(),
    out_dir: str = typer.Option(..., "--out", "-o", help="The HF folder to write."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
):
    """Fold a LoRA adapter into its base model's weights and write a HF model folder:
    ``lmlab lora merge BASE ADAPTER -o OUT`` or ``lmlab lora merge -m BASE ADAPTER -o OUT``."""
    from lmlab.finetune.export import merge_adapter

    if model_option is not None and adapter is None:  # -m BASE ADAPTER: the one argument is the adapter
        model, adapter = None, model
    model = one_model(model, model_option)
    if model is None or adapter is None:
        raise LmlabError("name the base model and the adapter folder: lmlab lora merge BASE ADAPTER -o OUT.")
    summary = merge_adapter(model, adapter, out_dir)
    if json_out:
        print_json(summary)
    else:
        out.print(
            f"merged {summary['merged_modules']} adapted matrices of {adapter} into {model}: {out_dir}",
            markup=False,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.add_typer(lora_app, name="lora")
