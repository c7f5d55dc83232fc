"""lmlab serve under load against the same model in process: issue 13's speed table.

Starts ``lmlab serve`` on a free port with the bundled SmolLM2 (or --model), measures in-process
greedy generation (TTFT, decode tokens/s) on the same prompt, then streams through the server
with 1 client and with 8 concurrent clients (``lmlab.bench.load``), and prints one table:

    python benchmarks/serve_load.py [--model smollm2-135m] [--threads 2] [--max-tokens 64] [--levels 1,8]

Targets: one client decodes at >= 90% of in-process, with TTFT at most 20 ms above it; 8 clients
reach >= 3x one client's aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--requests", type=int, default=5, help="requests per client per level")
    args = ap.parse_args()

    import torch

    import lmlab
    from lmlab.bench.load import load_test

    torch.set_num_threads(args.threads)
    prompt = "Once upon a time, in a small town by the sea, there lived"
    lm = lmlab.load(args.model, dtype="float32")
    best = None
    for _ in range(3):
        r = lm.generate(prompt, max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        t = r.timings
        if best is None or t["decode_tok_s"] > best["decode_tok_s"]:
            best = t
    del lm

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "lmlab.cli.main",
        "serve",
        "-m",
        args.model,
        "--port",
        str(port),
        "--no-record",
        "--max-batch",
        "8",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                sys.exit(f"the server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        levels = [int(x) for x in args.levels.split(",")]
        load_test(url, args.model, [1], requests=1, prompt=prompt, max_tokens=8)  # warm-up
        rows = load_test(url, args.model, levels, requests=args.requests, prompt=prompt, max_tokens=args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(60)

    print(f"lmlab serve vs in-process · {args.model} · {args.threads} threads · {args.max_tokens} new tokens, greedy")
    print(f"in process: TTFT {best['ttft_ms']:.1f} ms, decode {best['decode_tok_s']:.1f} tok/s (best of 3)")
    head = (
        f"{'clients':>7} {'agg tok/s':>10} {'per-client':>11} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'ITL p50':>8} {'ITL p95':>8} {'errors':>6}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['concurrency']:>7} {r['aggregate_tok_s']:>10.1f} {r['per_client_tok_s']:>11.1f} "
            f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p95_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['itl_p95_ms']:>8.1f} "
            f"{r['errors']:>6}"
        )
    one = next((r for r in rows if r["concurrency"] == 1), None)
    if one:
        print(
            f"one client: decode {one['per_client_tok_s'] / best['decode_tok_s']:.0%} of in-process (target >= 90%), "
            f"TTFT +{one['ttft_p50_ms'] - best['ttft_ms']:.1f} ms (target <= 20 ms)"
        )
        for r in rows:
            if r["concurrency"] > 1:
                print(
                    f"{r['concurrency']} clients: {r['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x one client's "
                    "aggregate tokens/s (target >= 3x at 8)"
                )


if __name__ == "__main__":
    main()
