"""lmlab's trainer against a plain PyTorch loop written the way nanoGPT's train.py is, in one run.

Part 1, speed: the same model (lmlab's Transformer, GPT-2 and Llama shapes), the same shapes, batch,
precision (float32), initialisation and batches, trained N steps by each side (at the presets' own
batches, nanogpt-baby 12 x 64 and 10M 16 x 256, then the 10M shapes at half theirs), each side in its
own process, the two taking turns a few steps at a time (``alternate.py``: the machine is
shared, so load falls on both alike; its own process lets each run as its tool runs it). The
plain loop is nanoGPT's: ``get_batch`` re-opens the memory map and stacks numpy slices each
step; AdamW as nanoGPT builds it on a CPU (decay on matrices only, ``fused`` only on CUDA, so
torch's per-parameter loop); the loss read back every step (``log_interval=1`` in the baby
config); clipping at 1.0; the model computed by PyTorch's own operations (model.py's lines,
``lmlab.fused`` off: layer or RMS norm, GELU or SwiGLU, RoPE and their gradients as autograd
takes them, which is what nanoGPT's model.py runs). lmlab's side is
``lmlab.train.loop.train_step`` on the pieces ``lmlab.train.train`` builds, inside
``keep_freed_memory`` as ``train`` runs it: fused AdamW (given the clipping as its grad_scale),
training's fused norm, activation, RoPE and causal attention (``lmlab.fused``), batches from one
memory map by index, the loss read back once per chunk, and each batch's rows split between the
threads (``lmlab.train.split``: a model replica and one torch thread each, where the loop runs
every operation on both threads). Both wall-clock tokens/s and the ratio of CPU seconds are
printed (the CPU ratio is the steadier one on a busy machine).

Part 2, the nanoGPT baby GPT (README: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000
iterations, char-level): ``lmlab train --preset nanogpt-baby`` on a character-level English
text every machine has (the standard library's docstrings; nanoGPT used Shakespeare), with
the validation loss, wall time, tokens/s and samples along the way.

    python benchmarks/train_vs_nanogpt.py                 # both parts
    python benchmarks/train_vs_nanogpt.py --part speed --steps 30 --chunk 5 --threads 1 --compile
    python benchmarks/train_vs_nanogpt.py --part share --threads 2   # the most a loop can gain
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alternate import Alternating, hold
from lmlab import fused
from lmlab.bench.machine import machine_limits
from lmlab.host import cpu_model, keep_freed_memory
from lmlab.model import Transformer
from lmlab.train import TrainConfig, train
from lmlab.train.config import model_config, preset_values
from lmlab.train.data import Batches, prepare
from lmlab.train.loop import (
    Dist,
    LossModel,
    count_parameters,
    flops_per_token,
    init_weights,
    make_optimizer,
    new_model,
    planned_workers,
    row_split,
    train_step,
)

SHAPES = {
    # name: (arch, n_layers, d_model, n_heads, block, batch). The presets' own batches (nanogpt-baby
    # and 10M, as `lmlab train --preset nanogpt-baby` and `--size 10M` run them), then the 10M
    # shapes at half that batch, where the step's fixed costs (the gradients' sum and norm, AdamW,
    # the wait for the slower share) weigh twice as much per token.
    "nanogpt-baby 0.8M": ("gpt2", 4, 128, 4, 64, 12),
    "10M GPT-2 (6x384)": ("gpt2", 6, 384, 6, 256, 16),
    "10M Llama (6x384)": ("llama", 6, 384, 6, 256, 16),
    "10M (6x384, block 256)": ("gpt2", 6, 384, 6, 256, 8),
    "llama 10M (6x384, 256)": ("llama", 6, 384, 6, 256, 8),
}


def docstring_text(path: Path) -> Path:
    """Every docstring of the standard library's non-test modules, one after another: ~English text."""
    if path.exists():
        return path
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for f in sorted(lib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(f.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- nanoGPT's loop


class NanoGPTLoop:
    """nanoGPT's train.py on lmlab's model: the same loop, line for line where it matters."""

    def __init__(self, tc: TrainConfig, data_dir: Path, vocab: int):
        torch.manual_seed(tc.seed)
        self.tc = tc
        self.model = model = Transformer(model_config(tc, vocab))
        init_weights(model, tc.n_layers)
        model.train()
        # configure_optimizers: decay 2-D parameters, not the others; fused only on CUDA
        decay = [p for p in model.parameters() if p.dim() >= 2]
        nodecay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": nodecay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=False)
        self.gen = torch.Generator().manual_seed(tc.seed)  # lmlab's sampler draws the same rows
        self.data_dir = data_dir
        self.X, self.Y = self.get_batch()

    def get_batch(self):
        block, batch = self.tc.block_size, self.tc.batch_size
        # "We recreate np.memmap every batch to avoid a memory leak"
        data = np.memmap(self.data_dir / "train.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block - 1, (batch,), generator=self.gen)
        x = torch.stack([torch.from_numpy((data[i : i + block]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block]).astype(np.int64)) for i in ix])
        return x, y

    def get_lr(self, it):
        tc = self.tc
        if it < tc.warmup:
            return tc.lr * (it + 1) / (tc.warmup + 1)
        if it > tc.steps:
            return tc.min_lr
        ratio = (it - tc.warmup) / (tc.steps - tc.warmup)
        return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)

    def step(self, it: int) -> float:
        tc, model, optimizer = self.tc, self.model, self.optimizer
        ctx = contextlib.nullcontext()  # float32
        for g in optimizer.param_groups:
            g["lr"] = self.get_lr(it)
        for _ in range(tc.grad_accum):
            with ctx:
                logits = model(self.X)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), self.Y.view(-1), ignore_index=-1)
                loss = loss / tc.grad_accum
            self.X, self.Y = self.get_batch()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() * tc.grad_accum  # log_interval = 1


class LmlabTrainer:
    """lmlab's training step (``lmlab.train.loop.train_step``) with the pieces ``train()`` builds."""

    def __init__(self, tc: TrainConfig, data):
        torch.manual_seed(tc.seed)
        self.tc = tc
        self.model = new_model(model_config(tc, data.vocab_size), torch.device("cpu"))
        self.opt = make_optimizer(self.model, tc, torch.device("cpu"))
        self.net = LossModel(self.model)
        if tc.compile:
            self.net = torch.compile(self.net)
        self.batches = Batches(data.train, tc.block_size, tc.batch_size, tc.seed)
        self.dist = Dist()
        workers = planned_workers(tc, model_config(tc, data.vocab_size), self.dist, tc.compile)
        self.split = row_split(self.model, workers, self.dist, "float32")

    def step(self, it: int):
        return train_step(self.net, self.model, self.opt, self.batches, self.tc, it, self.dist, "float32", self.split)


def _config(text: Path, shape: str, steps: int, compiled: bool) -> TrainConfig:
    arch, L, C, H, T, B = SHAPES[shape]
    return TrainConfig(
        data=str(text),
        arch=arch,
        n_layers=L,
        d_model=C,
        n_heads=H,
        block_size=T,
        batch_size=B,
        steps=steps + 1,
        warmup=10,
        lr=1e-3,
        min_lr=1e-4,
        dtype="float32",
        compile=compiled,
    )


def build_nano(args):
    """The nanoGPT-style loop, in its own process: plain PyTorch, nothing tuned."""
    tc, threads = args
    torch.set_num_threads(threads)
    fused.on = False  # PyTorch's own operations, as nanoGPT's model.py
    data = prepare(tc.data, tc.tokenizer)
    loop = NanoGPTLoop(tc, data.folder, data.vocab_size)
    return loop.step


def build_lmlab(args):
    """lmlab's training step, in its own process, as ``lmlab.train.train`` runs it: inside
    ``keep_freed_memory`` (the steps reuse their activations' memory)."""
    tc, threads = args
    torch.set_num_threads(threads)
    data = prepare(tc.data, tc.tokenizer)
    ours = LmlabTrainer(tc, data)
    hold(keep_freed_memory())
    return lambda it: float(ours.step(it))


def speed(
    text: Path, steps: int, chunk: int, peak: float, threads: int, shape: str = "all", compiled: bool = False
) -> list[str]:
    """Each side in its own process, ``chunk`` steps of one then ``chunk`` of the other, until each
    has run ``steps`` timed steps after one untimed (``benchmarks/alternate.py``)."""
    rows = []
    for name, (_, L, C, H, T, B) in SHAPES.items():
        if shape not in ("all", name):
            continue
        tc = _config(text, name, steps, compiled)
        data = prepare(tc.data, tc.tokenizer)  # once here, so the sides find it cached
        sides = Alternating({"nano": (build_nano, (tc, threads)), "ours": (build_lmlab, (tc, threads))})
        try:
            t = sides.run(warmup=1, steps=steps, chunk=chunk)
        finally:
            sides.close()
        tok = steps * tc.tokens_per_step
        tn, to = tok / t["nano"]["wall_s"], tok / t["ours"]["wall_s"]
        cpu_ratio = t["nano"]["cpu_s"] / t["ours"]["cpu_s"]
        fpt = flops_per_token(model_config(tc, data.vocab_size), T)
        n_params = count_parameters(model_config(tc, data.vocab_size))
        rows.append(
            f"{name:<24} {n_params / 1e6:5.2f}M  {B:>3}x{T:<4} {tn:>10,.0f} {to:>10,.0f} {to / tn:>6.2f}×  "
            f"{cpu_ratio:>6.2f}×  {100 * tn * fpt / peak / 1e9:5.1f}% {100 * to * fpt / peak / 1e9:5.1f}%  "
            f"{t['nano']['loss']:.4f} {t['ours']['loss']:.4f}"
        )
    return rows


def share(text: Path, reps: int = 10) -> None:
    """How much of the nanoGPT-style step is the model's forward and backward in PyTorch's own
    operations: the most a loop can gain over it without computing the model faster is
    step / (forward + backward)."""
    fused.on = False
    print("\nthe model's forward + backward against the whole plain step (CPU seconds, best of 3 x 10):")
    for name in SHAPES:
        tc = _config(text, name, 100, False)
        data = prepare(tc.data, tc.tokenizer)
        nano = NanoGPTLoop(tc, data.folder, data.vocab_size)
        for i in range(3):
            nano.step(i)
        X, Y = nano.X, nano.Y

        def forward_backward():
            logits = nano.model(X)
            F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1)).backward()
            nano.model.zero_grad(set_to_none=True)

        best = {}
        for _ in range(3):
            for part, fn in (("fb", forward_backward), ("step", lambda: nano.step(5))):
                t = time.process_time()
                for _ in range(reps):
                    fn()
                best[part] = min(best.get(part, math.inf), (time.process_time() - t) / reps)
        print(
            f"  {name:<24} forward+backward {best['fb'] * 1e3:8.1f} ms of the step's {best['step'] * 1e3:8.1f} ms = "
            f"{100 * best['fb'] / best['step']:3.0f}%: a loop doing nothing else is at most "
            f"{best['step'] / best['fb']:.2f}x"
        )


def baby(text: Path, steps: int, dtype: str) -> None:
    import shutil

    out = Path(tempfile.mkdtemp(prefix="lmlab-baby-")) / "out"
    shutil.rmtree(out, ignore_errors=True)
    values = {**preset_values("nanogpt-baby"), "steps": steps, "sample_every": 500, "sample_tokens": 200}
    tc = TrainConfig(data=str(text), out=str(out), dtype=dtype, **values)
    s = train(tc, progress=False)  # recorded: lmlab runs show last, lmlab train --compare
    print(
        f"\nnanogpt-baby on {text.name}: {s['steps']} steps, val loss {s['val_loss']:.4f} (train "
        f"{s['train_loss']:.4f}, unigram baseline {s['unigram_loss']:.3f}), {s['wall_s']:.0f} s wall, "
        f"{s['tokens_per_s']:,.0f} tok/s, MFU {100 * (s['mfu'] or 0):.1f}%, {s['precision']}, run {s['run_id']}"
    )
    for e in [p for p in s["points"] if "val_loss" in p]:
        print(f"  step {e['step']:>5}  val loss {e['val_loss']:.4f}")
    for smp in s["samples"]:
        print(f"--- sample at step {smp['step']} ---\n{smp['text'][:300]}")


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "share", "baby", "all"], default="all")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side (speed)")
    ap.add_argument("--chunk", type=int, default=5, help="steps of one side before the other's (speed)")
    ap.add_argument("--baby-steps", type=int, default=2000)
    ap.add_argument("--baby-dtype", default="auto", help="auto (bf16 where the CPU has it) | float32")
    ap.add_argument("--shape", choices=["all", *SHAPES], default="all")
    ap.add_argument("--compile", action="store_true", help="lmlab's side with torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--text", type=Path, default=Path(tempfile.gettempdir()) / "lmlab-stdlib-docstrings.txt")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = docstring_text(args.text)
    m = machine_limits("cpu", on_measure=lambda msg: print(msg, file=sys.stderr))
    peak = m["matmul_gflops"]["float32"]
    print(
        f"lmlab train vs a nanoGPT-style loop · {cpu_model()} · {torch.get_num_threads()} threads · torch "
        f"{torch.__version__} · fp32 matmul peak {peak:,.0f} GFLOP/s · text {text.name} "
        f"({text.stat().st_size / 1e6:.1f} MB, char-level)"
    )
    if args.part in ("speed", "all"):
        print(
            f"{args.steps} timed steps per side after one untimed, {args.chunk} of one side then {args.chunk} of the "
            f"other, float32, lmlab {'with' if args.compile else 'without'} torch.compile\n"
        )
        print(
            f"{'model':<24} {'params':>6}  {'batch':<8} {'nanoGPT':>10} {'lmlab':>10} {'ratio':>7}  "
            f"{'CPU s':>7}  {'MFU nG':>6} {'lmlab':>6}  loss nG / lmlab at the last step"
        )
        for row in speed(text, args.steps, args.chunk, peak, torch.get_num_threads(), args.shape, args.compile):
            print(row)
    if args.part in ("share", "all"):
        share(text)
    if args.part in ("baby", "all"):
        baby(text, args.baby_steps, args.baby_dtype)


if __name__ == "__main__":
    main()
