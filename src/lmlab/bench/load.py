"""A load generator for any OpenAI-compatible server: lmlab serve, vLLM, llama.cpp's server.

At each concurrency level, that many clients each send ``requests`` streaming completions one
after another (greedy, a fixed prompt, ``max_tokens`` each, EOS ignored where the server takes
``ignore_eos``), and every chunk's arrival time is kept. Reported per level:

- aggregate tokens/s: every client's tokens over the level's wall time;
- per-client tokens/s: each request's tokens after the first over its decode time (median);
- TTFT p50/p95: from sending the request to its first token;
- inter-token latency p50/p95: between consecutive tokens of a request;
- errors: requests that failed, with the first error's text.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from lmlab.errors import LmlabError


@dataclass
class RequestTiming:
    ttft_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each token, seconds from the request's start
    tokens: int = 0
    error: str | None = None


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stream_one(client, url: str, body: dict) -> RequestTiming:
    """Send one streaming completion and time its chunks (one chunk carries one or more tokens)."""
    import httpx

    timing = RequestTiming()
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                timing.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return timing
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
                lp = (choices[0].get("logprobs") or {}) if choices else {}
                n = len(lp.get("tokens") or []) or (1 if text else 0)
                if n:
                    now = time.perf_counter() - t0
                    if timing.ttft_s is None:
                        timing.ttft_s = now
                    timing.token_times += [now] * n
                    timing.tokens += n
    except httpx.HTTPError as e:
        timing.error = f"{type(e).__name__}: {e}"
    return timing


def run_level(
    url: str,
    model: str,
    concurrency: int,
    *,
    requests: int = 2,
    prompt: str = "Once upon a time",
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """One concurrency level: ``concurrency`` clients, ``requests`` streamed completions each."""
    import httpx

    base = url.rstrip("/").removesuffix("/v1") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # logprobs: 0 makes each chunk name its tokens, so chunks that carry several are counted right
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "logprobs": 0,
    }
    timings: list[RequestTiming] = []
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(headers=headers, timeout=timeout) as client:
            for _ in range(requests):
                t = stream_one(client, base, body)
                with lock:
                    timings.append(t)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = [t for t in timings if t.error is None and t.ttft_s is not None]
    errors = [t.error for t in timings if t.error is not None]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    per_client = [
        (t.tokens - 1) / (t.token_times[-1] - t.ttft_s) for t in ok if t.tokens > 1 and t.token_times[-1] > t.ttft_s
    ]
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": sum(t.tokens for t in ok),
        "wall_s": wall,
        "aggregate_tok_s": sum(t.tokens for t in ok) / wall if wall else 0.0,
        "per_client_tok_s": statistics.median(per_client) if per_client else 0.0,
        "ttft_p50_ms": _quantile([t.ttft_s for t in ok], 0.5) * 1e3,
        "ttft_p95_ms": _quantile([t.ttft_s for t in ok], 0.95) * 1e3,
        "itl_p50_ms": _quantile(itl, 0.5) * 1e3,
        "itl_p95_ms": _quantile(itl, 0.95) * 1e3,
    }


def load_test(url: str, model: str | None, levels: list[int], **kw) -> list[dict]:
    """Every concurrency level in turn (see ``run_level``); ``model`` None takes the server's first."""
    import httpx

    if not levels or any(c < 1 for c in levels):
        raise LmlabError(f"--concurrency takes positive whole numbers, e.g. 1,4,8,16; got {levels}.")
    if model is None:
        headers = {"Authorization": f"Bearer {kw['api_key']}"} if kw.get("api_key") else {}
        try:
            model = httpx.get(url.rstrip("/").removesuffix("/v1") + "/v1/models", headers=headers, timeout=30).json()[
                "data"
            ][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            raise LmlabError(f"could not list the models at {url}; is the server running? Name it with -m.") from None
    return [run_level(url, model, c, **kw) for c in levels]


LLAMACPP_SERVER_INSTALL = (
    "the llamacpp-server peer needs llama-cpp-python with its server extra: "
    "pip install 'llama-cpp-python[server]', or set LMLAB_LLAMACPP_PYTHON to a Python that has it."
)


def llamacpp_server_python() -> str:
    """The Python that runs llama-cpp-python's server (``$LMLAB_LLAMACPP_PYTHON`` or this one); one
    sentence if it cannot import ``llama_cpp.server``."""
    python = os.environ.get("LMLAB_LLAMACPP_PYTHON") or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        raise LmlabError(LLAMACPP_SERVER_INSTALL) from None
    if probe.returncode != 0:
        raise LmlabError(LLAMACPP_SERVER_INSTALL)
    return python


@contextlib.contextmanager
def llamacpp_server(gguf, *, alias: str, threads: int, n_ctx: int = 2048, timeout: float = 300.0):
    """llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``) on ``gguf``, on a free
    127.0.0.1 port, for as long as the block runs; yields its URL. The Python that runs it is
    ``$LMLAB_LLAMACPP_PYTHON`` or this one."""
    import httpx

    python = llamacpp_server_python()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_threads", str(threads), "--n_ctx", str(n_ctx)]
    # by default a new request cuts the one being answered short; queue them instead, so every
    # request gets all its tokens, as from lmlab serve
    cmd += ["--interrupt_requests", "False"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-600:].decode(errors="replace").strip()
                raise LmlabError(f"llama-cpp-python's server exited before it was ready: {tail}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LmlabError(f"llama-cpp-python's server was not ready after {timeout:.0f} s.")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
