"""One of lmlab's training speedups on and off, in one process, alternating: is it worth keeping?

A change worth 1% of a training step is below this kind of machine's drift between runs (2% and
more within minutes), so a whole ``train_vs_nanogpt.py`` run cannot show it. Here one trainer
(``train_vs_nanogpt.LmlabTrainer``, lmlab's own step) runs ``--steps`` steps with the piece on,
then as many with it off, for ``--rounds`` rounds; the medians and the best of each side are
printed. Both sides share the process, the data and the weights' memory, so only the piece
differs (their losses differ slightly: the trainer keeps training through both).

    python benchmarks/train_ab.py --shape "nanogpt-baby 0.8M" --off attention --rounds 40
    python benchmarks/train_ab.py --shape "10M (6x384, block 256)" --off fused --rounds 6

Pieces (``--off``): attention (``fused.attention``), act-bias (the up projection's bias inside the
fused activation), adamw (``loop.adamw_step``: ``opt.step()`` instead), clip (the clipping handed
to the fused AdamW: ``clip_grad_norm_`` instead), linear (the Linear products' routes, each the fastest of
the BLAS, oneDNN and lmlab's gradient kernel: the BLAS's everywhere instead), fused (every ``lmlab.fused`` step),
split (each batch's rows split between the threads, ``lmlab.train.split``: all rows on all threads instead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lmlab.train.loop as loop
from lmlab import fused
from lmlab.host import keep_freed_memory
from lmlab.train.data import prepare
from train_vs_nanogpt import SHAPES, LmlabTrainer, _config, docstring_text


class _PlainLinear(nn.Linear):
    """An nn.Linear that MLP's ``type(proj) is nn.Linear`` test does not take: its bias goes
    through the projection again."""


def _switches(trainer: LmlabTrainer) -> dict:
    """Each piece's switch: a function that turns it on (True) or off (False)."""
    ups = [block.mlp.up for block in trainer.model.blocks]
    real = {"fits": fused.attention_fits, "adamw": loop.adamw_step, "clip": loop.clip_gradients}

    def clip_as_torch(model, opt, max_norm, split=None):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.grad_scale = None

    def attention(on):
        fused.attention_fits = real["fits"] if on else (lambda *a: False)

    def act_bias(on):
        for m in ups:
            m.__class__ = nn.Linear if on else _PlainLinear

    def adamw(on):
        loop.adamw_step = real["adamw"] if on else (lambda opt, split=None: opt.step())

    def clip(on):
        loop.clip_gradients = real["clip"] if on else clip_as_torch

    def every_fused(on):
        fused.on = on

    def linear(on):
        fused.route = None if on else fused.BLAS

    made = {"split": trainer.split}

    def split(on):
        # the rows split between threads (lmlab.train.split), made at the first switch where the
        # shape's share of work is below what the trainer splits by itself
        if on and made["split"] is None:
            made["split"] = loop.row_split(trainer.model, torch.get_num_threads(), trainer.dist, "float32")
        trainer.split = made["split"] if on else None

    return {
        "attention": attention,
        "act-bias": act_bias,
        "adamw": adamw,
        "clip": clip,
        "linear": linear,
        "fused": every_fused,
        "split": split,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="nanogpt-baby 0.8M")
    ap.add_argument(
        "--off", choices=["attention", "act-bias", "adamw", "clip", "linear", "fused", "split"], required=True
    )
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of one side in a round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=Path(tempfile.gettempdir()) / "lmlab-stdlib-docstrings.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tc = _config(docstring_text(args.text), args.shape, 2 * args.rounds * (args.steps + 1), False)
    data = prepare(tc.data, tc.tokenizer)
    with keep_freed_memory():
        trainer = LmlabTrainer(tc, data)
        switch = _switches(trainer)[args.off]
        ms = {True: [], False: []}
        step = 0
        for _ in range(args.rounds):
            for on in (True, False):
                switch(on)
                trainer.step(step)  # untimed: the first step after a switch
                t = time.perf_counter()
                for _ in range(args.steps):
                    step += 1
                    trainer.step(step)
                ms[on].append((time.perf_counter() - t) / args.steps * 1e3)
        switch(True)
    print(f"{args.shape} · {args.threads} threads · {args.rounds} rounds of {args.steps} steps a side · float32")
    for on, label in ((True, "on"), (False, f"off ({args.off})")):
        print(f"  {label:<20} median {statistics.median(ms[on]):8.2f} ms a step   best {min(ms[on]):8.2f}")
    gain = statistics.median(ms[False]) / statistics.median(ms[True])
    print(f"  off / on: {gain:.3f}x (medians)")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
