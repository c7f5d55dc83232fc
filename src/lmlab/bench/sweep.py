"""A benchmark sweep: every (dtype, prompt length, batch, new tokens) point, timed the same way
for lmlab and its peers, and placed against the machine's own limits.

How each number is measured (one place for timing; the peers in ``peers.py`` use it too):

- **TTFT** (ms): from handing the prompt ids to the engine to the first generated token of the
  batch being on the host. It includes the KV-cache allocation, the prefill forward and sampling.
- **prefill tokens/s**: batch × prompt_len ÷ TTFT.
- **decode tokens/s**: batch × (new_tokens − 1) ÷ (time of the last token − time of the first),
  i.e. every token after the first, aggregated over the batch.
- **per-token latency p50/p95** (ms): the time between two consecutive decode steps (one step
  gives every row of the batch one token), pooled over the measured repeats.
- **repeats**: ``warmup`` runs are thrown away, then ``repeats`` runs; each rate is reported as the
  best run (``decode_tok_s``) and the median run (``decode_tok_s_median``).
- **peak memory**: on CPU the peak resident set size (VmHWM) of this process during the point,
  reset at the start of each point (Linux ``/proc/self/clear_refs``; elsewhere a 2 ms RSS sampler).
  Only that engine's model is loaded while it runs, so the number includes the weights, the KV
  cache, activations and the Python/torch runtime, like llama-bench's. llama.cpp runs in a child
  process and its own peak RSS is reported. On CUDA: max allocated (llama.cpp: its host RSS).
- **KV-cache bytes**: kv_bytes_per_token × batch × (prompt_len + new_tokens), in the engine's KV dtype.
- **achieved bandwidth** (GB/s): bytes read per decode step × decode steps/s, where bytes read per
  step = every weight byte once (tied embedding/lm_head counted once; an untied input embedding
  table is only gathered, so not counted) + the KV cache read at the step's mean context length.
  ``bandwidth_pct`` is that ÷ the machine's mat-vec bandwidth (``lmlab bench --machine``).
- **prefill FLOP/s**: (2 × block matmul params × tokens + 2 × lm_head params × batch (logits of
  the last position only) + 2 × batch × layers × heads × head_dim × prompt_len² (causal QKᵀ and
  PV)) ÷ TTFT; ``flops_pct`` is that ÷ the machine's GEMM peak in the same dtype.
"""

from __future__ import annotations

import gc
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from lmlab.bench.runner import Trial, stored_bytes, weight_bytes_per_step
from lmlab.engine.cache import kv_bytes_per_token, kv_dtype
from lmlab.errors import LmlabError
from lmlab.host import host_details

KNOWN_PEERS = ("hf", "llama.cpp")
QUANTS = ("none", "native", "q8", "q4")  # weight quantizations a sweep can run (lmlab.quant)


def parse_quant_list(text) -> list[str]:
    """'none,native,q8' -> ['none', 'native', 'q8'], or an LmlabError naming the unknown one."""
    names = [n.strip().lower() for n in str(text or "none").split(",") if n.strip()] or ["none"]
    for n in names:
        if n not in QUANTS:
            raise LmlabError(f"quantization {n!r} is not available; --quant takes {', '.join(QUANTS)}.")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- parsing


def parse_int_list(flag: str, text) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything else is one sentence naming the flag."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise LmlabError(f"{flag} takes a comma-separated list of positive integers like 1,4,16, got {text!r}.")
    return list(dict.fromkeys(values))


def parse_dtype_list(text) -> list[str]:
    """'float32,bf16' -> ['float32', 'bfloat16'] (canonical names)."""
    from lmlab.loading import parse_dtype

    if isinstance(text, (list, tuple)):
        text = ",".join(text)
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if not names:
        raise LmlabError(f"--dtype takes a comma-separated list like float32,bfloat16, got {text!r}.")
    return list(dict.fromkeys(str(parse_dtype(n)).removeprefix("torch.") for n in names))


def parse_peers(peers) -> list[str]:
    out = []
    for p in peers or []:
        for name in str(p).split(","):
            name = name.strip().lower()
            if not name:
                continue
            name = {
                "llamacpp": "llama.cpp",
                "llama_cpp": "llama.cpp",
                "llama-cpp": "llama.cpp",
                "transformers": "hf",
            }.get(name, name)
            if name not in KNOWN_PEERS:
                raise LmlabError(f"unknown peer {name!r}; use --peer hf or --peer llama.cpp.")
            if name not in out:
                out.append(name)
    return out


# ----------------------------------------------------------------------------- model arithmetic


@dataclass
class ModelShape:
    """The counts FLOPs and bytes are computed from (independent of how weights are stored)."""

    n_layers: int
    n_heads: int
    head_dim: int
    block_matmul_params: int  # weights multiplied per token in the blocks (q, k, v, o, MLP)
    head_params: int  # the lm_head (d_model × vocab)

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        H, K, D, C, Fd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
        per_layer = C * (H + 2 * K) * D + H * D * C + C * Fd * (3 if cfg.mlp == "gated" else 2)
        return cls(cfg.n_layers, H, D, per_layer * cfg.n_layers, C * cfg.vocab_size)

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        """FLOPs of a prefill: matmuls on every prompt token, logits of the last one, causal attention."""
        attn = 2 * batch * self.n_layers * self.n_heads * self.head_dim * prompt_len**2
        return 2 * self.block_matmul_params * batch * prompt_len + 2 * self.head_params * batch + attn

    def decode_step_flops(self, batch: int, context: float) -> float:
        """FLOPs of one decode step with ``context`` tokens cached."""
        attn = 4 * batch * self.n_layers * self.n_heads * self.head_dim * context
        return 2 * (self.block_matmul_params + self.head_params) * batch + attn


def estimate_memory(cfg, weight_bytes: int, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes one point needs at its peak (the prefill): weights + KV cache + activations.

    Activations: the widest per-token tensors of one layer live at once (residual, norm, q/k/v,
    attention output, MLP hidden ×3 when gated) for every prompt token, the attention mask
    and fused-attention blocks, and float32 copies of the last position's logits for sampling.
    """
    e = torch.empty((), dtype=dtype).element_size()
    kv = kv_bytes_per_token(cfg, dtype) * batch * (prompt_len + new_tokens)
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    width = 4 * cfg.d_model + (H + 2 * K) * D + H * D + (3 if cfg.mlp == "gated" else 2) * cfg.d_ff
    tokens = batch * prompt_len
    act = tokens * width * e
    act += prompt_len * (prompt_len + new_tokens)  # boolean causal mask
    act += batch * H * prompt_len * min(prompt_len, 512) * 4  # attention score blocks
    act += 4 * batch * cfg.vocab_size * 4  # logits, log-probs, entropy in float32
    return {
        "weights": int(weight_bytes),
        "kv_cache": int(kv),
        "activations": int(act),
        "total": int(weight_bytes + kv + act),
    }


def available_memory(device: torch.device, held_bytes: int = 0) -> int:
    """Bytes a point may use: free RAM (psutil) or free CUDA memory, plus what this process already
    holds for the model being measured (it is counted in the estimate)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + held_bytes
    import psutil

    return int(psutil.virtual_memory().available) + held_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 0.95e8 else f"{n / 1e9:.2f} GB"


def check_points_fit(cfg, points, weight_bytes_of, device, held_bytes: int = 0) -> None:
    """Refuse, before anything runs, a point longer than the context or too big for memory."""
    ctx = cfg.max_seq_len
    avail = None
    for dtype, batch, prompt_len, new_tokens in points:
        if prompt_len + new_tokens > ctx:
            raise LmlabError(
                f"prompt {prompt_len} + {new_tokens} new tokens = {prompt_len + new_tokens} tokens is longer than "
                f"this model's context of {ctx} tokens; lower --prompt-len or --new-tokens."
            )
    for dtype, batch, prompt_len, new_tokens in points:
        est = estimate_memory(cfg, weight_bytes_of(dtype), getattr(torch, dtype), batch, prompt_len, new_tokens)
        if avail is None:
            avail = available_memory(device, held_bytes)
        if est["total"] > 0.9 * avail:
            where = "GPU memory" if device.type == "cuda" else "RAM"
            raise LmlabError(
                f"batch {batch} × prompt {prompt_len} (+{new_tokens} new tokens, {dtype}) "
                f"needs about {_gb(est['total'])} "
                f"(weights {_gb(est['weights'])} + KV cache {_gb(est['kv_cache'])} "
                f"+ activations {_gb(est['activations'])}) "
                f"but {_gb(avail)} of {where} is available; lower --batch or --prompt-len."
            )


# ----------------------------------------------------------------------------- prompts

PROMPT_MODULES = ("argparse", "textwrap", "dataclasses", "inspect", "typing", "json.decoder", "functools")


def prompt_text() -> str:
    """Real text every machine has: the Python standard library's own source and docstrings."""
    import importlib
    import inspect

    parts = []
    for name in PROMPT_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError, ImportError):
            continue
    return "\n\n".join(parts) or ("The quick brown fox jumps over the lazy dog. " * 2000)


def bench_prompts(lm, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of exactly ``prompt_len`` token ids: stdlib source cut at different offsets
    (each row a different text), or random ids for a model without a tokenizer."""
    cfg = lm.config
    if lm.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        low = 3 if cfg.vocab_size > 8 else 0
        return torch.randint(low, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    stream = _token_stream(lm)
    tok = lm.tokenizer
    bos = getattr(tok, "bos_id", cfg.bos_token_id)
    prefix = [bos] if bos is not None and getattr(tok, "add_bos", False) else []  # what encode() would prepend
    body = prompt_len - len(prefix)
    if body <= 0:
        return [prefix[:prompt_len]] * batch
    rows = []
    span = max(1, len(stream) - body)
    for i in range(batch):
        off = (i * 7919) % span
        ids = stream[off : off + body]
        while len(ids) < body:  # a text shorter than the prompt: repeat it
            ids += stream[: body - len(ids)]
        rows.append(prefix + ids)
    return rows


_STREAMS: dict[int, list[int]] = {}


def _token_stream(lm) -> list[int]:
    key = id(lm.tokenizer)
    if key not in _STREAMS:
        _STREAMS.clear()
        _STREAMS[key] = lm.encode(prompt_text(), add_special=False)
    return _STREAMS[key]


# ----------------------------------------------------------------------------- timing


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field_name: str, pid="self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm(pid="self") -> bool:
    """Reset a process's peak RSS to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM", pid) is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory while the block runs: process peak RSS on CPU, max allocated on CUDA (bytes)."""

    method = ""

    def __init__(self, device, pid: int | None = None):
        self.device = torch.device(device)
        self.pid = pid or "self"  # a peer running in a child process is measured there
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda" and self.pid == "self":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        gc.collect()
        _malloc_trim()  # give freed heap pages back so the previous point's peak does not linger
        if _reset_hwm(self.pid):
            self.method = "peak RSS (VmHWM, reset per point)"
            self._thread = None
        else:  # no clear_refs: sample the RSS
            import psutil

            self.method = "peak RSS (sampled every 2 ms)"
            proc, self._stop = psutil.Process(None if self.pid == "self" else self.pid), threading.Event()

            def sample():
                while not self._stop.is_set():
                    self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and self.pid == "self":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is None:
            self.peak_bytes = _status_bytes("VmHWM", self.pid) or 0
        else:
            self._stop.set()
            self._thread.join()
        return False


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def _percentile(xs, q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; 0 for an empty list."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(trials: list[Trial]) -> dict:
    """Best and median of each rate over the measured trials, and the step-latency percentiles."""
    B, P = trials[0].batch, trials[0].prompt_len
    ttft = [t.ttft_s for t in trials]
    dec = [B * t.decode_steps / t.decode_s for t in trials if t.decode_steps > 0 and t.decode_s > 0]
    steps = [s for t in trials for s in t.step_latencies_s]
    return {
        "ttft_ms": min(ttft) * 1e3,
        "ttft_ms_median": _median(ttft) * 1e3,
        "prefill_tok_s": B * P / min(ttft),
        "prefill_tok_s_median": B * P / _median(ttft),
        "decode_tok_s": max(dec) if dec else 0.0,
        "decode_tok_s_median": _median(dec),
        "p50_ms": _percentile(steps, 0.50) * 1e3,
        "p95_ms": _percentile(steps, 0.95) * 1e3,
        "decode_steps": trials[0].decode_steps,
        "repeats": len(trials),
    }


def measure(runner, ids: list[list[int]], new_tokens: int, warmup: int, repeats: int, tick=None) -> dict:
    """Run ``warmup`` untimed trials then ``repeats`` timed ones; the summary plus peak memory."""
    with PeakMemory(runner.device, getattr(runner, "pid", None)) as mem:
        for _ in range(warmup):
            runner.trial(ids, new_tokens)
            if tick:
                tick()
        trials = []
        for _ in range(repeats):
            trials.append(runner.trial(ids, new_tokens))
            if tick:
                tick()
    return {**summarize(trials), "peak_mem_bytes": mem.peak_bytes, "peak_mem_method": mem.method}


# ----------------------------------------------------------------------------- lmlab as a runner


class LmlabRunner:
    """lmlab's engine, greedy, timed per step through the streamed token events."""

    engine = "lmlab"

    def __init__(self, lm):
        self.lm = lm
        self.device = lm.device
        self.dtype = str(lm.dtype).removeprefix("torch.")
        self.weight_bytes = weight_bytes_per_step(lm.model)
        self.stored_bytes = stored_bytes(lm.model)
        self.kv_dtype = kv_dtype(lm.dtype, lm.device)
        self.matmul_dtype = self.dtype
        self.quant = getattr(lm, "quant", "none")

    def trial(self, ids: list[list[int]], new_tokens: int) -> Trial:
        from lmlab.engine.generate import Generation

        lm, B = self.lm, len(ids)
        stamps = []
        t0 = time.perf_counter()
        gen = Generation(lm, [list(r) for r in ids], max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        n = 0
        for ev in gen.events():
            if ev.seq == 0:  # one step yields one event per row, row 0 first
                stamps.append(time.perf_counter() - t0)
            n += 1
        if n != B * new_tokens:
            raise RuntimeError(f"lmlab generated {n} tokens, expected {B * new_tokens}: a sequence stopped early")
        return Trial(B, len(ids[0]), stamps)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepSpec:
    model: str
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_lens: list[int] = field(default_factory=lambda: [64])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    quant: str = "none"
    peers: list[str] = field(default_factory=list)
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        # an unknown scheme fails when the spec is built, before anything loads
        self.quants = parse_quant_list(self.quant)

    def grid(self, dtype: str):
        for prompt_len in self.prompt_lens:
            for batch in self.batches:
                for new_tokens in self.new_tokens:
                    yield dtype, batch, prompt_len, new_tokens


def derive(
    point: dict, shape: ModelShape, weight_bytes: int, kv_per_token: int, machine: dict | None, matmul_dtype: str | None
) -> dict:
    """Add KV bytes, achieved bandwidth, FLOP/s and their % of the machine to a measured point."""
    B, P, N = point["batch"], point["prompt_len"], point["new_tokens"]
    mean_ctx = P + N / 2
    bytes_per_step = weight_bytes + kv_per_token * B * mean_ctx
    steps_s = point["decode_tok_s"] / B if point["decode_tok_s"] else 0.0
    d_flops = shape.decode_step_flops(B, mean_ctx)
    p_flops = shape.prefill_flops(B, P)
    p_bytes = weight_bytes + kv_per_token * B * P
    point.update(
        {
            "kv_cache_bytes": int(kv_per_token * B * (P + N)),
            "weight_bytes_per_step": int(weight_bytes),
            "bytes_per_step": int(bytes_per_step),
            "bandwidth_gb_s": bytes_per_step * steps_s / 1e9,
            "decode_tflops": d_flops * steps_s / 1e12,
            "decode_intensity": d_flops / bytes_per_step,  # FLOP/byte
            "prefill_tflops": p_flops / (point["ttft_ms"] / 1e3) / 1e12,
            "prefill_intensity": p_flops / p_bytes,
        }
    )
    bw = (machine or {}).get("bandwidth_gb_s")
    peak = ((machine or {}).get("matmul_gflops") or {}).get(matmul_dtype) if matmul_dtype else None
    point["bandwidth_pct"] = 100 * point["bandwidth_gb_s"] / bw if bw else None
    point["flops_pct"] = 100 * point["prefill_tflops"] * 1e3 / peak if peak else None
    return point


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(spec: SweepSpec, *, progress=None, on_point=None, log=None, load=None) -> dict:
    """Run every point of the sweep for lmlab and each peer; returns {"points", "machine", "host", "notes"}.

    progress(total=..., advance=..., description=...): called to drive a progress bar.
    on_point(point): called after each point (the CLI checkpoints the run record there).
    log(message): one-line notes for stderr (a machine measured, a peer skipping a batch size).
    load(dtype) -> LM: how to load the model (the CLI shows a spinner); default ``lmlab.load``.
    The sweep holds the only reference, so each model is freed before the next engine loads.
    """
    import lmlab
    from lmlab.bench.machine import machine_limits
    from lmlab.bench.peers import make_peer, peer_check
    from lmlab.loading import parse_device

    log = log or (lambda msg: None)
    progress = progress or (lambda **kw: None)
    peers = parse_peers(spec.peers)
    if spec.repeats < 1 or spec.warmup < 0:
        raise LmlabError(f"--repeats must be at least 1 and --warmup at least 0, got {spec.repeats} and {spec.warmup}.")
    if spec.threads is not None:
        if spec.threads < 1:
            raise LmlabError(f"--threads must be at least 1, got {spec.threads}.")
        torch.set_num_threads(spec.threads)
    threads = torch.get_num_threads()
    device = parse_device(spec.device)
    load = load or (lambda dtype, quant=None: lmlab.load(spec.model, dtype=dtype, device=device, quant=quant))
    for p in peers:  # a peer that is not installed fails before anything is measured
        peer_check(p)

    notes: list[str] = []
    machine = machine_limits(device, threads, on_measure=log)
    host = host_details(device, threads)

    dtypes = list(spec.dtypes)
    lm = load(dtypes[0])
    cfg = lm.config
    for p in peers:  # a peer that cannot run on these weights says so before anything is measured
        peer_check(p, lm)

    # every check on every point before the first is measured
    grid = [pt for d in dtypes for pt in spec.grid(d)]
    first_bytes, first_elem = stored_bytes(lm.model), lm.model.tok_embed.weight.element_size()
    elem_of = lambda d: torch.empty((), dtype=getattr(torch, d)).element_size()  # noqa: E731
    check_points_fit(cfg, grid, lambda d: first_bytes * elem_of(d) // first_elem, device, held_bytes=first_bytes)

    shape = ModelShape.from_config(cfg)
    max_b, max_p = max(spec.batches), max(spec.prompt_lens)
    all_ids = bench_prompts(lm, max_b, max_p)
    resolved = lm.resolved
    per_point = spec.warmup + spec.repeats
    n_peer_points = 0
    for p in peers:
        n_peer_points += len(grid) if p == "hf" else len([1 for _, b, _, _ in spec.grid(dtypes[0]) if b == 1])
    n_quant = len([q for q in spec.quants if q != "none"])
    n_lmlab = (len(grid) if "none" in spec.quants else 0) + n_quant * len(list(spec.grid("float32")))
    progress(total=(n_lmlab + n_peer_points) * per_point)

    points: list[dict] = []
    model_name = spec.model

    def run_engine(runner, dtype_pts, label: str, kv_dtype, matmul_dtype):
        for dtype, batch, prompt_len, new_tokens in dtype_pts:
            ids = [row[:prompt_len] for row in all_ids[:batch]]
            progress(description=f"{label} b{batch} p{prompt_len} n{new_tokens}")
            m = measure(runner, ids, new_tokens, spec.warmup, spec.repeats, tick=lambda: progress(advance=1))
            pt = {
                "model": model_name,
                "engine": runner.engine,
                "peer": None if runner.engine == "lmlab" else runner.engine,
                "dtype": runner.dtype,
                "quant": getattr(runner, "quant", "none") if runner.engine == "lmlab" else None,
                "device": str(device),
                "threads": threads,
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                **m,
            }
            derive(pt, shape, runner.weight_bytes, kv_bytes_per_token(cfg, kv_dtype), machine, matmul_dtype)
            points.append(pt)
            if on_point:
                on_point(pt)

    for quant in [q for q in spec.quants if q != "none"]:  # quantized weights: float32 activations
        lm = None  # one engine's model in memory at a time (the float one loads again below)
        _free()
        q_lm = load(None, quant)
        runner = LmlabRunner(q_lm)
        run_engine(runner, list(spec.grid("float32")), f"lmlab {quant}", q_lm.dtype, runner.matmul_dtype)
        q_lm = runner = None
        _free()
    if "none" not in spec.quants:
        dtypes = []  # quantized rows only (the first dtype's model gave the config and the prompts)
    for i, dtype in enumerate(dtypes):
        if i > 0 or lm is None:
            lm = load(dtype)
        runner = LmlabRunner(lm)
        run_engine(runner, list(spec.grid(dtype)), f"lmlab {dtype}", lm.dtype, runner.matmul_dtype)
        # only one engine's model in memory at a time: peak memory stays per engine
        lm = runner = None
        _free()
        if "hf" in peers:
            peer = make_peer("hf", resolved=resolved, dtype=dtype, device=device, threads=threads, cfg=cfg)
            run_engine(peer, list(spec.grid(dtype)), f"hf {dtype}", getattr(torch, dtype), dtype)
            peer.close()
            peer = None
            _free()
    if "llama.cpp" in peers:
        pts = [pt for pt in spec.grid(dtypes[0]) if pt[1] == 1]
        if len(pts) < len(list(spec.grid(dtypes[0]))):
            note = (
                "llama.cpp runs batch 1 only (llama-cpp-python has no batched generate); "
                "its larger batches are left out."
            )
            notes.append(note)
        if pts:
            n_ctx = max(p + n for _, _, p, n in pts) + 8
            peer = make_peer(
                "llama.cpp", resolved=resolved, dtype=None, device=device, threads=threads, cfg=cfg, n_ctx=n_ctx
            )
            run_engine(peer, pts, "llama.cpp", torch.float16, None)
            peer.close()
            _free()

    add_ratios(points, peers)
    # side by side: each (prompt, batch, new tokens) block lists lmlab per dtype, then each peer
    engines = ["lmlab", *peers]
    points.sort(
        key=lambda p: (
            p["prompt_len"],
            p["batch"],
            p["new_tokens"],
            engines.index(p["engine"]),
            dtypes.index(p["dtype"]) if p["dtype"] in dtypes else len(dtypes),
        )
    )
    notes.append(f"peak memory: {points[0]['peak_mem_method'] if points else ''}; one engine's model loaded at a time")
    return {"points": points, "machine": machine, "host": host, "notes": notes}


def peer_key(peer: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", peer.lower())


def add_ratios(points: list[dict], peers: list[str]) -> None:
    """On each lmlab point: ratio_vs_<peer> = lmlab decode tok/s ÷ the peer's, and
    ratio_vs_<peer>_prefill for prefill tok/s, at the same batch, prompt and new tokens (and the
    same dtype for hf; llama.cpp runs the GGUF's own quantization)."""
    for pt in points:
        if pt["engine"] != "lmlab":
            continue
        for peer in peers:
            match = [
                q
                for q in points
                if q["engine"] == peer
                and q["batch"] == pt["batch"]
                and q["prompt_len"] == pt["prompt_len"]
                and q["new_tokens"] == pt["new_tokens"]
                and (peer != "hf" or q["dtype"] == pt["dtype"])
            ]
            k = peer_key(peer)
            if match and match[0]["decode_tok_s"]:
                pt[f"ratio_vs_{k}"] = pt["decode_tok_s"] / match[0]["decode_tok_s"]
                pt[f"ratio_vs_{k}_prefill"] = pt["prefill_tok_s"] / match[0]["prefill_tok_s"]
            else:
                pt[f"ratio_vs_{k}"] = None
                pt[f"ratio_vs_{k}_prefill"] = None
