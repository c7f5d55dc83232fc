"""Matmul routes on the CPU for one model's weight shapes: the table in ``lmlab.kernels``.

    python benchmarks/linear_routes.py [--model smollm2-135m] [--threads 2] [--rows 1,2,8,116]

For every weight matrix of the model (one decode step's worth: each block's qkv, o, up and
down, then the lm_head) it times the whole set of matmuls through each route, with random
inputs of ``rows`` rows, best of 7 after 2 warm-ups:

- ``F.linear``: the BLAS on the plain row-major weight (what HF transformers runs);
- ``W @ x.T``: the transposed product lmlab's fallback uses for few bf16 rows;
- ``prepacked``: oneDNN on the weight reordered once (``lmlab.kernels``), lmlab's route for
  more than two rows;
- ``native``: lmlab's own mat-vec kernel (``lmlab.native``), its route for one or two rows.

GB/s is the weights' bytes ÷ the fastest route's time; speed-up is F.linear's time ÷ that. A
script that prints a table, not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def best_ms(fn, n: int = 7) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default="1,2,8,116")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import lmlab
    from lmlab import kernels, native
    from lmlab.host import host_details

    lm = lmlab.load(args.model, dtype="float32", prepack=False)
    shapes = [tuple(m.weight.shape) for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    lm = None
    print(
        f"{args.model}: {len(shapes)} weight matmuls per step · {host_details()['cpu']} · "
        f"{torch.get_num_threads()} threads · torch {torch.__version__} · native kernel {native.status()}"
    )
    print()
    head = (
        f"{'dtype':<10}{'rows':>6}{'F.linear ms':>14}{'W @ x.T ms':>13}{'prepacked ms':>15}{'native ms':>12}"
        f"{'GB/s':>8}{'speed-up':>10}"
    )
    print(head)
    print("-" * len(head))
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weights = [torch.randn(n, k, dtype=dtype) * 0.02 for n, k in shapes]
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            packed = None
            if kernels.prepack_supported(dtype, "cpu"):
                layers = []
                for w in weights:
                    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
                    layer.weight = torch.nn.Parameter(w, requires_grad=False)
                    layers.append(layer)
                kernels.prepack(torch.nn.ModuleList(layers))
                packed = layers
            for rows in [int(r) for r in args.rows.split(",")]:
                xs = {k: torch.randn(rows, k, dtype=dtype) for _, k in shapes}
                t_lin = best_ms(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
                t_wxt = best_ms(lambda: [(w @ xs[w.shape[1]].T).T for w in weights])
                t_pack = (
                    best_ms(lambda: [kernels.packed_linear(xs[m.weight.shape[1]], m) for m in packed])
                    if packed
                    else None
                )
                t_nat = (
                    best_ms(lambda: [native.linear(xs[w.shape[1]], w, None) for w in weights])
                    if native.available() and rows <= native.MAX_ROWS
                    else None
                )
                fastest = min(t for t in (t_lin, t_wxt, t_pack, t_nat) if t is not None)
                gbs = nbytes / (fastest / 1e3) / 1e9
                pk = "-" if t_pack is None else f"{t_pack:.1f}"
                nat = "-" if t_nat is None else f"{t_nat:.1f}"
                print(
                    f"{str(dtype).removeprefix('torch.'):<10}{rows:>6}{t_lin:>14.1f}{t_wxt:>13.1f}{pk:>15}{nat:>12}"
                    f"{gbs:>8.1f}{t_lin / fastest:>9.2f}×"
                )


if __name__ == "__main__":
    main()
