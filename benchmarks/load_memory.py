"""Load time and peak memory of the bundled models, per dtype: the loading table in README.

    python benchmarks/load_memory.py [--models smollm2-135m,gemma3-270m] [--dtypes float32,bfloat16] [--repeats 3]

Each load runs in a fresh process, so the peak RSS is that load's alone. "peak over baseline"
is the process's peak RSS minus its RSS after ``import lmlab, torch`` (the interpreter and
libraries), divided by the bytes of the loaded weights: 1.0 means the weights were read into
place with no second copy. The bar is 1.5. The load time is the best of --repeats, measured by
``lmlab.load`` itself (resolve, read the GGUF, dequantize, build the model, tokenizer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch
import lmlab

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

base = rss()
name, dtype = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
lm = lmlab.load(name, dtype=dtype)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
print(json.dumps({"load_s": wall, "base": base, "peak": peak, "weights": weights,
                  "file_bytes": lm.resolved.path.stat().st_size}))
"""


def measure(name: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, name, dtype], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {name} ({dtype}) failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    mb = 1e6
    print(
        f"{'model':<14} {'dtype':<9} {'file MB':>8} {'weights MB':>10} {'load s':>7} {'peak RSS MB':>11} "
        f"{'peak over baseline':>18}"
    )
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            runs = [measure(name, dtype) for _ in range(max(1, args.repeats))]
            best = min(runs, key=lambda r: r["load_s"])
            worst_ratio = max((r["peak"] - r["base"]) / r["weights"] for r in runs)
            print(
                f"{name:<14} {dtype:<9} {best['file_bytes'] / mb:>8.0f} {best['weights'] / mb:>10.0f} "
                f"{best['load_s']:>7.2f} {max(r['peak'] for r in runs) / mb:>11.0f} {worst_ratio:>17.2f}x"
            )


if __name__ == "__main__":
    main()
