"""LoRA fine-tuning speed: lmlab against transformers + PEFT on the same model, data and settings.

Both train SmolLM2-135M (the bundled GGUF, dequantized to float32 and written once as a HF
folder that both load) with the same LoRA (rank, alpha, targets: every q/k/v/o/gate/up/down
projection), the same batches of token ids, the same loss mask, AdamW (fused) at the same
learning rate, gradient clipping at 1.0, in the same precision. Each side is timed in its own
process (``alternate.py``; lmlab's inside ``keep_freed_memory``, as ``lmlab finetune`` runs),
their steps alternating (so a change of the machine's load falls on both alike); after
``--warmup`` steps each, ``--steps`` optimiser steps each are timed. Peak memory is measured for
each side alone in its own process: the highest resident set size sampled (every 5 ms) during
two training steps.

Two kinds of batch: ``sft`` rows (a prompt, then a completion that carries the loss: the last
quarter of each row) and ``text`` rows (the loss on every token). Rows are real text (the
Python standard library's docstrings and source), cut to exactly ``--seq-len`` tokens, so
there is no padding on either side.

    python benchmarks/finetune_vs_peft.py [--batch 4] [--seq-len 128] [--steps 6] [--rank 16]
        [--dtype float32|bfloat16] [--kinds sft,text] [--threads 1]

Threads: 1 by default. On a machine whose cores are busy with other work, two OpenMP threads
wait on each other and measure the neighbours (README "Train" saw up to 7x); with quiet cores,
pass --threads 2 (or more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from alternate import Alternating, hold

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_folder(path: Path) -> None:
    """SmolLM2-135M as a float32 HF folder (once)."""
    if (path / "model.safetensors").is_file():
        return
    import lmlab
    from lmlab.finetune.export import save_merged

    save_merged(lmlab.load("smollm2-135m", dtype="float32"), path)


def batches(folder: Path, kind: str, n: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (ids (B, T), mask (B, T)) pairs of real text; mask: the last quarter (sft) or all (text)."""
    import sysconfig

    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(folder)
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in ("textwrap", "shlex", "glob", "argparse"))
    ids = torch.tensor(tok.encode(text, add_special=False))
    need = n * batch * seq
    if len(ids) < need:
        ids = ids.repeat(need // len(ids) + 1)
    rows = ids[:need].view(n, batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if kind == "sft":
        mask[:, : seq - seq // 4] = False
    mask[:, 0] = False
    return [(rows[i], mask.clone()) for i in range(n)]


class PeakRSS:
    """The highest resident set size (bytes) seen while it runs, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

        def watch():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def autocast(dtype: str):

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def lmlab_step(args):
    """lmlab's training step (LoRA on every projection) and the adapter's parameter count."""
    import lmlab
    from lmlab.finetune.lora import LoRASpec, add_lora
    from lmlab.finetune.run import masked_loss

    lm = lmlab.load(args.folder, dtype="float32", prepack=False)  # training uses no packed copy
    model = lm.model
    add_lora(model, LoRASpec(r=args.rank, alpha=2 * args.rank, targets=("all",)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    model.train()

    def step(ids, mask):
        with autocast(args.dtype):
            loss_sum, n = masked_loss(model, ids, mask)
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peft_step(args):
    """transformers + PEFT's training step, the same LoRA, the loss through ``labels`` (-100 off the mask)."""
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS_HF, lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    model.train()

    def step(ids, mask):
        labels = ids.masked_fill(~mask, -100)
        with autocast(args.dtype):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_side(args):
    """One side's step function ``step(i)`` (batch i) in its own process (``alternate.py``);
    lmlab's inside ``keep_freed_memory``, as ``lmlab finetune`` runs it."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(Path(args.folder), args.kind, args.warmup + args.steps, args.batch, args.seq_len)
    step = lmlab_step(args) if args.side == "lmlab" else peft_step(args)
    if args.side == "lmlab":
        from lmlab.host import keep_freed_memory

        hold(keep_freed_memory())
    return lambda i: step(*data[i])


def interleaved(args) -> dict:
    """Each side in its own process, their steps alternating one at a time (lmlab, PEFT, lmlab,
    ...), so a change of the machine's load falls on both alike; seconds summed per side."""
    builders = {side: (build_side, argparse.Namespace(**{**vars(args), "side": side})) for side in ("lmlab", "peft")}
    sides = Alternating(builders)
    try:
        t = sides.run(warmup=args.warmup, steps=args.steps, chunk=1)
    finally:
        sides.close()
    tokens = args.steps * args.batch * args.seq_len
    return {
        side: {
            "steps_per_s": args.steps / r["wall_s"],
            "tokens_per_s": tokens / r["wall_s"],
            "cpu_s_per_step": r["cpu_s"] / args.steps,
            "first_loss": r["first_loss"],
            "last_loss": r["loss"],
        }
        for side, r in t.items()
    }


def peak_memory(args, data) -> dict:
    """One side alone: the peak resident set size (MiB) while it trains ``--steps`` steps."""
    step = lmlab_step(args) if args.side == "lmlab" else peft_step(args)
    if args.side == "lmlab":
        from lmlab.host import keep_freed_memory

        hold(keep_freed_memory())
    step(*data[0])
    with PeakRSS() as mem:
        for i in range(1, 1 + args.steps):
            step(*data[i])
    return {"peak_rss_mib": mem.peak / 2**20}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.side == "both":
        sys.stdout.write(json.dumps(interleaved(args)) + "\n")
        return
    data = batches(Path(args.folder), args.kind, args.warmup + args.steps, args.batch, args.seq_len)
    result = peak_memory(args, data)
    sys.stdout.write(json.dumps(result) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kinds", default="sft,text")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--folder", default=None, help="SmolLM2 as a HF folder (default: written to a temp folder)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    folder = Path(args.folder or Path(tempfile.gettempdir()) / "lmlab-smollm2-135m-f32")
    make_folder(folder)
    print(
        f"SmolLM2-135M · LoRA r={args.rank} alpha={2 * args.rank} on {','.join(TARGETS_HF)} · batch {args.batch} x "
        f"{args.seq_len} tokens · {args.dtype} · {args.threads} thread(s) · {args.steps} timed steps",
        flush=True,
    )
    print(
        f"\n{'batch':6} {'side':22} {'steps/s':>8} {'tokens/s':>9} {'peak RSS':>10} {'loss first->last':>18}",
        flush=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    def run_child(side: str, kind: str, steps: int) -> dict:
        cmd = [sys.executable, __file__, "--side", side, "--kind", kind, "--folder", str(folder)]
        for k in ("batch", "seq_len", "warmup", "rank", "dtype", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        proc = subprocess.run([*cmd, "--steps", str(steps)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for kind in args.kinds.split(","):
        res = run_child("both", kind, args.steps)
        for side, name in (("lmlab", "lmlab"), ("peft", "transformers + PEFT")):
            r = res[side]
            r.update(run_child(side, kind, 2))
            print(
                f"{kind:6} {name:22} {r['steps_per_s']:8.3f} {r['tokens_per_s']:9.1f} "
                f"{r['peak_rss_mib']:8.0f} MiB {r['first_loss']:8.3f} -> {r['last_loss']:.3f}",
                flush=True,
            )
        ratio = res["lmlab"]["tokens_per_s"] / res["peft"]["tokens_per_s"]
        cpu = res["peft"]["cpu_s_per_step"] / res["lmlab"]["cpu_s_per_step"]
        print(f"{kind:6} {'lmlab / PEFT':22} {ratio:8.2f}x tokens/s ({cpu:.2f}x in CPU seconds)", flush=True)


if __name__ == "__main__":
    main()
