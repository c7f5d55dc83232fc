"""A fine-tuning run: ``lmlab finetune`` and ``lmlab.finetune.finetune(FinetuneConfig(...))``.

The steps, reused from ``lmlab.train`` where they are the same: the optimiser (AdamW, fused,
decay on matrices), the schedule (warmup then cosine), bf16 autocast, Ctrl-C handling and the
atomic checkpoint writer. What is new here:

- ``masked_loss``: the model's blocks over the batch, then the final norm and the unembedding
  only at the positions whose next token is trained (an SFT batch trains a fraction of its
  tokens, and the unembedding is a fifth of a small model's work), cross-entropy summed;
- ``heldout_loss``: the mean loss per trained token over the held-out rows;
- ``samples``: greedy answers to a few held-out prompts, before and after;
- a checkpoint holds the adapter alone (with ``--full``, the whole model) and the optimiser.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.finetune.data import Example, batch_at, collate, data_hash, load_examples, mask_preview, split
from lmlab.finetune.lora import LoRASpec, add_lora, lora_modules, lora_state, resolve_targets
from lmlab.host import keep_freed_memory
from lmlab.train.loss import linear_cross_entropy

CHECKPOINT = "checkpoint.pt"


@dataclass
class FinetuneConfig:
    model: str = "smollm2-135m"
    data: str = ""
    lora: str = "r=16,alpha=32,dropout=0,targets=all"  # LoRASpec.parse's text
    full: bool = False  # train every weight instead of an adapter
    epochs: int = 3
    steps: int = 0  # optimiser steps; 0: epochs × ceil(train rows / batch)
    batch_size: int = 8  # rows per step
    lr: float = 2e-4
    min_lr: float = 0.0  # the cosine decays to this at the last step
    warmup: int = -1  # steps of linear warmup; -1: 5% of the steps
    weight_decay: float = 0.0  # AdamW's, on matrices
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    max_len: int = 512  # tokens a row is cut to
    val_fraction: float = 0.02  # rows held out (at least one)
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | auto
    quant: str = "none"  # the base's weights: none (float32) | native (a GGUF file's blocks) | q8 | q4 (QLoRA-style)
    eval_every: int = 0  # steps between held-out losses; 0: at the end of each epoch
    log_every: int = 5  # steps between points of the loss curve
    samples: int = 3  # held-out prompts answered before and after
    sample_tokens: int = 32
    out: str = "finetune-out"
    save_adapter: str | None = None  # also write the adapter (PEFT format) here

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        for name in ("epochs", "batch_size", "max_len", "log_every"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if self.steps < 0 or self.eval_every < 0:
            raise LmlabError("--steps and --eval-every must be 0 or more.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise LmlabError(
                f"the learning rates must satisfy 0 <= min_lr <= lr, lr > 0; got {self.lr}, {self.min_lr}."
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise LmlabError(f"unknown --dtype {self.dtype!r}; use float32, bfloat16 or auto.")
        if self.quant not in ("none", "native", "q8", "q4"):
            raise LmlabError(f"unknown --quant {self.quant!r}; use none, native (a GGUF file's blocks), q8 or q4.")
        if self.full and self.quant != "none":
            raise LmlabError(
                f"--full trains every weight, and quantized weights (--quant {self.quant}) cannot be trained; "
                "drop --quant, or train a LoRA adapter over the quantized base."
            )


# ----------------------------------------------------------------------------- the loss


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block (B, T, C) for whole rows ``ids`` (B, T): the
    forward pass of ``Transformer.forward`` without a cache, hooks or the head."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    x = model.embed(ids, positions)
    ropes = model.rope_tables(positions, x.dtype)
    masks, is_causal = model._masks(B, T, 0, None, ids.device)  # causal; right padding needs no mask
    for i, block in enumerate(model.blocks):
        x = block(x, ropes.get(model._theta(i)), masks[model.cfg.layer_types[i]], is_causal, None, None)
    return x


def masked_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, trained tokens) of predicting ids[:, t] from ids[:, :t] where
    mask[:, t]; the head runs at those positions only. ids, mask: (B, T)."""
    h = hidden_states(model, ids[:, :-1])  # (B, T-1, C): position t predicts token t+1
    keep = mask[:, 1:]  # (B, T-1)
    targets = ids[:, 1:][keep]  # (N,)
    head = model.lm_head
    if isinstance(head, nn.Linear):  # a plain (or FastLinear) head: the loss without the (N, V) logits
        x = model.final_norm(h[keep])  # (N, C)
        loss = linear_cross_entropy(x, head.weight, targets, head.bias, model.cfg.final_logit_softcap)
        return loss, int(keep.sum())
    logits = model.head(h[keep][None])[0]  # (N, V): a quantized or adapted head
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(keep.sum())


@torch.no_grad()
def heldout_loss(model, examples: list[Example], batch_size: int, device, precision: str) -> float:
    """Mean cross-entropy per trained token over ``examples`` (nats)."""
    from lmlab.train.loop import autocast

    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask = collate(examples[i : i + batch_size])
        with autocast(device, precision):
            loss, k = masked_loss(model, ids.to(device), mask.to(device))
        total, n = total + float(loss), n + k
    model.train(was)
    return total / max(n, 1)


def prompt_ids(ex: Example) -> list[int]:
    """The tokens before the row's last trained span (its prompt); half the row for plain text."""
    if ex.kind == "text":
        return ex.ids[: max(1, len(ex.ids) // 2)]
    last = max(i for i, m in enumerate(ex.mask) if m)
    start = last
    while start > 0 and ex.mask[start - 1]:
        start -= 1
    return ex.ids[: max(1, start)]


def samples(lm, examples: list[Example], n_tokens: int) -> list[dict]:
    """Greedy answers of the model to each example's prompt, with the expected answer."""
    if not examples or n_tokens <= 0 or lm.tokenizer is None:
        return []
    was = lm.model.training
    lm.model.eval()
    prompts = [prompt_ids(ex) for ex in examples]
    results = lm.generate(prompts, max_new_tokens=n_tokens, temperature=0)  # one batch
    out = [
        {"line": ex.line, "prompt": lm.decode(ids), "expected": ex.answer, "output": r.text}
        for ex, ids, r in zip(examples, prompts, results)
    ]
    lm.model.train(was)
    return out


# ----------------------------------------------------------------------------- the run


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class _Schedule:
    """What ``lmlab.train.loop``'s lr_at and make_optimizer read, for this run."""

    def __init__(self, fc: FinetuneConfig, steps: int):
        self.lr, self.min_lr, self.steps = fc.lr, fc.min_lr, steps
        self.warmup = fc.warmup if fc.warmup >= 0 else max(0, round(0.05 * steps))
        self.weight_decay, self.beta1, self.beta2 = fc.weight_decay, fc.beta1, fc.beta2


class _Trainable(torch.nn.Module):
    """The parameters the optimiser updates (the adapter's, or every one with --full)."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def finetune(
    fc: FinetuneConfig,
    *,
    lm=None,
    resume: str | None = None,
    record: bool = True,
    log=_say,
    progress: bool | None = None,
    preview=None,
) -> dict:
    """Fine-tune ``fc.model`` on ``fc.data`` (or continue the run in ``resume``); returns the summary.

    ``lm``: an already loaded model to train (its model is changed: an adapter is added, or its
    weights trained). ``preview(text)``: shows the loss mask of the first row (default: ``log``).
    """
    from lmlab.runs import record_run
    from lmlab.train.checkpoint import save_checkpoint
    from lmlab.train.loop import _StopFlag, choose_precision

    t_start = time.perf_counter()
    state = None
    if resume is not None:
        state = _load_checkpoint(resume)
        fc = FinetuneConfig.from_dict({**state["config"], "out": str(Path(resume).expanduser())})
    fc.check()
    spec = None if fc.full else LoRASpec.parse(fc.lora)
    out = Path(fc.out).expanduser()
    if state is None and (out / CHECKPOINT).exists():
        raise LmlabError(
            f"{out} already holds a fine-tuning checkpoint; continue it with lmlab finetune --resume {out}, "
            "or pass another --out."
        )
    if lm is None:
        from lmlab.loading import load

        if fc.quant == "none":
            lm = load(fc.model, dtype="float32", prepack=False)  # training uses no packed copy
        else:
            lm = load(fc.model, quant=fc.quant, prepack=False)
    model, tok = lm.model, lm.tokenizer
    from lmlab.quant import is_quantized

    quantized = is_quantized(model)
    if quantized:
        if fc.full:
            raise LmlabError(
                f"{fc.model} is loaded with quantized weights, which --full cannot train; load it in float32."
            )
        from lmlab.finetune.quantbase import make_trainable

        make_trainable(model)  # gradients pass through the frozen quantized matrices, tile by tile
    if tok is None:
        raise LmlabError(f"{fc.model} has no tokenizer; fine-tuning reads text, so use a model folder with one.")
    device = lm.device
    precision = choose_precision(fc.dtype, device)
    if spec is not None:
        resolve_targets(model.cfg, spec.targets)  # a wrong target fails before the data is read

    examples = load_examples(fc.data, tok, fc.max_len)
    dhash = data_hash(fc.data)
    if state is not None and state["data_hash"] != dhash:
        raise LmlabError(f"--resume {out}: the data changed since that checkpoint; restore it or start a new run.")
    train_rows, val_rows = split(examples, fc.val_fraction, fc.seed)
    per_epoch = math.ceil(len(train_rows) / fc.batch_size)
    steps = fc.steps or fc.epochs * per_epoch
    sched = _Schedule(fc, steps)
    eval_every = fc.eval_every or per_epoch

    (preview or (lambda t: log(t.plain)))(mask_preview(tok, train_rows[0]))
    log(
        f"loss mask of line {train_rows[0].line} above: {sum(train_rows[0].mask)} of {len(train_rows[0].ids)} "
        "tokens are trained (coloured)"
    )

    # what trains
    for p in model.parameters():
        p.requires_grad_(fc.full)
    torch.manual_seed(fc.seed)  # the adapter's initial A, then dropout
    if spec is not None:
        if lora_modules(model):
            raise LmlabError("this model already has a LoRA adapter; load the base model without one to fine-tune.")
        add_lora(model, spec)
        lm.native_decode = False  # the native step reads the base weights and would skip the adapter
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train_params = sum(p.numel() for p in trainable)
    holder = _Trainable(trainable)
    from lmlab.train.loop import lr_at, make_optimizer

    opt = make_optimizer(holder, sched, device)
    start_step, history = 0, {"points": [], "evals": []}
    before: dict = {}
    if state is not None:
        _restore(model, state, spec)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step, history, before = state["step"], state["history"], state["before"]

    base_note = f" (quantized base, {getattr(lm, 'quant', 'quantized')}: QLoRA-style)" if quantized else ""
    log(
        f"{'full fine-tuning' if fc.full else 'LoRA ' + _spec_text(spec)} of {fc.model}{base_note}: "
        f"{n_train_params:,} trained parameters of {lm.num_parameters:,} · {len(train_rows)} train / "
        f"{len(val_rows)} held-out rows · {steps} steps of {fc.batch_size} rows · lr {fc.lr:g} · {precision}"
    )
    n_samples = val_rows[: fc.samples]
    if not before:
        before = {
            "val_loss": heldout_loss(model, val_rows, fc.batch_size, device, precision),
            "samples": samples(lm, n_samples, fc.sample_tokens),
        }
        log(f"before: held-out loss {before['val_loss']:.4f}")
        history["evals"].append({"step": 0, "val_loss": round(before["val_loss"], 6)})

    config_record = {
        **fc.to_dict(),
        "steps": steps,
        "precision": precision,
        "trained_parameters": n_train_params,
        "lora_spec": spec.to_dict() if spec else None,
        "base_quant": getattr(lm, "quant", "none") if quantized else "none",
    }
    inputs = {"data": str(fc.data), "data_hash": dhash, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    resolved = getattr(lm, "resolved", None)
    with (
        record_run(
            "finetune",
            model=fc.model,
            model_path=getattr(resolved, "path", None),
            config=config_record,
            seed=fc.seed,
            inputs=inputs,
            record=record,
        ) as run,
        _StopFlag() as stop,
        keep_freed_memory(),  # the next step reuses this step's activations' memory
    ):
        model.train()
        bar = _progress(progress, steps, start_step)
        step, interrupted = start_step, False
        t_train, tokens, last_loss = 0.0, 0, float("nan")

        def save(final: bool = False):
            out.mkdir(parents=True, exist_ok=True)
            ck = {
                "step": step,
                "config": fc.to_dict(),
                "lora": spec.to_dict() if spec else None,
                "weights": lora_state(model) if spec else model.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "data_hash": dhash,
                "history": history,
                "before": before,
            }
            save_checkpoint(ck, out / CHECKPOINT)

        def record_progress(after=None):
            evals = history["evals"]
            run.add_metrics(
                val_loss_before=round(before["val_loss"], 6),
                val_loss=evals[-1]["val_loss"],
                train_loss=last_loss if last_loss == last_loss else None,
                tokens_per_s=round(tokens / t_train, 1) if t_train else None,
                steps=step,
                points=history["points"],
            )
            run.outputs = {
                "out": str(out),
                "samples_before": before["samples"],
                "samples_after": (after or {}).get("samples", []),
                "resume": f"lmlab finetune --resume {out}",
            }
            run.checkpoint()

        try:
            while step < steps:
                lr = lr_at(step, sched)
                for g in opt.param_groups:
                    g["lr"] = lr
                rows = batch_at(train_rows, step, fc.batch_size, fc.seed)
                ids, mask = collate(rows, tok.pad_id or 0)
                t0 = time.perf_counter()
                from lmlab.train.loop import autocast

                with autocast(device, precision):
                    loss_sum, n_tok = masked_loss(model, ids.to(device), mask.to(device))
                loss = loss_sum / max(n_tok, 1)
                loss.backward()
                if fc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, fc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                last_loss = float(loss.detach())
                t_train += time.perf_counter() - t0
                tokens += int(sum(len(r.ids) for r in rows))
                step += 1
                if step % fc.log_every == 0 or step == steps:
                    history["points"].append({"step": step, "train_loss": round(last_loss, 6), "lr": lr})
                if step % eval_every == 0 and step < steps:
                    v = heldout_loss(model, val_rows, fc.batch_size, device, precision)
                    history["evals"].append({"step": step, "val_loss": round(v, 6)})
                    history["points"].append({"step": step, "val_loss": round(v, 6)})
                    _print(bar, log, f"step {step}/{steps} · train loss {last_loss:.4f} · held-out loss {v:.4f}")
                    save()
                    record_progress()
                if bar is not None:
                    bar.update(
                        bar.task_ids[0], completed=step, stats=f"loss {last_loss:.4f} · {tokens / t_train:,.0f} tok/s"
                    )
                if stop.set:
                    interrupted = True
                    break
        finally:
            if bar is not None:
                bar.stop()
        if interrupted:
            save()
            record_progress()
            log(
                f"interrupted at step {step}/{steps}; the checkpoint is saved in {out}. "
                f"Resume with: lmlab finetune --resume {out}"
            )
            raise KeyboardInterrupt
        after = {
            "val_loss": heldout_loss(model, val_rows, fc.batch_size, device, precision),
            "samples": samples(lm, n_samples, fc.sample_tokens),
        }
        history["evals"].append({"step": step, "val_loss": round(after["val_loss"], 6)})
        history["points"].append({"step": step, "val_loss": round(after["val_loss"], 6)})
        save(final=True)
        adapter_dirs = []
        if spec is not None:
            from lmlab.finetune.adapter import save_adapter

            for d in [out / "adapter", fc.save_adapter]:
                if d:
                    save_adapter(model, spec, d, base_name=_base_name(lm, fc.model))
                    adapter_dirs.append(str(d))
        else:
            from lmlab.finetune.export import save_merged

            save_merged(lm, out / "model")
        record_progress(after)
        run.add_metrics(val_loss_after=round(after["val_loss"], 6), wall_s=round(time.perf_counter() - t_start, 2))
        run.outputs["adapters"] = adapter_dirs
        summary = {
            "run_id": run.id,
            "steps": step,
            "val_loss_before": round(before["val_loss"], 6),
            "val_loss_after": round(after["val_loss"], 6),
            "train_loss": round(last_loss, 6) if last_loss == last_loss else None,
            "tokens_per_s": round(tokens / t_train, 1) if t_train else None,
            "samples_before": before["samples"],
            "samples_after": after["samples"],
            "out": str(out),
            "adapters": adapter_dirs,
            "model": str(out / "model") if fc.full else None,
            "trained_parameters": n_train_params,
            "wall_s": round(time.perf_counter() - t_start, 2),
            "points": history["points"],
        }
    return summary


def _spec_text(spec: LoRASpec) -> str:
    return f"r={spec.r} alpha={spec.alpha:g}{' (rsLoRA)' if spec.rslora else ''} on {','.join(spec.targets)}"


def _base_name(lm, fallback: str) -> str:
    resolved = getattr(lm, "resolved", None)
    return getattr(resolved, "hub_id", None) or fallback


def _load_checkpoint(target) -> dict:
    path = Path(target).expanduser()
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise LmlabError(f"--resume {target}: there is no checkpoint at {path}; pass the --out folder of a run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        raise LmlabError(
            f"--resume {path} could not be read ({type(e).__name__}); it is damaged: start a new run."
        ) from None
    if not isinstance(state, dict) or "config" not in state or "weights" not in state:
        raise LmlabError(f"--resume {path} is not an lmlab finetune checkpoint; pass the --out folder of a run.")
    return state


def _restore(model, state: dict, spec) -> None:
    with torch.no_grad():
        if spec is None:
            model.load_state_dict(state["weights"])
            return
        own = model.state_dict()
        for k, v in state["weights"].items():
            if k not in own or own[k].shape != v.shape:
                raise LmlabError(f"the checkpoint's adapter tensor {k} does not fit this model; start a new run.")
            own[k].copy_(v)


def _progress(show: bool | None, total: int, start: int):
    if not (show if show is not None else sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("finetune"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.add_task("finetune", total=total, completed=start, stats="")
    bar.start()
    return bar


def _print(bar, log, text: str) -> None:
    if bar is not None:
        bar.console.print(text, markup=False, highlight=False)
    else:
        log(text)
