"""The playground's speed in a real browser: issue 14's three targets, measured, in one table.

    python benchmarks/playground_speed.py [--model smollm2-135m] [--runs 5] [--tokens 64] [--threads 2]

1. Interactive: ``lmlab serve`` is started; as soon as its "ready at URL" line is read from its
   stderr (polled every 10 ms), a browser that was started before opens the URL; the page is
   interactive when its models are listed and its controls bound (``window.lmlab.readyAt``,
   the same machine's clock). Target: within 1 s of the URL being printed.
2. First token: greedy, 8 new tokens, the same prompt. The page's TTFT is from the moment it
   sends the request to the first token in the page (``window.lmlab.stats.ttft_ms``), median of
   --runs after one warm-up; beside it the server engine's own TTFT for those requests
   (``/lab/stats``), ``lmlab generate --json`` (the CLI, a fresh process per run, so its first
   forward is a cold one) and the same model in this process after a warm-up (the strict
   comparison). Target: the page at most 50 ms above the CLI.
3. Sampled -> shown: one --tokens generation (temperature 0.8, ignore_eos); for every token, the
   time it was shown in the page minus its ``t_ms`` (time.time() when the server sampled it).
   Target: within 30 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPT = "Once upon a time, in a small town by the sea, there lived"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """lmlab serve as a process; ``url_at`` is time.time() when its URL line was read (ms)."""

    def __init__(self, model: str, env: dict):
        cmd = [sys.executable, "-m", "lmlab.cli.main", "serve", "-m", model, "--port", str(free_port())]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.url = None
        self.url_at = None
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"ready at (http://\S+)/v1", line)
            if m and self.url is None:
                self.url_at = time.time() * 1000
                self.url = m.group(1)

    def wait_url(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("lmlab serve did not start:\n" + "".join(self.log))
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def page_generate(page, max_tokens: int, temperature: float, ignore_eos: bool) -> dict:
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.set_checked("#ignore_eos", ignore_eos)
    n = page.evaluate("window.lmlab.generations")
    page.click("#generate")
    page.wait_for_function(f"window.lmlab.generations > {n} && !window.lmlab.busy", timeout=600_000)
    return page.evaluate("window.lmlab.stats")


def cli_ttft(model: str, runs: int, env: dict) -> list[float]:
    out = []
    for _ in range(runs):
        cmd = [
            sys.executable,
            "-m",
            "lmlab.cli.main",
            "generate",
            "-m",
            model,
            "--json",
            "--no-record",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            PROMPT,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out.append(json.loads(r.stdout)["results"][0]["timings"]["ttft_ms"])
    return out


def in_process_ttft(model: str, runs: int) -> list[float]:
    import lmlab

    lm = lmlab.load(model, dtype="float32")
    lm.generate(PROMPT, max_new_tokens=8, temperature=0)  # warm-up
    return [lm.generate(PROMPT, max_new_tokens=8, temperature=0).timings["ttft_ms"] for _ in range(runs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed: run `make browser`.")
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, bypass_csp=True)
        serve = Serve(args.model, env)
        try:
            url = serve.wait_url()
            page.goto(url + "/")
            page.wait_for_function("window.lmlab && window.lmlab.ready", timeout=60_000)
            interactive = page.evaluate("window.lmlab.readyAt") - serve.url_at
            rows.append(
                (
                    "page interactive after the URL is printed",
                    f"{interactive:.0f} ms",
                    "<= 1000 ms",
                    interactive <= 1000,
                )
            )

            page.fill("#prompt", PROMPT)
            page.fill("#seed", "1")
            page_generate(page, 8, 0, False)  # warm-up: the server's first forward
            page_ttft, server_ttft = [], []
            for _ in range(args.runs):
                page_ttft.append(page_generate(page, 8, 0, False)["ttft_ms"])
                server_ttft.append(httpx.get(url + "/lab/stats").json()["last"]["ttft_ms"])

            stats = page_generate(page, args.tokens, 0.8, True)
            lags = sorted(stats["lags"])
        finally:
            serve.stop()
            browser.close()

    cli = cli_ttft(args.model, args.runs, env)
    warm = in_process_ttft(args.model, args.runs)
    med = statistics.median
    rows.append(("first token in the page (median)", f"{med(page_ttft):.0f} ms", "", None))
    rows.append(("  the server engine's TTFT of those requests", f"{med(server_ttft):.0f} ms", "", None))
    rows.append(("  lmlab generate (CLI, a fresh process each)", f"{med(cli):.0f} ms", "", None))
    rows.append(("  the same model in process, warm", f"{med(warm):.0f} ms", "", None))
    over_cli = med(page_ttft) - med(cli)
    over_warm = med(page_ttft) - med(warm)
    over_engine = med(page_ttft) - med(server_ttft)
    rows.append(("page minus the engine's own TTFT (HTTP, SSE, page)", f"{over_engine:+.0f} ms", "", None))
    rows.append(("page minus CLI", f"{over_cli:+.0f} ms", "<= +50 ms", over_cli <= 50))
    rows.append(("page minus in-process warm (stricter)", f"{over_warm:+.0f} ms", "<= +50 ms", over_warm <= 50))
    p95 = lags[min(len(lags) - 1, int(0.95 * len(lags)))]
    rows.append((f"sampled -> shown, {len(lags)} tokens: median", f"{med(lags):.1f} ms", "", None))
    rows.append(("  p95 / max", f"{p95:.1f} / {lags[-1]:.1f} ms", "<= 30 ms", lags[-1] <= 30))
    rows.append(("decode in the page (from t_ms)", f"{stats['decode_tok_s']:.1f} tok/s", "", None))

    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'measured':>16}  {'target':>10}  met")
    for name, value, target, met in rows:
        print(f"{name:{width}}  {value:>16}  {target:>10}  {'' if met is None else 'yes' if met else 'NO'}")
    print(
        f"model {args.model}, {args.threads} threads, prompt {PROMPT!r}, {args.runs} runs per median; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
