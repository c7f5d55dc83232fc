"""lmlab's one native kernel: the few-row matmul of a decoding step (``csrc/matvec.c``).

The C file is compiled once per machine, at first use, with the system's C compiler and
``-march=native -fopenmp``, into ``~/.lmlab/native/`` (``$LMLAB_HOME/native``). The library is
loaded with ctypes and called on tensors' memory; it links the OpenMP runtime torch already
loaded, so it shares torch's threads. It reads each weight row once, front to back, in the
ordinary layout, so it needs no second copy of the weights.

Anything missing (no compiler, a CPU without AVX-512, a build error, a self-check that disagrees
with ``F.linear``) leaves ``available()`` False with the reason in ``status()``, and lmlab keeps
its other matmul routes; nothing else changes. ``LMLAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 2  # rows of x this kernel takes; from 3-4 rows oneDNN's blocked GEMM is as fast or faster
SOURCE = Path(__file__).with_name("csrc") / "matvec.c"
FLAGS = ["-O3", "-march=native", "-std=c11", "-shared", "-fPIC"]

_lib = None  # the loaded library, False once it has failed
_status = "not built yet"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def enabled_by_env() -> bool:
    return os.environ.get("LMLAB_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def status() -> str:
    """One line: whether the native kernel is in use, or why not."""
    _load()
    return _status


def available() -> bool:
    return bool(_load())


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    home = os.environ.get("LMLAB_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".lmlab") / "native"


def _build(cc: str, out: Path) -> str | None:
    """Compile SOURCE to ``out``; None on success, else the compiler's complaint (first line)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in (["-fopenmp"], []):  # without OpenMP (e.g. Apple's clang) it runs on one thread
            proc = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent process sees the whole file or none
                return None
        return (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[0]
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    global _lib, _status
    if _lib is not None:
        return _lib
    _lib = False
    if not enabled_by_env():
        _status = "off (LMLAB_NATIVE=0)"
        return _lib
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _status = "off: no C compiler found (install gcc to build the fast decoding kernel)"
        return _lib
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"matvec-{key}.so"
    try:
        if not path.exists():
            err = _build(cc, path)
            if err:
                _status = f"off: the build failed ({err})"
                return _lib
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        _status = f"off: could not build or load {path} ({e})"
        return _lib
    if lib.lmlab_isa() != 512:
        _status = "off: this CPU has no AVX-512 (the kernel is written for it)"
        return _lib
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.lmlab_linear.argtypes = [vp, i, i, vp, i, vp, vp, i, i]
    lib.lmlab_linear.restype = i
    _lib = lib
    bad = _self_check()
    if bad:
        _lib = False
        _status = f"off: its self-check disagreed with F.linear ({bad})"
        return _lib
    _status = f"on ({path.name}, AVX-512)"
    return _lib


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` through the native kernel, or None where it does not apply.

    Applies to CPU tensors of one dtype (float32 or bfloat16), contiguous, with at most
    MAX_ROWS rows; the caller keeps autograd out of it.
    """
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    code = DTYPES.get(x.dtype)
    if code is None or not 1 <= rows <= MAX_ROWS or weight.dtype != x.dtype or x.device.type != "cpu":
        return None
    if not (x.is_contiguous() and weight.is_contiguous() and weight.shape[1] == K):
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    lib = _lib if _lib is not None else _load()
    if not lib:
        return None
    N = weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    rc = lib.lmlab_linear(x.data_ptr(), rows, K, weight.data_ptr(), N, bias.data_ptr() if bias is not None else None,
                          y.data_ptr(), code, torch.get_num_threads())
    return y if rc == 0 else None


def _self_check() -> str | None:
    """Compare with F.linear on odd sizes (tails in both dimensions, bias, 1 and 2 rows, both dtypes)."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for rows, K, N in ((1, 37, 19), (2, 200, 33), (1, 576, 64)):
            x = torch.randn(rows, K, generator=g).to(dtype)
            w = torch.randn(N, K, generator=g).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            got = linear(x, w, b)
            want = F.linear(x.float(), w.float(), b.float())
            if got is None:
                return f"no result for {rows}x{K} @ {N}x{K} {dtype}"
            err = (got.float() - want).abs().max().item()
            if err > tol * (1 + want.abs().max().item()):
                return f"max error {err:.3g} for {rows}x{K} @ {N}x{K} {dtype}"
    return None
