"""lmlab's engine against HF transformers on the bundled models: the table of issue 3.

    python benchmarks/engine_vs_hf.py [--models smollm2-135m,gemma3-270m] [--threads 2]
                                      [--repeats 3] [--new-tokens 64] [--prompt-len 116]

Same machine, same weights (transformers reads the same GGUF file, dequantized to float), same
thread count, same prompt ids, greedy, in one run. Every number is timed by ``lmlab.bench``
(one place for timing): TTFT = call -> first token on the host, prefill tok/s = prompt tokens /
TTFT, decode tok/s = tokens after the first / (last token time - first token time); HF's
per-step times come from a streamer. Decode rates are the best of ``--repeats`` after one warm-up.
Prefill and TTFT are measured apart, with both engines' fp32 models loaded at once and their
first tokens timed in alternation (``--prefill-rounds``, median): prefill is compute-bound in the
same GEMM library for both, and engines timed minutes apart on a shared machine compare the
machine's drift more than the engines.

The roofline is the machine's fp32 mat-vec bandwidth (the fastest of the BLAS, oneDNN and lmlab's
native kernels over 1 GiB), measured again at the start of this run, since a shared machine's
bandwidth moves from hour to hour (``--cached-machine`` takes ``lmlab bench --machine``'s figure),
÷ the bytes of weights a decode step reads (every stored weight once, the tied embedding/head
once). This is a script that prints a table, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys

import torch

ROOFLINE_TARGET_PCT = 80.0


def measure_engine(make_runner, ids_b1, ids_b8, new_tokens, repeats, with_b8=True) -> dict:
    """Batch-1 and batch-8 points for one engine in one dtype (the model loaded once)."""
    from lmlab.bench.sweep import measure

    runner = make_runner()
    try:
        b1 = measure(runner, ids_b1, new_tokens, warmup=1, repeats=repeats)
        b8 = measure(runner, ids_b8, new_tokens, warmup=1, repeats=repeats) if with_b8 else None
        return {"b1": b1, "b8": b8, "weight_bytes": runner.weight_bytes}
    finally:
        runner.close()
        runner = None
        gc.collect()


def interleaved_ttft(make_runners, ids, rounds: int) -> dict:
    """Median first-token seconds per engine, the engines alternating round by round."""
    import statistics

    runners = {name: make() for name, make in make_runners.items()}
    try:
        times = {name: [] for name in runners}
        for r in range(rounds + 1):  # round 0 warms up
            for name, runner in runners.items():
                t = runner.trial(ids, 1).stamps[0]
                if r:
                    times[name].append(t)
        return {name: statistics.median(ts) for name, ts in times.items()}
    finally:
        for runner in runners.values():
            runner.close()
        gc.collect()


def bench_model(name: str, args, bandwidth_gb_s: float) -> list[tuple]:
    import lmlab
    from lmlab.bench.peers import HFRunner
    from lmlab.bench.sweep import LmlabRunner, bench_prompts
    from lmlab.errors import LmlabError

    lm = lmlab.load(name, dtype="float32")
    resolved = lm.resolved
    ids8 = bench_prompts(lm, 8, args.prompt_len)
    ids1 = ids8[:1]
    lm = None
    gc.collect()

    def lmlab_runner(dtype):
        return lambda: LmlabRunner(lmlab.load(name, dtype=dtype))

    def hf_runner(dtype):
        return lambda: HFRunner(resolved, dtype, "cpu")

    res = {}
    for engine, make in (("lmlab", lmlab_runner), ("hf", hf_runner)):
        for dtype in ("float32", "bfloat16"):
            print(f"  {name}: {engine} {dtype} ...", file=sys.stderr, flush=True)
            try:
                res[engine, dtype] = measure_engine(
                    make(dtype), ids1, ids8, args.new_tokens, args.repeats, with_b8=dtype == "float32"
                )
            except LmlabError as e:
                print(f"  {engine} {dtype} skipped: {e}", file=sys.stderr)
                res[engine, dtype] = None

    print(f"  {name}: prefill, lmlab and hf in alternation ...", file=sys.stderr, flush=True)
    ttft = interleaved_ttft({"lmlab": lmlab_runner("float32"), "hf": hf_runner("float32")}, ids1, args.prefill_rounds)
    prompt = len(ids1[0])
    for engine in ("lmlab", "hf"):
        if res.get((engine, "float32")):
            res[engine, "float32"]["b1"].update(ttft_ms=ttft[engine] * 1e3, prefill_tok_s=prompt / ttft[engine])

    def get(engine, dtype, batch, key):
        r = res.get((engine, dtype))
        if r is None or r[batch] is None:
            return None
        return r[batch][key]

    rows = []
    # (row, dtype, batch, metric, issue 3's target for lmlab ÷ HF)
    for label, dtype, batch, key, target in (
        ("fp32 batch-1 decode tok/s", "float32", "b1", "decode_tok_s", 1.4),
        ("bf16 batch-1 decode tok/s", "bfloat16", "b1", "decode_tok_s", 2.0),
        ("fp32 batch-8 decode tok/s (all rows)", "float32", "b8", "decode_tok_s", 1.5),
        (f"fp32 prefill tok/s ({args.prompt_len}-token prompt)", "float32", "b1", "prefill_tok_s", 1.0),
        (f"fp32 TTFT ms ({args.prompt_len}-token prompt)", "float32", "b1", "ttft_ms", 1.0),
    ):
        a, b = get("lmlab", dtype, batch, key), get("hf", dtype, batch, key)
        if key == "ttft_ms":
            ratio = b / a if a and b else None  # lower is better: HF ÷ lmlab, at least 1 = no worse
        else:
            ratio = a / b if a and b else None
        rows.append((name, label, a, b, ratio, target))
    fp32 = res.get(("lmlab", "float32"))
    if fp32:
        roof = bandwidth_gb_s * 1e9 / fp32["weight_bytes"]
        pct = 100 * fp32["b1"]["decode_tok_s"] / roof
        rows.append(
            (
                name,
                f"fp32 roofline tok/s ({bandwidth_gb_s:.1f} GB/s ÷ {fp32['weight_bytes'] / 1e6:.0f} MB)",
                roof,
                None,
                pct,
                None,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=116)
    ap.add_argument("--prefill-rounds", type=int, default=9, help="alternating first-token rounds (median)")
    ap.add_argument("--cached-machine", action="store_true", help="use the cached machine figures instead of measuring")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import transformers

    from lmlab.bench.machine import machine_limits

    machine = machine_limits(
        "cpu", threads, remeasure=not args.cached_machine, on_measure=lambda m: print(m, file=sys.stderr)
    )
    bw = machine["bandwidth_gb_s"]
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_model(name, args, bw)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(
        f"engine vs HF transformers · {machine['host']['cpu']} · {threads} threads · torch {torch.__version__} · "
        f"transformers {transformers.__version__} · python {platform.python_version()}"
    )
    kernels = [("oneDNN", machine.get("onednn_matvec_gb_s")), ("lmlab native", machine.get("native_matvec_gb_s"))]
    print(
        f"machine: {bw:.1f} GB/s fp32 mat-vec over 1 GiB (the fastest of BLAS {machine['matvec_gb_s']:.1f}"
        + "".join(f", {k} {v:.1f}" for k, v in kernels if v)
        + f"; a plain read: {machine['read_gb_s']:.1f}); matmul peak "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in machine["matmul_gflops"].items() if v)
        + (
            f" · load average (1, 5, 15 min) at the start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f},"
            f" at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            if load
            else ""
        )
    )
    print(
        f"prompt {args.prompt_len} tokens of stdlib source, {args.new_tokens} new tokens, greedy; decode: "
        f"best of {args.repeats} after 1 warm-up; prefill and TTFT: median of {args.prefill_rounds} rounds, "
        "lmlab and HF alternating"
    )
    print()
    w = max(len(r[1]) for r in rows) + 2
    head = f"{'model':<14}{'':<{w}}{'lmlab':>10}{'HF':>10}{'lmlab/HF':>10}{'target':>10}  met"
    print(head)
    print("-" * len(head))
    for model, label, a, b, ratio, target in rows:

        def f(x):
            return "-" if x is None else f"{x:,.1f}"

        if label.startswith("fp32 roofline"):
            met = "yes" if ratio is not None and ratio >= ROOFLINE_TARGET_PCT else "no"
            print(
                f"{model:<14}{label:<{w}}{f(a):>10}{'':>10}{f'{ratio:.0f}%':>10}"
                f"{f'≥{ROOFLINE_TARGET_PCT:.0f}%':>10}  {met}"
                "   (lmlab fp32 batch-1 decode as % of the roofline)"
            )
            continue
        r = "-" if ratio is None else f"{ratio:.2f}×"
        t = f"≥{target:.1f}×"
        met = "-" if ratio is None else ("yes" if ratio >= target else "no")
        print(f"{model:<14}{label:<{w}}{f(a):>10}{f(b):>10}{r:>10}{t:>10}  {met}")
    print()
    print("TTFT ratio is HF ÷ lmlab (≥1 means lmlab's first token comes no later).")


if __name__ == "__main__":
    main()
