"""The machine's own limits: memory bandwidth and matmul peak, measured once and cached.

``lmlab bench --machine`` measures them; a sweep reads them from ``$LMLAB_HOME/machine.json``
(measuring once if they are absent) to say how close each point comes to the hardware.

- **bandwidth** (GB/s): a float32 matrix-vector product over at least 1 GiB of "weights", the
  access pattern of batch-1 decoding. Bigger than any cache, so it reads DRAM. Every mat-vec
  kernel at hand is timed: the BLAS's ``torch.mv``, oneDNN's on a prepacked weight
  (``lmlab.kernels``) and lmlab's native kernel (``lmlab.native``), and the fastest is the
  machine's figure: on some CPUs the BLAS path reads far below what the memory allows. A plain
  copy (read + write) and a plain read (a sum) are measured next to it for reference.
- **matmul peak** (GFLOP/s): a large square GEMM per dtype (float32, bfloat16, float16), the
  best of several runs, again the faster of the BLAS and oneDNN.

The cache is keyed by the host's details (CPU model, cores, threads, torch version, device), so
a different thread count or a torch upgrade measures again.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmlab.host import host_details, lmlab_home

MACHINE_FILE = "machine.json"
SCHEMA = 4  # 2: bandwidth and matmul peak are the faster of the BLAS and oneDNN kernels; 3: and the native mat-vec;
# 4: the native mat-vec reads 8 rows side by side, with prefetch (csrc/native.c)
GiB = 1 << 30


def host_key(details: dict) -> str:
    """One string per (CPU, cores, threads, torch, device): a cache entry is valid for it only."""
    return (
        f"{details['cpu']} | {details['physical_cores']} cores | {details['threads']} threads"
        f" | torch {details['torch']} | {details['device']}"
    )


# ----------------------------------------------------------------------------- measuring


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_time(fn, dev: torch.device, min_reps: int = 3, max_reps: int = 60, min_total_s: float = 1.5) -> float:
    """Seconds of the fastest of several calls (after one warm-up call). Calls go on for
    ``min_total_s`` so that, on a shared machine, some of them find the cores quiet."""
    fn()
    _sync(dev)
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < min_total_s and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def measure_bandwidth(device="cpu", nbytes: int = GiB) -> dict:
    """GB/s (1e9 bytes/s) of a float32 mat-vec over ``nbytes`` of weights, a copy and a read."""
    dev = torch.device(device)
    cols = 4096
    rows = max(1, nbytes // (4 * cols))
    w = torch.full((rows, cols), 1e-3, dtype=torch.float32, device=dev)
    x = torch.ones(cols, dtype=torch.float32, device=dev)
    y = torch.empty(rows, dtype=torch.float32, device=dev)
    size = w.numel() * 4
    t_mv = _best_time(lambda: torch.mv(w, x, out=y), dev)
    t_onednn = _onednn_time(x[None], w, dev)
    t_native = _native_time(x[None], w, dev)
    t_copy = _copy_time(w, dev)
    t_read = _best_time(lambda: w.sum(), dev)
    return {
        "matvec_gb_s": size / t_mv / 1e9,
        "onednn_matvec_gb_s": size / t_onednn / 1e9 if t_onednn else None,
        "native_matvec_gb_s": size / t_native / 1e9 if t_native else None,
        "copy_gb_s": 2 * size / t_copy / 1e9,  # a copy reads and writes every byte
        "read_gb_s": size / t_read / 1e9,
        "bandwidth_test_bytes": size,
    }


def _copy_time(w: torch.Tensor, dev: torch.device) -> float:
    """Seconds of one copy of ``w`` into a buffer of its size, which is freed on return."""
    dst = torch.empty_like(w)
    return _best_time(lambda: dst.copy_(w), dev)


def _native_time(x: torch.Tensor, w: torch.Tensor, dev: torch.device) -> float | None:
    """Seconds of one ``x @ w.T`` through lmlab's native kernel, or None where it is not built."""
    from lmlab import native

    if dev.type != "cpu" or not native.available():
        return None
    return _best_time(lambda: native.linear(x, w, None), dev)


def _onednn_time(x: torch.Tensor, w: torch.Tensor, dev: torch.device) -> float | None:
    """Seconds of one ``x @ w.T`` through oneDNN on ``w`` prepacked, or None where oneDNN cannot."""
    from lmlab import kernels

    if not kernels.prepack_supported(w.dtype, dev):
        return None
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    if not kernels.prepack(layer):
        return None
    try:
        return _best_time(lambda: kernels.packed_linear(x, layer), dev)
    finally:
        kernels.unpack(layer)


def measure_matmul(device="cpu", dtypes=("float32", "bfloat16", "float16")) -> dict:
    """GFLOP/s of a large square GEMM per dtype (2·n³ FLOPs per product).

    As for bandwidth, the faster of the BLAS (``torch.mm``) and oneDNN on a prepacked operand.
    """
    dev = torch.device(device)
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        n = 8192 if dev.type == "cuda" else 2048
        if dev.type == "cpu" and dtype == torch.float16:
            n = 1024  # fp16 GEMM has no fast path on many CPUs: keep it short
        try:
            a = torch.full((n, n), 0.5, dtype=dtype, device=dev)
            b = torch.full((n, n), 0.25, dtype=dtype, device=dev)
            c = torch.empty((n, n), dtype=dtype, device=dev)
            t = _best_time(lambda: torch.mm(a, b, out=c), dev)
            with torch.inference_mode():
                t = min(t, _onednn_time(a, b, dev) or t)
            out[name] = 2 * n**3 / t / 1e9
        except RuntimeError:  # a dtype this device cannot multiply
            out[name] = None
    return out


def measure_machine(device="cpu", threads: int | None = None) -> dict:
    """Measure bandwidth and matmul peak now (about 10 s); returns the entry to cache."""
    if threads:
        torch.set_num_threads(threads)
    details = host_details(device, threads)
    with torch.inference_mode():
        entry = {"host": details, **measure_bandwidth(device), "matmul_gflops": measure_matmul(device)}
    # what bandwidth_pct and the roofline are relative to: the faster mat-vec this machine runs
    entry["bandwidth_gb_s"] = max(
        entry["matvec_gb_s"], entry["onednn_matvec_gb_s"] or 0.0, entry["native_matvec_gb_s"] or 0.0
    )
    entry["threads"] = details["threads"]
    entry["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return entry


# ----------------------------------------------------------------------------- cache


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        # entries of another schema were measured differently: measure again
        ok = isinstance(data, dict) and isinstance(data.get("entries"), dict) and data.get("schema") == SCHEMA
        return data if ok else {"schema": SCHEMA, "entries": {}}
    except (OSError, ValueError):
        return {"schema": SCHEMA, "entries": {}}


def cached_machine(device="cpu", threads: int | None = None) -> dict | None:
    """The cached entry for this host, or None."""
    key = host_key(host_details(device, threads))
    return _read_cache(lmlab_home() / MACHINE_FILE)["entries"].get(key)


def machine_limits(device="cpu", threads: int | None = None, *, remeasure: bool = False, on_measure=None) -> dict:
    """This host's limits from ``$LMLAB_HOME/machine.json``, measuring (and caching) if absent.

    on_measure: called with a one-line message before measuring, so a caller can say why it waits.
    """
    path = lmlab_home() / MACHINE_FILE
    key = host_key(host_details(device, threads))
    data = _read_cache(path)
    entry = data["entries"].get(key)
    if entry is not None and not remeasure:
        return entry
    if on_measure is not None:
        on_measure(f"measuring this machine's bandwidth and matmul peak once ({key}); cached in {path}")
    entry = measure_machine(device, threads)
    data = _read_cache(path)  # re-read: another process may have written meanwhile
    data["schema"] = SCHEMA
    data["entries"][key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable home only means measuring again next time
    return entry
