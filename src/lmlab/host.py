"""Facts about this machine and its environment, read in one place.

- ``lmlab_home()``: the folder lmlab keeps its files in (runs.db, machine.json, kernels.json,
  the native build): ``$LMLAB_HOME``, else ``~/.lmlab``.
- ``cpu_model()``, ``cpu_flags()``, ``cpu_signature()``: the CPU, from ``/proc/cpuinfo`` (read once).
- ``host_details()``: what a run record or a machine measurement says about the host.
- ``env_flag(name, default)``: an on/off environment variable (LMLAB_NATIVE, LMLAB_PREPACK, ...).
- ``measured_once(file, key, measure)``: a measurement of this machine, taken once and kept in a
  JSON file under lmlab_home() (kernels.json's routes); ``best_alternating(fns, rounds)``: the
  fastest time of each of a few ways to do one thing, timed in turns.
- ``c_compiler()``, ``compile_library(...)``, ``cached_library(...)``: the system's C compiler, a
  shared library built with it, and one kept built under lmlab_home() (lmlab.native's decoding
  kernels, lmlab.spm's tokenizer).
- ``keep_freed_memory()``: while training, freed memory stays in the process for the next step;
  ``give_back_freed_memory()``: the heap's free pages go back to the OS (after a load's temporaries).

The bottom layer: it imports no other lmlab module, and never imports torch for a caller that
has not (``tests/test_imports.py`` holds it to that).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import threading
from pathlib import Path

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# The instruction-set extensions that decide matmul speed on a CPU: the ones host_details lists.
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_fp16")


def c_compiler() -> str | None:
    """The C compiler lmlab builds its native code with: ``$CC``, else cc, gcc or clang on PATH."""
    import shutil

    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")


def compile_library(cc: str, flag_sets: list[list[str]], sources: list, out: Path, libs=()) -> str | None:
    """Compile ``sources`` into the shared library ``out`` with the first of ``flag_sets`` that
    builds; None on success, else the compiler's complaint (its first line). The file appears
    whole or not at all (a concurrent process may be building the same one)."""
    import subprocess
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for flags in flag_sets:
            proc = subprocess.run(
                [cc, *flags, *map(str, sources), "-o", tmp, *libs], capture_output=True, text=True, timeout=120
            )
            if proc.returncode == 0:
                os.replace(tmp, out)
                return None
        return (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[0]
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_library(stem: str, key: bytes, build) -> tuple:
    """(the loaded library, None), or (None, why not): ``lmlab_home()/native/{stem}-{hash of key}.so``,
    built first by ``build(path)`` (None on success, else the complaint) where it is missing."""
    import hashlib
    import subprocess

    path = lmlab_home() / "native" / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    try:
        if not path.exists():
            err = build(path)
            if err:
                return None, f"the build failed ({err})"
        return ctypes.CDLL(str(path)), None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {path} ({e})"


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment variable: 1/true/yes/on is True, 0/false/no/off is False (any case,
    spaces ignored); unset, empty or anything else is ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    return default


def lmlab_home() -> Path:
    """The folder lmlab keeps its files in: $LMLAB_HOME, else ~/.lmlab."""
    env = os.environ.get("LMLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".lmlab"


def measured_once(file: str, key: str, measure):
    """``measure()``'s result (JSON-able) for ``key``, kept in ``lmlab_home()/file``: measured
    the first time on this machine, read back from then on, so every later process decides the
    same way. The file is rewritten whole (a temporary file, then rename), merged with what
    another process wrote meanwhile; an unwritable home only means measuring again next time.
    One thread of a process measures at a time (training's row threads meet a shape together)."""
    with _measuring:
        return _measured_once(file, key, measure)


_measuring = threading.RLock()


def _measured_once(file: str, key: str, measure):
    import json

    path = lmlab_home() / file

    def read() -> dict:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    cached = read()
    if key in cached:
        return cached[key]
    value = measure()
    cached = read()
    if key in cached:  # another process measured it meanwhile: decide as it did
        return cached[key]
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def best_alternating(fns, rounds: int) -> list[float]:
    """The best of ``rounds`` timings (seconds) of each function, after one untimed call each (a
    first call builds kernels, faults memory in); the functions take turns within each round, so a
    busy moment of the machine slows all of them, not one."""
    import time

    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- the CPU


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, ...]:
    """The lines of /proc/cpuinfo; none where there is no such file (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return tuple(f.read().splitlines())
    except OSError:
        return ()


def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) ..."), or the architecture when unknown."""
    for line in _cpuinfo():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags ("avx2", "avx512f", ... on x86; "asimd", "sve", ... on ARM); empty when unknown."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_signature() -> str:
    """What code compiled with -march=native depends on: the CPU's model and feature flags, one string."""
    lines = _cpuinfo()
    if not lines:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


# ----------------------------------------------------------------------------- the host


@functools.lru_cache(maxsize=1)
def _machine() -> dict:
    """What does not change while a process runs: os, CPU, cores, RAM (bytes)."""
    try:
        import psutil
    except ImportError:  # psutil is a dependency, but be robust on odd installs
        psutil = None
    physical = psutil.cpu_count(logical=False) if psutil else None
    if psutil:
        ram = int(psutil.virtual_memory().total)
    else:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = None
    have = cpu_flags()
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_flags": [f for f in MATMUL_FLAGS if f in have],
        # two spellings of the core counts: run records say cores_*, machine.json entries (and
        # their cache key, bench.machine.host_key) say physical_cores / logical_cpus
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical or os.cpu_count(),
        "ram_bytes": ram,
    }


def _gpus() -> list[dict]:
    """GPUs torch can see (only when torch is already imported; never initialises it just for this)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    gpus = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"name": p.name, "memory_bytes": int(p.total_memory)})
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            gpus.append({"name": "Apple MPS", "memory_bytes": None})
    except Exception:  # a broken driver must not stop a run from being recorded
        pass
    return gpus


def host_details(device=None, threads: int | None = None) -> dict:
    """This host: hostname, os, machine, python, CPU (model, matmul flags, cores), RAM (bytes), GPUs.

    With ``device`` (a torch device or its name), also what a measurement on it depends on:
    ``threads`` (default torch's), the ``torch`` version, the ``device`` ("cpu", or "cuda:0 NAME"
    with ``gpu_memory_bytes`` and the ``cuda`` version).
    """
    d = {**_machine(), "gpus": _gpus()}
    if device is None:
        return d
    import torch

    dev = torch.device(device)
    d.update(threads=threads or torch.get_num_threads(), torch=torch.__version__, device=dev.type)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        d["device"] = f"cuda:{idx} {props.name}"
        d["gpu_memory_bytes"] = props.total_memory
        d["cuda"] = torch.version.cuda
    return d


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM = 65536, 128 * 1024


@functools.cache
def _glibc():
    """glibc's C library, or None (macOS, musl, Windows: nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> None:
    """Return the heap's freed pages to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its (adaptive) mmap threshold in the heap; across hundreds of
    tensors of different sizes (a model's load and its temporaries) that grows the RSS by tens of
    MB for nothing.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_MADV_HUGEPAGE, _HUGE = 14, 2 << 20  # Linux's madvise advice, and an x86/Arm transparent huge page


def huge_pages(t) -> None:
    """Ask Linux to back a tensor's memory with transparent huge pages (2 MiB), for the whole huge
    pages inside it; effective for pages not touched yet, so call it between ``torch.empty`` and
    the first write. Where THP is "madvise" (the usual default) this is what turns them on.

    Decoding streams every weight byte once per token: with 4 KiB pages that is a TLB miss and a
    page walk every 4 KiB, and the hardware prefetchers stop at each page. On huge pages the random
    1.1B Llama's Q4_0 weights (582 MB) decode at 44.5 instead of 34.9 tok/s (2-core Xeon).
    Elsewhere (not Linux, THP off, an older kernel) it does nothing.
    """
    libc = _glibc()
    if libc is None:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = (start + _HUGE - 1) // _HUGE * _HUGE, end // _HUGE * _HUGE  # only pages wholly inside t
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)


@contextlib.contextmanager
def keep_freed_memory():
    """Inside it, memory the process frees stays with it for the next allocation (glibc).

    A training step allocates and frees the same large activations every step. By default glibc
    gives large blocks back to the kernel on free (each is its own mmap, or the heap's top is
    trimmed), so the next step faults every page in again and the kernel zeroes it: 128,000 page
    faults and 0.2 s of system time a step for LoRA on SmolLM2 (batch 4 x 128, one thread).
    Inside, large blocks come from the heap and the heap is not trimmed; on the way out the free
    memory is handed back (``malloc_trim``) and mmap is allowed again. Elsewhere than glibc: no-op.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        give_back_freed_memory()
