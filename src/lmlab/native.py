"""lmlab's native code (``csrc/native.c``): the few-row matmul, and a whole decoding step.

- ``linear``: ``x @ W.T + b`` for up to four rows, reading the plain row-major weight.
- ``decode_step``: one new token per sequence through every block, the final norm and the
  head, in one call, for a model with no hook registered. The engine takes it for a cached
  one-token step (``engine.steps.decode_one_token``); the PyTorch forward pass in
  ``lmlab/model.py`` is its reference (tests compare the two for every family, in float32 and
  bfloat16). Its buffers (``lmlab_state`` in the C file) are made once per model, by its
  ``DecodePlan``, and freed with it.
- ``act_forward``/``act_backward``, ``rmsnorm_forward``/``rmsnorm_backward``,
  ``rope_forward``/``rope_backward``: training's elementwise steps in one pass each, and
  ``attn_forward``/``attn_backward``, training's causal attention, for ``lmlab.fused``'s
  autograd Functions.

The C file is compiled once per machine, at first use, with the system's C compiler and
``-march=native -fopenmp``, into ``~/.lmlab/native/`` (``$LMLAB_HOME/native``). The library is
loaded with ctypes and called on tensors' memory; it links the OpenMP runtime torch already
loaded, so it shares torch's threads. It reads each weight row once, front to back, in the
ordinary layout, so it needs no second copy of the weights.

Anything missing (no compiler, a CPU without AVX2, AVX-512 or NEON, a build error, a self-check that disagrees
with ``F.linear``) leaves ``available()`` False with the reason in ``status()``, and lmlab keeps
its other matmul routes; nothing else changes. ``LMLAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.host import c_compiler, cached_library, compile_library, cpu_signature, env_flag

MAX_ROWS = (
    4  # rows of x ``linear`` takes; at 8 rows oneDNN on a prepacked weight is as fast (benchmarks/linear_routes.py)
)
SOURCE = Path(__file__).with_name("csrc") / "native.c"
# compiled into the same library: the quantized matmuls (lmlab.quant's layouts) and their header
QUANT_SOURCES = (SOURCE.with_name("quant.c"), SOURCE.with_name("quant.h"))
# LMLAB_NATIVE_MARCH builds for another CPU level than this one's (e.g. x86-64-v3, AVX2 only):
# the tests use it to run the portable vector code on an AVX-512 machine.
FLAGS = ["-O3", f"-march={os.environ.get('LMLAB_NATIVE_MARCH') or 'native'}", "-std=gnu11", "-shared", "-fPIC"]

_BLOCK_FIELDS = (
    "attn_norm_w",
    "attn_norm_b",
    "qkv_w",
    "qkv_b",
    "o_w",
    "o_b",
    "q_norm_w",
    "k_norm_w",
    "post_attn_norm_w",
    "post_attn_norm_b",
    "mlp_norm_w",
    "mlp_norm_b",
    "up_w",
    "up_b",
    "down_w",
    "down_b",
    "post_mlp_norm_w",
    "post_mlp_norm_b",
)


QPARTS = 4  # LMLAB_QPARTS in csrc/quant.h: parts one quantized matrix may be stacked from


class QPart(ctypes.Structure):  # lmlab_qpart in csrc/quant.h
    _fields_ = [
        ("type", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("group", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("min", ctypes.c_void_p),
        ("scale16", ctypes.c_int64),
        ("qh", ctypes.c_void_p),
        ("tile", ctypes.c_int64),
    ]


class QMat(ctypes.Structure):  # lmlab_qmat in csrc/quant.h
    _fields_ = [("n_parts", ctypes.c_int64), ("parts", QPart * QPARTS)]


class _Block(ctypes.Structure):  # lmlab_block in native.c
    _fields_ = (
        [(n, ctypes.c_void_p) for n in _BLOCK_FIELDS]
        + [("rope_table", ctypes.c_int64), ("window", ctypes.c_int64)]
        + [(n, ctypes.c_void_p) for n in ("qkv_q", "o_q", "up_q", "down_q")]
    )


class _Model(ctypes.Structure):  # lmlab_model in native.c
    _fields_ = (
        [
            (n, ctypes.c_int64)
            for n in (
                "n_layers",
                "d_model",
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "d_ff",
                "vocab",
                "rotary_dim",
                "layernorm",
                "sandwich",
                "qk_norm",
                "gated",
                "act",
                "parallel_residual",
                "bf16",
            )
        ]
        + [(n, ctypes.c_double) for n in ("norm_eps", "norm_offset", "attn_scale", "attn_softcap", "final_softcap")]
        + [(n, ctypes.c_void_p) for n in ("final_norm_w", "final_norm_b", "lm_head_w", "blocks")]
        + [("lm_head_q", ctypes.c_void_p), ("quant", ctypes.c_int64)]
    )


_lib = None  # the loaded library, False once it has failed
_single_thread = False  # built without OpenMP (e.g. a clang without libomp): it runs on one thread only
_status = "not built yet"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ISA_NAMES = {512: "AVX-512", 256: "AVX2", 128: "128-bit vectors"}


def enabled_by_env() -> bool:
    return env_flag("LMLAB_NATIVE", True)


def status() -> str:
    """One line: whether the native kernel is in use, or why not."""
    _load()
    return _status


def available() -> bool:
    return bool(_load())


def serves() -> bool:
    """Whether the library runs now: built, and able to use torch's thread count."""
    return _usable() is not None


def build() -> str:
    """The built library's name (its hash covers the sources, compiler, flags and CPU), or ""."""
    lib = _load()
    return Path(lib._name).stem if lib else ""


def q_tiles() -> int:
    """Rows per block lmlab.quant tiles Q4 and Q8_0 parts in: 16 where the built kernel is faster on tiles
    (AVX512-VNNI), else 0. LMLAB_QTILE=0 or 1 forces plain or tiled parts (any build computes both)."""
    lib = _usable()
    forced = os.environ.get("LMLAB_QTILE", "").strip()
    if forced in ("0", "1"):
        return 16 * int(forced)
    return lib.lmlab_q_tiles() if lib is not None else 0


def _build_at(cc: str):
    """What builds the library at a path: SOURCE and the quant sources (None on success, else the
    compiler's complaint). Without OpenMP (e.g. Apple's clang) it runs on one thread."""
    return lambda out: compile_library(cc, [[*FLAGS, "-fopenmp"], FLAGS], [SOURCE, QUANT_SOURCES[0]], out, libs=["-lm"])


def _load():
    global _lib, _status, _single_thread
    if _lib is not None:
        return _lib
    _lib = False
    if not enabled_by_env():
        _status = "off (LMLAB_NATIVE=0)"
        return _lib
    cc = c_compiler()
    if cc is None:
        _status = "off: no C compiler found (install gcc to build the fast decoding kernel)"
        return _lib
    sources = SOURCE.read_bytes() + b"".join(p.read_bytes() for p in QUANT_SOURCES)
    lib, why = cached_library(
        "native", sources + " ".join([cc, *FLAGS]).encode() + cpu_signature().encode(), _build_at(cc)
    )
    if lib is None:
        _status = f"off: {why}"
        return _lib
    isa = lib.lmlab_isa()
    if not isa:
        _status = "off: the compiler found no AVX2, AVX-512 or NEON vectors for this CPU"
        return _lib
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.lmlab_linear.argtypes = [vp, i, i, vp, i, vp, vp, i, i]
    lib.lmlab_linear.restype = i
    lib.lmlab_decode_step.argtypes = [
        ctypes.POINTER(_Model),
        vp,
        i,
        vp,
        vp,
        vp,
        ctypes.c_int64,
        ctypes.c_int64,
        vp,
        vp,
        vp,
        vp,
        i,
    ]
    lib.lmlab_decode_step.restype = i
    lib.lmlab_decode_layers.argtypes = lib.lmlab_decode_step.argtypes[:-2] + [i, i, vp, vp, i]
    lib.lmlab_decode_layers.restype = i
    lib.lmlab_state_new.argtypes = [ctypes.POINTER(_Model)]
    lib.lmlab_state_new.restype = vp
    lib.lmlab_state_free.argtypes = [vp]
    lib.lmlab_state_free.restype = None
    lib.lmlab_act_code.argtypes = [ctypes.c_char_p]
    lib.lmlab_act_code.restype = i
    qm = ctypes.POINTER(QMat)
    lib.lmlab_qlinear.argtypes = [vp, i, i, qm, i, vp, vp, i]
    lib.lmlab_qlinear.restype = i
    lib.lmlab_q_dequant_rows.argtypes = [qm, i, ctypes.c_int64, ctypes.c_int64, vp]
    lib.lmlab_q_dequant_rows.restype = None
    lib.lmlab_q_parts_max.restype = i
    lib.lmlab_q_tiles.restype = i
    lib.lmlab_q_isa.restype = ctypes.c_char_p
    i64 = ctypes.c_int64
    lib.lmlab_act_forward.argtypes = [vp, vp, i64, i64, i, i, vp, i]
    lib.lmlab_act_backward.argtypes = [vp, vp, vp, i64, i64, i, i, vp, vp, i]
    lib.lmlab_rope_forward.argtypes = [vp, i64, i64, i64, i64, i64, i64, vp, vp, i64, vp, i]
    lib.lmlab_rope_backward.argtypes = [vp, vp, vp, i64, i64, i64, i64, vp, vp, i64, vp, i]
    lib.lmlab_rmsnorm_forward.argtypes = [vp, i64, i64, vp, ctypes.c_float, vp, vp, i]
    lib.lmlab_rmsnorm_backward.argtypes = [vp, vp, vp, vp, i64, i64, vp, vp, i]
    f32 = ctypes.c_float
    lib.lmlab_attn_forward.argtypes = [vp, i64, i64, i64, i64, i64, f32, vp, vp, i64, i64, vp, vp, i]
    lib.lmlab_attn_backward.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, i64, f32, vp, vp, i64, i64, vp, i]
    lib.lmlab_gemm.argtypes = [vp, i64, i64, vp, vp, i64, i64, i64, vp, i]
    lib.lmlab_gemm.restype = i
    for step in ("act", "rope", "rmsnorm", "attn"):
        getattr(lib, f"lmlab_{step}_forward").restype = getattr(lib, f"lmlab_{step}_backward").restype = i
    _lib = lib
    if lib.lmlab_q_parts_max() != QPARTS:
        _lib = False
        _status = "off: QPARTS and LMLAB_QPARTS in csrc/quant.h disagree (make them agree)"
        return _lib
    bad = _self_check() or _quant_self_check()
    if bad:
        _lib = False
        _status = f"off: its self-check disagreed with F.linear ({bad})"
        return _lib
    wrong = [name for name, code in ACT_CODES.items() if lib.lmlab_act_code(name.encode()) != code]
    if wrong:
        _lib = False
        _status = f"off: ACT_CODES and enum lmlab_act in csrc/native.c disagree on {', '.join(wrong)} (make them agree)"
        return _lib
    _single_thread = not lib.lmlab_openmp()
    _status = f"on ({Path(lib._name).name}, {ISA_NAMES.get(isa, isa)}, {lib.lmlab_q_isa().decode()}" + (
        ", one thread: built without OpenMP, so used only when torch runs one thread)" if _single_thread else ")"
    )
    return _lib


def _usable():
    """The library, or None where it is not built or would be slower: a build without OpenMP
    runs on one thread, against torch's several."""
    lib = _lib if _lib is not None else _load()
    if not lib or (_single_thread and torch.get_num_threads() > 1):
        return None
    return lib


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
    lib = _usable()
    if lib is None:
        return None
    N = weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    rc = lib.lmlab_linear(
        x.data_ptr(),
        rows,
        K,
        weight.data_ptr(),
        N,
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        code,
        torch.get_num_threads(),
    )
    return y if rc == 0 else None


# ----------------------------------------------------------------------------- training's elementwise steps
# lmlab.fused's autograd Functions call these. Each returns None where the library can't serve
# (not built, or a build without OpenMP while torch runs several threads); fused.applies() asks
# native.serves() first, so training takes model.py's PyTorch lines there instead. Float32 CPU
# tensors only, as fused.applies() checks.


def act_forward(h: torch.Tensor, glu: bool, act: str, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """act(gate) * up for h = [gate | up] (..., 2F) when glu, else act(h); act: silu or gelu_tanh.
    bias (h's last dimension), when given, is added to h first."""
    lib = _usable()
    if lib is None:
        return None
    h = h.contiguous()
    F_ = h.shape[-1] // 2 if glu else h.shape[-1]
    out = h.new_empty(*h.shape[:-1], F_)
    rc = lib.lmlab_act_forward(
        h.data_ptr(), _ptr(bias), h.numel() // h.shape[-1], F_, int(glu), ACT_CODES[act], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out if rc == 0 else None


def act_backward(
    h: torch.Tensor, grad: torch.Tensor, glu: bool, act: str, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The gradients of ``act_forward``'s input h and, where given, its bias, from ``grad``, the
    gradient of its output."""
    lib = _usable()
    if lib is None:
        return None
    h, grad = h.contiguous(), grad.contiguous()
    dh = torch.empty_like(h)
    dbias = None if bias is None else torch.empty_like(bias)
    rc = lib.lmlab_act_backward(
        h.data_ptr(), _ptr(bias), grad.data_ptr(), grad.numel() // grad.shape[-1], grad.shape[-1], int(glu),
        ACT_CODES[act], dh.data_ptr(), _ptr(dbias), torch.get_num_threads(),
    )  # fmt: skip
    return (dh, dbias) if rc == 0 else None


def _ptr(t: torch.Tensor | None) -> int | None:
    """A contiguous float32 tensor's memory for C, or NULL."""
    if t is None:
        return None
    assert t.is_contiguous() and t.dtype == torch.float32
    return t.data_ptr()


def rmsnorm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x r w, r) over x's last dimension, r = rsqrt(mean(x^2) + eps) of each row (x's shape but
    the last dimension); w float32 (C,)."""
    lib = _usable()
    if lib is None:
        return None
    x, w = x.contiguous(), w.contiguous()
    out, r = torch.empty_like(x), x.new_empty(x.shape[:-1])
    C = x.shape[-1]
    rc = lib.lmlab_rmsnorm_forward(
        x.data_ptr(), x.numel() // C, C, w.data_ptr(), eps, out.data_ptr(), r.data_ptr(), torch.get_num_threads()
    )
    return (out, r) if rc == 0 else None


def rmsnorm_backward(x, w, r, grad, need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The gradients of ``rmsnorm_forward``'s x, and of w where need_w, from ``grad``, its output's."""
    lib = _usable()
    if lib is None:
        return None
    x, w, r, grad = x.contiguous(), w.contiguous(), r.contiguous(), grad.contiguous()
    C = x.shape[-1]
    dx = torch.empty_like(x)
    dw = w.new_empty(C) if need_w else None
    rc = lib.lmlab_rmsnorm_backward(
        x.data_ptr(), w.data_ptr(), r.data_ptr(), grad.data_ptr(), x.numel() // C, C, dx.data_ptr(),
        dw.data_ptr() if dw is not None else None, torch.get_num_threads(),
    )  # fmt: skip
    return (dx, dw) if rc == 0 else None


def _tables(cos: torch.Tensor, T: int) -> tuple[torch.Tensor, int]:
    """cos or sin (B or 1, 1, T, R) as (B or 1, T, R) contiguous, and its stride between rows."""
    c = cos.reshape(cos.shape[0], T, cos.shape[-1]).contiguous()
    return c, (c.stride(0) if c.shape[0] > 1 else 0)


def rope_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor | None:
    """qkv (B, T, NH, D) with its first n_rot heads turned by RoPE (model.apply_rope), the rest copied.
    cos, sin: (B or 1, 1, T, R) as ``model.rope_cos_sin`` makes them."""
    lib = _usable()
    if lib is None:
        return None
    B, T, NH, D = qkv.shape
    qkv = qkv.contiguous()
    (c, cs_b), (s, _) = _tables(cos, T), _tables(sin, T)
    out = torch.empty_like(qkv)
    rc = lib.lmlab_rope_forward(
        qkv.data_ptr(), B, T, NH, D, n_rot, c.shape[-1], c.data_ptr(), s.data_ptr(), cs_b, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out if rc == 0 else None


def rope_backward(grads, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``rope_forward``'s qkv (B, T, NH, D) from the gradients of its q, k and v
    heads, each (B, heads, T, D) (any strides but D's)."""
    lib = _usable()
    if lib is None:
        return None
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
    B, _, T, D = grads[0].shape
    heads = (ctypes.c_int64 * 3)(*(g.shape[1] for g in grads))
    strides = (ctypes.c_int64 * 9)(*(st for g in grads for st in g.stride()[:3]))
    ptrs = (ctypes.c_void_p * 3)(*(g.data_ptr() for g in grads))
    (c, cs_b), (s, _) = _tables(cos, T), _tables(sin, T)
    dx = grads[0].new_empty(B, T, sum(heads), D)
    rc = lib.lmlab_rope_backward(
        ptrs, strides, heads, B, T, D, c.shape[-1], c.data_ptr(), s.data_ptr(), cs_b, dx.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return dx if rc == 0 else None


def _rope_args(rope, T: int) -> tuple:
    """The C side's (cos, sin, batch stride, R) for rope = (cos, sin) as ``model.rope_cos_sin`` makes
    them, or None; the tables are returned too, to stay alive through the call."""
    if rope is None:
        return (None, None, 0, 0), ()
    (c, cs_b), (s, _) = _tables(rope[0], T), _tables(rope[1], T)
    return (c.data_ptr(), s.data_ptr(), cs_b, c.shape[-1]), (c, s)


def attn_forward(qkv: torch.Tensor, H: int, K: int, scale: float, rope=None) -> tuple | None:
    """Causal attention over qkv (B, T, H + 2K, D) (query heads, then key heads, then value
    heads, D a multiple of 16), q and k turned by RoPE first where rope = (cos, sin) (B or 1, 1, T,
    R): y (B, T, H, D) and each row's log-sum-exp (B, H, T)."""
    lib = _usable()
    if lib is None:
        return None
    qkv = qkv.contiguous()
    B, T, _, D = qkv.shape
    (c, s, cs_b, R), keep = _rope_args(rope, T)
    y, lse = qkv.new_empty(B, T, H, D), qkv.new_empty(B, H, T)
    rc = lib.lmlab_attn_forward(
        qkv.data_ptr(), B, T, H, K, D, scale, c, s, cs_b, R, y.data_ptr(), lse.data_ptr(), torch.get_num_threads()
    )
    del keep
    return (y, lse) if rc == 0 else None


def attn_backward(qkv, y, lse, grad, H: int, K: int, scale: float, rope=None) -> torch.Tensor | None:
    """The gradient of ``attn_forward``'s qkv, in its layout, from ``grad``, its output's."""
    lib = _usable()
    if lib is None:
        return None
    qkv, grad = qkv.contiguous(), grad.contiguous()
    B, T, _, D = qkv.shape
    (c, s, cs_b, R), keep = _rope_args(rope, T)
    dx = torch.empty_like(qkv)
    rc = lib.lmlab_attn_backward(
        qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), grad.data_ptr(), B, T, H, K, D, scale, c, s, cs_b, R,
        dx.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    del keep
    return dx if rc == 0 else None


# ----------------------------------------------------------------------------- training's matmul gradients
# lmlab.fused's Linear takes these where they are faster than the BLAS and oneDNN for the shape on
# this machine (fused.py times them); csrc/native.c's lmlab_gemm explains the kernel.


def _gemm_fits(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)


def weight_grad(g: torch.Tensor, x: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A Linear layer's weight gradient g^T x (out, in) for g (rows, out) and its input x (rows,
    in), and with ``bias`` the bias's, g's column sums; None where the kernel does not apply (in
    not a multiple of 16, or tensors not contiguous float32 on the CPU)."""
    lib = _usable()
    (rows, out), n = g.shape, x.shape[1]
    if lib is None or n % 16 or not _gemm_fits(g, x):
        return None
    dw = g.new_empty(out, n)
    db = g.new_empty(out) if bias else None
    rc = lib.lmlab_gemm(
        g.data_ptr(), out, 1, x.data_ptr(), dw.data_ptr(), out, n, rows, _ptr(db), torch.get_num_threads()
    )
    return (dw, db) if rc == 0 else None


def input_grad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """A Linear layer's input gradient g w (rows, in) for g (rows, out) and its weight w (out,
    in); None where the kernel does not apply (as ``weight_grad``)."""
    lib = _usable()
    (rows, out), n = g.shape, w.shape[1]
    if lib is None or n % 16 or not _gemm_fits(g, w):
        return None
    dx = g.new_empty(rows, n)
    rc = lib.lmlab_gemm(g.data_ptr(), 1, out, w.data_ptr(), dx.data_ptr(), rows, n, out, None, torch.get_num_threads())
    return dx if rc == 0 else None


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
    for rows, K, N in ((37, 48, 29), (300, 32, 130)):  # training's gradients: tails of rows and columns
        x, w, gy = (torch.randn(*s, generator=g) for s in ((rows, K), (N, K), (rows, N)))
        wb, dx = weight_grad(gy, x, True), input_grad(gy, w)
        if wb is None or dx is None:
            return f"no gradient for {rows}x{K} -> {N}"
        for name, a, b in zip(("weight grad", "bias grad", "input grad"), (*wb, dx), (gy.t() @ x, gy.sum(0), gy @ w)):
            err = (a - b).abs().max().item()
            if err > 1e-4 * (1 + b.abs().max().item()):
                return f"max error {err:.3g} in the {name} of {rows}x{K} -> {N}"
    return None


def _q4_values(q: torch.Tensor) -> torch.Tensor:
    """LMLAB_Q4's bytes (n, K / 2) -> values (n, K / 32, 32) as floats: pairs of groups share 32
    bytes (low nibbles, high nibbles); a last group alone has values j and j + 16 in byte j.
    (lmlab.quant.unpack_nibbles, restated: native.py imports nothing of lmlab.quant.)"""
    n, G = q.shape[0], q.shape[1] // 16
    body = q[:, : (G - G % 2) * 16].reshape(n, G // 2, 1, 32)
    v = torch.cat([body & 15, body >> 4], dim=2).reshape(n, G - G % 2, 32)
    if G % 2:
        v = torch.cat([v, torch.cat([q[:, -16:] & 15, q[:, -16:] >> 4], dim=1)[:, None]], dim=1)
    return v.float()


def _quant_self_check() -> str | None:
    """lmlab_qlinear against its definition on odd sizes: W in each layout (and stacked from two),
    x rounded to int8 per 32 values, then a float matmul. Only float rounding may differ."""
    g = torch.Generator().manual_seed(1)
    cases = ((1, 96, ("q8",)), (3, 64, ("q4",)), (2, 128, ("q8g16", "q4h")), (9, 32, ("q4", "q8h")), (1, 160, ("q4h",)))
    for rows, K, layouts in cases:
        parts, refs = [], []
        for layout in layouts:
            half = layout.endswith("h")  # scales (and mins) held as float16
            layout = layout.removesuffix("h")
            n = 13
            if layout == "q4":
                q = torch.randint(0, 256, (n, K // 2), generator=g, dtype=torch.uint8)
                d, mn = torch.rand(n, K // 32, generator=g), torch.randn(n, K // 32, generator=g)
                if half:
                    d, mn = d.half(), mn.half()
                v = _q4_values(q)
                refs.append((v * d.float()[..., None] + mn.float()[..., None]).reshape(n, K))
                parts.append((2, 32, q, d, mn))
            else:
                G = 16 if layout == "q8g16" else 32
                q = torch.randint(-128, 128, (n, K), generator=g, dtype=torch.int8)
                d = torch.rand(n, K // G, generator=g)
                d = d.half() if half else d
                refs.append((q.float().view(n, -1, G) * d.float()[..., None]).reshape(n, K))
                parts.append((1, G, q, d, None))
        qm = QMat(n_parts=len(parts))
        for i, (kind, G, q, d, mn) in enumerate(parts):
            qm.parts[i] = QPart(
                kind,
                q.shape[0],
                G,
                q.data_ptr(),
                d.data_ptr(),
                mn.data_ptr() if mn is not None else None,
                int(d.dtype == torch.float16),
            )
        w = torch.cat(refs)
        x = torch.randn(rows, K, generator=g)
        b = torch.randn(w.shape[0], generator=g)
        y = torch.empty(rows, w.shape[0])
        rc = _lib.lmlab_qlinear(
            x.data_ptr(), rows, K, ctypes.byref(qm), w.shape[0], b.data_ptr(), y.data_ptr(), torch.get_num_threads()
        )
        gx = x.view(rows, -1, 32)
        sx = gx.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(gx * torch.where(sx == 0, torch.zeros_like(sx), 1 / sx)) * sx).view(rows, K)
        want = F.linear(xq, w, b)
        err = (y - want).abs().max().item()
        if rc != 0 or err > 1e-4 * (1 + want.abs().max().item()):
            return f"quantized matmul {'+'.join(layouts)} {rows}x{K}: rc {rc}, max error {err:.3g}"
    return _tiled_self_check(g)


def _tiled_self_check(g: torch.Generator) -> str | None:
    """A tiled part (LMLAB_QTILE: Q4 with a min, Q4 with fifth bits and none, Q8) through
    lmlab_qlinear against F.linear on the rows lmlab_q_dequant_rows reads from it (the plain C
    loop; the tests hold that to the file's values). Below an 8-row Q8 part, so the threads'
    shares (multiples of 16 rows) cut the tiled part's blocks."""
    n, K = 48, 96
    top_q = torch.randint(-128, 128, (8, K), generator=g, dtype=torch.int8)
    top_d = torch.rand(8, K // 32, generator=g)
    for kind in ("q4", "q5", "q8"):
        fifth = kind == "q5"
        q = torch.randint(0, 256, (n, K if kind == "q8" else K // 2), generator=g, dtype=torch.uint8)
        d = torch.rand(n, K // 32, generator=g).half()
        mn = None if fifth else torch.randn(n, K // 32, generator=g).half()
        qh = torch.randint(0, 2**31, (n, K // 32), generator=g, dtype=torch.int64).to(torch.int32)
        qm = QMat(n_parts=2)
        qm.parts[0] = QPart(1, 8, 32, top_q.data_ptr(), top_d.data_ptr(), None, 0)
        qm.parts[1] = QPart(
            1 if kind == "q8" else 2, n, 32, q.data_ptr(), d.data_ptr(),
            mn.data_ptr() if mn is not None and kind == "q4" else None, 1, qh.data_ptr() if fifth else None, 16,
        )  # fmt: skip
        w = torch.empty(n + 8, K)
        _lib.lmlab_q_dequant_rows(ctypes.byref(qm), K, 0, n + 8, w.data_ptr())
        x = torch.randn(3, K, generator=g)
        y = torch.empty(3, n + 8)
        rc = _lib.lmlab_qlinear(x.data_ptr(), 3, K, ctypes.byref(qm), n + 8, None, y.data_ptr(), 3)
        gx = x.view(3, -1, 32)
        sx = gx.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(gx * torch.where(sx == 0, torch.zeros_like(sx), 1 / sx)) * sx).view(3, K)
        want = F.linear(xq, w)
        err = (y - want).abs().max().item()
        if rc != 0 or err > 1e-4 * (1 + want.abs().max().item()):
            return f"tiled quantized matmul ({kind}): rc {rc}, max error {err:.3g}"
    return None


# ----------------------------------------------------------------------------- the decoding step

# ModelConfig.act -> its code in the C file: enum lmlab_act in csrc/native.c (LMLAB_ACT_SILU, ...),
# the same names in the same order. _load checks that they agree (lmlab_act_code).
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_param_epoch = 0  # moves whenever any module gets a new Parameter: a plan's pointers may be stale then
_watching_parameters = False  # _on_new_parameter is registered (at the first DecodePlan)


def _on_new_parameter(module, name, param):
    global _param_epoch
    _param_epoch += 1


def _watch_parameters():
    """Count new Parameters from now on. A hook on every nn.Module in the process, so it is
    registered only once a plan exists whose pointers it could make stale."""
    global _watching_parameters
    if not _watching_parameters:
        torch.nn.modules.module.register_module_parameter_registration_hook(_on_new_parameter)
        _watching_parameters = True


class DecodePlan:
    """A model's parameters as the C structs ``lmlab_decode_step`` reads (pointers into the tensors).

    Edits in place are seen, since the step reads the tensors' own memory. A parameter replaced
    by another, or a model moved to another dtype or device, makes the plan stale; ``plan_for``
    then builds a new one. (Assigning to one parameter's ``.data`` is not seen: assign a new
    ``nn.Parameter``, or edit in place.)

    It also owns the step's buffers (``state``, an ``lmlab_state`` made by ``lmlab_state_new``):
    sized at the first step, grown only when a step needs more, freed with the plan. ``lock``
    keeps two Python threads from stepping the same model at once in them.
    """

    state = None  # the lmlab_state, None until the plan is built (or where it does not apply)

    def __init__(self, model, key):
        _watch_parameters()
        cfg = model.cfg
        self.key = key
        self.dtype = model.tok_embed.weight.dtype
        self.reason = _unsupported(model)
        if self.reason:
            return

        def ptr(t):
            return None if t is None else t.data_ptr()

        def norm_wb(n):
            return (ptr(n.weight), ptr(n.bias)) if n is not None else (None, None)

        self.thetas = []  # distinct RoPE bases, in the order of the tables passed to C
        blocks = (_Block * cfg.n_layers)()
        self.qmats = []  # the quantized matrices' C structs, kept alive while the plan points at them

        def wptr(lin):  # (float weight pointer, quantized matrix pointer): one of them is None
            qw = getattr(lin, "qweight", None)
            if qw is None:
                return ptr(lin.weight), None
            self.qmats.append(qw)
            return None, ctypes.addressof(qw.struct)

        for i, blk in enumerate(model.blocks):
            a, mlp = blk.attn, blk.mlp
            v = dict(zip(("attn_norm_w", "attn_norm_b"), norm_wb(blk.attn_norm)))
            (qkv_w, qkv_q), (o_w, o_q) = wptr(a.qkv), wptr(a.o)
            v.update(qkv_w=qkv_w, qkv_q=qkv_q, qkv_b=ptr(a.qkv.bias), o_w=o_w, o_q=o_q, o_b=ptr(a.o.bias))
            if cfg.qk_norm:
                v.update(q_norm_w=ptr(a.q_norm.weight), k_norm_w=ptr(a.k_norm.weight))
            if cfg.sandwich_norm:
                v.update(zip(("post_attn_norm_w", "post_attn_norm_b"), norm_wb(blk.post_attn_norm)))
                v.update(zip(("post_mlp_norm_w", "post_mlp_norm_b"), norm_wb(blk.post_mlp_norm)))
            v.update(zip(("mlp_norm_w", "mlp_norm_b"), norm_wb(blk.mlp_norm)))
            (up_w, up_q), (down_w, down_q) = wptr(mlp.up), wptr(mlp.down)
            v.update(
                up_w=up_w, up_q=up_q, up_b=ptr(mlp.up.bias), down_w=down_w, down_q=down_q, down_b=ptr(mlp.down.bias)
            )
            for name, value in v.items():
                setattr(blocks[i], name, value)
            table = -1
            if cfg.pos == "rope":
                theta = model._theta(i)
                if theta not in self.thetas:
                    self.thetas.append(theta)
                table = self.thetas.index(theta)
            blocks[i].rope_table = table
            blocks[i].window = cfg.sliding_window if cfg.layer_types[i] == "sliding" and cfg.sliding_window else 0
        self.blocks = blocks  # kept alive: the struct below points into it
        fn_w, fn_b = norm_wb(model.final_norm)
        head_w, head_q = wptr(model.lm_head)
        self.struct = _Model(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            d_ff=cfg.d_ff,
            vocab=cfg.vocab_size,
            rotary_dim=cfg.rotary_dim if cfg.pos == "rope" else 0,
            layernorm=int(cfg.norm == "layernorm"),
            sandwich=int(cfg.sandwich_norm),
            qk_norm=int(cfg.qk_norm),
            gated=int(cfg.mlp == "gated"),
            act=ACT_CODES[cfg.act],
            parallel_residual=int(cfg.parallel_residual),
            bf16=int(self.dtype == torch.bfloat16),
            norm_eps=cfg.norm_eps,
            norm_offset=cfg.norm_weight_offset,
            attn_scale=model.blocks[0].attn.scale,
            attn_softcap=cfg.attn_logit_softcap or 0.0,
            final_softcap=cfg.final_logit_softcap or 0.0,
            final_norm_w=fn_w,
            final_norm_b=fn_b,
            lm_head_w=head_w,
            blocks=ctypes.cast(blocks, ctypes.c_void_p),
            lm_head_q=head_q,
            quant=int(bool(self.qmats)),
        )
        self.struct_ref = ctypes.byref(self.struct)
        self.lock = threading.Lock()
        self._free = _lib.lmlab_state_free  # kept: the module's globals may be gone when __del__ runs at exit
        self.state = _lib.lmlab_state_new(self.struct_ref)
        if not self.state:
            self.reason = "out of memory for the step's buffers"

    def __del__(self):
        if self.state:
            self._free(self.state)
            self.state = None


def _unsupported(model) -> str | None:
    """Why the native step cannot run this model as it is, or None."""
    cfg = model.cfg
    if not available():
        return status()
    if cfg.act not in ACT_CODES:
        return f"activation {cfg.act!r}"
    params = list(model.parameters())
    dtype = params[0].dtype
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    if any(getattr(m, "qweight", None) is not None for m in model.modules()) and dtype != torch.float32:
        return "quantized weights with activations other than float32"
    for p in params:
        if p.device.type != "cpu" or p.dtype != dtype or not p.is_contiguous():
            return "parameters that are not contiguous CPU tensors of one dtype"
    return None


def plan_for(model) -> DecodePlan:
    """The model's DecodePlan, built again when a parameter was replaced or the weights moved."""
    w = model.tok_embed.weight
    key = (_param_epoch, w.data_ptr(), w.dtype, w.device.type, model.lm_head.weight.data_ptr(), model.cfg.n_layers)
    plan = model.__dict__.get("_decode_plan")
    if plan is None or plan.key != key:
        plan = model.__dict__["_decode_plan"] = DecodePlan(model, key)
    return plan


# hook points the native step calls itself on a quantized model: before the blocks (model.embed)
# and on the residual stream between them, where it stops and hands the stream to Python
_STEP_HOOKS = re.compile(r"^(?:embed|pos_embed|blocks\.(\d+)\.(resid_pre|resid_post))$")


def _hook_stops(model) -> list[tuple[int, tuple[str, ...]]] | None:
    """The layer boundaries (0..L) where a decoding step stops to call the registered hooks on the
    residual stream: boundary b is after block b - 1's resid_post and at block b's resid_pre.
    None when a hook sits where only model.py reaches (inside a block, the final norm, the logits)."""
    key = tuple(model.hooks)  # names with hooks; a step asks several times, so the answer is kept
    cached = model.__dict__.get("_lmlab_hook_stops")
    if cached is not None and cached[0] == key:
        return cached[1]
    stops = _stops_of(model)
    model.__dict__["_lmlab_hook_stops"] = (key, stops)
    return stops


def _stops_of(model) -> list[tuple[int, tuple[str, ...]]] | None:
    """(boundary, the hook names called there in Block.forward's order) for each boundary."""
    stops = set()
    for name in model.hooks:
        m = _STEP_HOOKS.match(name)
        if m is None:
            return None
        if m.group(1) is not None:
            stops.add(int(m.group(1)) + (m.group(2) == "resid_post"))
    L = model.cfg.n_layers
    out = []
    for b in sorted(stops):
        at = (f"blocks.{b - 1}.resid_post" if b > 0 else None, f"blocks.{b}.resid_pre" if b < L else None)
        out.append((b, tuple(n for n in at if n in model.hooks)))
    return out


def decodes_quantized(model) -> bool:
    """Whether ``decode_step`` runs this model on its quantized weights (float32 activations)."""
    if _usable() is None:
        return False
    plan = plan_for(model)
    return not plan.reason and bool(plan.qmats) and plan.dtype == torch.float32


def runs_hooks(model) -> bool:
    """Whether ``decode_step`` runs the model's registered hooks itself: on a quantized model (float32
    activations) with hooks only before the blocks and on the residual stream between them, so a
    hook on every block's resid_post keeps the whole step in C. Other hooks take model.py."""
    return _hook_stops(model) is not None and decodes_quantized(model)


def decode_step(
    model, input_ids: torch.Tensor, positions: torch.Tensor, cache, key_mask: torch.Tensor | None, head: bool = True
) -> torch.Tensor | None:
    """Logits (B, 1, V) for one new token per row, or None where the native step does not apply.
    head=False: the blocks only, not the final norm and the LM head (a prompt's tokens before its
    last need only their keys and values); the residual stream (B, 1, C) after the last block.

    input_ids: (B, 1) int64, the new tokens; positions: (B, 1) their positions.
    cache: the KVCache; this step writes slot ``cache.length`` of every layer and advances it.
    key_mask: (B, S) bool, False on left padding (a row's padding is a prefix), or None.
    Embeddings and RoPE tables come from ``model.embed`` and ``model.rope_tables``, as in
    ``Transformer.forward``. With hooks registered it runs them where ``runs_hooks`` says it can
    (the step in layer ranges, the hooks called between them as model.py calls them), else None.
    """
    lib = _usable()
    if (
        lib is None
        or cache is None
        or input_ids.dim() != 2
        or input_ids.shape[1] != 1
        or input_ids.device.type != "cpu"
    ):
        return None
    plan = plan_for(model)
    if plan.reason:
        return None
    if torch.is_grad_enabled() and (model.lm_head.weight.requires_grad or model.tok_embed.weight.requires_grad):
        return None  # training: autograd needs the PyTorch forward
    k, v = cache.k, cache.v
    B = input_ids.shape[0]
    if k.dtype != torch.float32 or not (k.is_contiguous() and v.is_contiguous()) or k.shape[1] != B:
        return None
    ctx, stops = None, []
    if model.hooks:
        if not runs_hooks(model):
            return None
        ctx, stops = model.hook_context(input_ids, positions), _hook_stops(model)
    x = model.embed(input_ids, positions, ctx)  # (B, 1, C)
    if (torch.is_grad_enabled() and x.requires_grad) or x.dtype != plan.dtype or x.device.type != "cpu":
        return None
    if plan.thetas:
        ropes = model.rope_tables(positions, x.dtype)  # {theta: (cos, sin)} each (B, 1, 1, rotary_dim)
        tables = [ropes[t] for t in plan.thetas]
        cos = torch.stack([c for c, _ in tables]).reshape(len(tables), B, -1).float().contiguous()
        sin = torch.stack([s for _, s in tables]).reshape(len(tables), B, -1).float().contiguous()
    else:
        cos = sin = None
    first = None
    if key_mask is not None:
        first = key_mask.to(torch.uint8).argmax(-1)  # (B,) int64: the first slot each row may attend to
    x = x.contiguous()
    L = model.cfg.n_layers
    logits = torch.empty(B, 1, model.cfg.vocab_size, dtype=x.dtype) if head else None

    call = lib.lmlab_decode_layers
    model_args = (plan.struct_ref, plan.state, B)  # what every layer range of this step shares
    cache_args = (
        k.data_ptr(),
        v.data_ptr(),
        cache.max_len,
        cache.length,
        first.data_ptr() if first is not None else None,
        cos.data_ptr() if cos is not None else None,
        sin.data_ptr() if sin is not None else None,
    )
    threads = torch.get_num_threads()

    with plan.lock:
        l0 = 0
        C = model.cfg.d_model
        for b, names in stops:  # run the layers up to a hooks' boundary, then its hooks (Block.forward's order)
            if b > l0:
                out = torch.empty(B, 1, C)  # a new tensor each time: a hook may keep it
                if call(*model_args, x.data_ptr(), *cache_args, l0, b, out.data_ptr(), None, threads) != 0:
                    return None
                x, l0 = out, b
            given = x
            for name in names:
                x = ctx(name, x)
            if x is not given and (x.requires_grad or x.dtype != torch.float32 or not x.is_contiguous()):
                x = x.detach().to(torch.float32).contiguous()
        if not head:
            out = torch.empty(B, 1, model.cfg.d_model) if l0 < L else x
            if l0 < L and call(*model_args, x.data_ptr(), *cache_args, l0, L, out.data_ptr(), None, threads) != 0:
                return None
            cache.advance(1)
            return out
        if call(*model_args, x.data_ptr(), *cache_args, l0, L, None, logits.data_ptr(), threads) != 0:
            return None
    cache.advance(1)
    return logits
