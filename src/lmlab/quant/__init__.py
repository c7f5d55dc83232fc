"""Quantized weights: GGUF blocks kept as they are (repacked, never dequantized), and lmlab's q8/q4.

Two layouts of lmlab's own hold every quantized matrix (``csrc/quant.c`` documents them):

- ``Q8``: int8 values and one scale per group of 32 (16 for Q6_K): w = scale * q.
  Holds GGUF's Q8_0, Q5_0 (q - 16) and Q6_K (q - 32, scale d * sc), and lmlab's ``q8``.
- ``Q4``: 4-bit values, a scale d and a min m per group of 32: w = d * q + m.
  Holds GGUF's Q4_0 (m = -8 d, not stored: ``min`` is None), Q5_0 (a fifth bit per value in
  ``qh``, a 32-bit word per group; m = -16 d, not stored), Q4_1 and Q4_K (d * sc, -dmin * min), and lmlab's ``q4``.
  Interleaved by pairs of groups (``pack_nibbles``): one group in the low nibbles of 32 bytes,
  the next in their high nibbles, so the kernel unpacks one whole group per register.
  Or tiled (``tile_part``, where the native kernel is built for AVX512-VNNI): rows in blocks of
  16, each group's values of the 16 rows side by side, so one integer dot product serves 16 rows.

Repacking moves bytes; scales (and mins) stay float16 where every one of a part's is a float16
value (Q8_0, Q4_0, Q4_1, Q5_0, q8, q4: so Q4_1 and Q8_0 take the file's bytes) and are float32
otherwise (Q4_K, Q6_K: a float16 times a 6- or 8-bit scale). Every value stays exactly the
file's (tests compare with ``loading.gguf.dequantize`` bit for bit). A matrix stacked from several
tensors (q, k, v; gate, up) keeps one part per tensor, each in its own layout.

``QuantLinear`` and ``QuantEmbedding`` take the place of a model's ``nn.Linear`` and
``nn.Embedding`` (``quant.build``): a decoding step (one token per row, up to ``NATIVE_ROWS``
rows) goes through the native integer kernel (the input quantized to int8 per 32 values); a
prompt (prefill) or more rows through a float GEMM on the weights dequantized one tile of rows
at a time, so a forward over a prompt computes what the dequantized float model computes. The
native decoding step reads the same parts (``lmlab.native``); generation runs a prompt of up to
``engine.steps.SHORT_PROMPT`` tokens as native steps, faster there than the GEMMs.

Float models quantize at load (``lmlab.load(MODEL, quant="q8"|"q4")``): groups of 32 values,
q8 as GGUF's Q8_0 (scale max|w| / 127), q4 as GGUF's Q4_1 (scale (max - min) / 15 and the
min), both scales rounded to float16 as the GGUF blocks store them, so ``lmlab quantize``
writes exactly what was run.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab import native
from lmlab.errors import LmlabError

Q8, Q4 = 1, 2  # LMLAB_Q8, LMLAB_Q4 in csrc/quant.h
GROUP = 32  # values per scale in lmlab's q8 and q4
NATIVE_ROWS = 8  # rows of input the integer kernel takes; more rows dequantize a tile into a GEMM
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")  # GGUF block types kept as they are
QUANTS = ("native", "q8", "q4")  # what lmlab.load(quant=...) takes
TILE_VALUES = 1 << 19  # values of W dequantized at a time for a GEMM (2 MB of float32)
LONG_ROWS = 64  # rows of x from which a GEMM takes tiles four times that size


class QuantPart:
    """Rows of a matrix in one layout: q (rows, K) int8 or (rows, K / 2) uint8; scale and min
    (rows, K / group) float16 or float32, both the same (min: Q4 only; None for Q4_0's -8 d).

    ``tile``: 0, or ``TILE`` (Q4 only) where the rows are tiled in blocks of 16: the tensors keep
    their shapes, but a block's bytes are in ``tile_part``'s order, so rows can be sliced only at
    block boundaries; ``untile_part`` gives the plain layout back."""

    __slots__ = ("kind", "group", "q", "scale", "min", "source_type", "qh", "tile")

    def __init__(self, kind, group, q, scale, min=None, source_type="", qh=None, tile=0):
        self.kind, self.group, self.q, self.scale, self.min = kind, group, q, scale, min
        self.source_type = source_type  # the GGUF type it came from, or lmlab's q8/q4
        self.qh = qh  # Q4 only: int32 (rows, K / 32) fifth bits (Q5_0), or None
        self.tile = tile

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.min, self.qh) if t is not None)


class QuantWeight:
    """A quantized (N, K) matrix: parts stacked by rows. ``struct`` is the C view of it."""

    def __init__(self, parts: list[QuantPart], K: int):
        if not 1 <= len(parts) <= native.QPARTS:
            raise LmlabError(f"a quantized matrix takes 1 to {native.QPARTS} parts, got {len(parts)}.")
        self.parts, self.K = parts, K
        self.shape = (sum(p.rows for p in parts), K)
        self._struct = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def types(self) -> list[str]:
        return [p.source_type for p in self.parts]

    @property
    def struct(self) -> native.QMat:
        if self._struct is None:
            s = native.QMat(n_parts=len(self.parts))
            for i, p in enumerate(self.parts):
                s.parts[i] = native.QPart(
                    type=p.kind,
                    rows=p.rows,
                    group=p.group,
                    q=p.q.data_ptr(),
                    scale=p.scale.data_ptr(),
                    min=p.min.data_ptr() if p.min is not None else None,
                    scale16=int(p.scale.dtype == torch.float16),
                    qh=p.qh.data_ptr() if p.qh is not None else None,
                    tile=p.tile,
                )
            self._struct = s
        return self._struct

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) as float32 (r1 - r0, K), into ``out`` (contiguous, that shape) when given."""
        out = torch.empty(r1 - r0, self.K) if out is None else out
        lib = native._usable()
        if lib is not None:
            lib.lmlab_q_dequant_rows(ctypes.byref(self.struct), self.K, r0, r1, out.data_ptr())
            return out
        start = 0
        for p in self.parts:
            a, b = max(r0, start), min(r1, start + p.rows)
            if a < b:
                out[a - r0 : b - r0] = dequantize_part(p, a - start, b - start)
            start += p.rows
        return out

    def dequantize(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """(n, groups, 32) values 0..15 -> (n, groups * 16) bytes in the Q4 layout: groups 2c and
    2c + 1 share 32 bytes (the first in the low nibbles); a last group alone keeps Q4_0's order
    (values j and j + 16 in byte j)."""
    n, G, _ = v.shape
    pairs = v[:, : G - G % 2].reshape(n, G // 2, 2, 32)
    out = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, -1)
    if G % 2:
        last = v[:, -1]
        out = torch.cat([out, last[:, :16] | (last[:, 16:] << 4)], dim=1)
    return out.contiguous()


def unpack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``pack_nibbles`` undone: (n, groups * 16) bytes -> (n, groups, 32) uint8 values."""
    n, G = q.shape[0], q.shape[1] // 16
    body = q[:, : (G - G % 2) * 16].reshape(n, G // 2, 1, 32)
    v = torch.cat([body & 15, body >> 4], dim=2).reshape(n, G - G % 2, 32)
    if G % 2:
        last = q[:, -16:]
        v = torch.cat([v, torch.cat([last & 15, last >> 4], dim=1)[:, None]], dim=1)
    return v


# ----------------------------------------------------------------------------- tiled Q4

TILE = 16  # rows per block of a tiled Q4 part (LMLAB_QTILE in csrc/quant.h)


def _bits(words: torch.Tensor) -> np.ndarray:
    """Little-endian words (any int dtype) -> their bits, one uint8 each, lowest first: (..., 8 * bytes)."""
    w = words.contiguous()
    return np.unpackbits(w.numpy().view(np.uint8), bitorder="little").reshape(*w.shape[:-1], -1)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """``_bits`` undone: (..., 8 k) bits -> (..., k) bytes (view them as the words they were)."""
    return np.packbits(np.ascontiguousarray(bits), axis=-1, bitorder="little")


def tileable(p: QuantPart) -> bool:
    """Whether ``tile_part`` takes the part: plain, Q4 or Q8 with groups of 32, rows whole blocks of 16."""
    return not p.tile and p.rows % TILE == 0 and (p.kind == Q4 or (p.kind == Q8 and p.group == 32))


def tile_part(p: QuantPart) -> QuantPart:
    """A plain Q4 part, or Q8 with groups of 32 (rows a multiple of 16) -> the same values tiled
    (``csrc/quant.c``, "tiled Q4"): in block b, group g's bytes hold at 64 j + 4 r + i row r's
    value 8 j + i (low nibble) and 8 j + 4 + i (high) for Q4, value 4 j + i plus 128 for Q8;
    scales, mins and fifth bits go by (block, group, row)."""
    if not tileable(p):
        raise ValueError("tile_part takes a plain Q4 part, or Q8 with groups of 32, whose rows are a multiple of 16")
    n, G = p.scale.shape
    B = n // TILE
    if p.kind == Q8:  # (b, r, g, j, i) -> (b, g, j, r, i), + 128
        q = (p.q.view(torch.uint8).view(B, TILE, G, 8, 4).permute(0, 2, 3, 1, 4) ^ 0x80).reshape(n, -1)
        q = q.contiguous().view(torch.int8)
    else:
        v = unpack_nibbles(p.q).view(B, TILE, G, 4, 2, 4)  # (b, r, g, j, h, i): value 8 j + 4 h + i
        v = v.permute(0, 2, 3, 1, 5, 4)  # (b, g, j, r, i, h)
        q = (v[..., 0] | (v[..., 1] << 4)).reshape(n, -1).contiguous()

    def by_block(t):
        return t.view(B, TILE, G).transpose(1, 2).reshape(n, G).contiguous() if t is not None else None

    qh = None
    if p.qh is not None:  # mask 2 j + h, bit 4 r + i: row r's fifth bit of value 8 j + 4 h + i
        bits = _bits(p.qh).reshape(B, TILE, G, 4, 2, 4).transpose(0, 2, 3, 4, 1, 5)  # (b, g, j, h, r, i)
        qh = torch.from_numpy(_pack_bits(bits.reshape(n, -1)).view(np.int32))
    return QuantPart(p.kind, p.group, q, by_block(p.scale), by_block(p.min), p.source_type, qh, TILE)


def untile_part(p: QuantPart, r0: int = 0, r1: int | None = None) -> QuantPart:
    """Rows [r0, r1) of a part in the plain layout (a tiled part's blocks untiled; a plain part's
    rows sliced)."""
    r1 = p.rows if r1 is None else r1
    if not p.tile:

        def rows(t):
            return t[r0:r1] if t is not None else None

        return QuantPart(p.kind, p.group, p.q[r0:r1], p.scale[r0:r1], rows(p.min), p.source_type, rows(p.qh))
    a, b = r0 // TILE * TILE, -(-r1 // TILE) * TILE  # the whole blocks that hold the rows
    n, G, B = b - a, p.scale.shape[1], (b - a) // TILE
    if p.kind == Q8:
        t = p.q[a:b].view(torch.uint8).reshape(B, G, 8, TILE, 4) ^ 0x80  # (b, g, j, r, i)
        q = t.permute(0, 3, 1, 2, 4).reshape(n, -1).contiguous().view(torch.int8)
    else:
        t = p.q[a:b].reshape(B, G, 4, TILE, 4)  # (b, g, j, r, i) bytes
        v = torch.stack([t & 15, t >> 4], dim=-1)  # (b, g, j, r, i, h)
        q = pack_nibbles(v.permute(0, 3, 1, 2, 5, 4).reshape(n, G, 32))

    def by_row(x):
        return x[a:b].view(B, G, TILE).transpose(1, 2).reshape(n, G)[r0 - a : r1 - a] if x is not None else None

    qh = None
    if p.qh is not None:
        bits = _bits(p.qh[a:b]).reshape(B, G, 4, 2, TILE, 4).transpose(0, 4, 1, 2, 3, 5)  # (b, r, g, j, h, i)
        qh = torch.from_numpy(_pack_bits(bits.reshape(n, -1)).view(np.int32))[r0 - a : r1 - a]
    return QuantPart(p.kind, p.group, q[r0 - a : r1 - a], by_row(p.scale), by_row(p.min), p.source_type, qh)


def dequantize_part(p: QuantPart, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """The reference: rows [r0, r1) of a part as float32, in torch (the C code must agree)."""
    r1 = p.rows if r1 is None else r1
    if p.tile:
        p, r0, r1 = untile_part(p, r0, r1), 0, r1 - r0
    if p.kind == Q8:
        q = p.q[r0:r1].float()
        return (q.view(q.shape[0], -1, p.group) * p.scale[r0:r1, :, None].float()).reshape(q.shape)
    v = unpack_nibbles(p.q[r0:r1])  # (n, groups, 32)
    if p.qh is not None:  # fifth bits
        bits = (p.qh[r0:r1, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        v = v.to(torch.int32) | (bits << 4)
    v = v.float()
    d = p.scale[r0:r1, :, None].float()
    m = p.min[r0:r1, :, None].float() if p.min is not None else (-16 if p.qh is not None else -8) * d
    return (v * d + m).reshape(v.shape[0], -1)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies instead of x: x rounded to int8 per group of 32 (sx = max|x| / 127),
    as floats. The reference the tests hold the native kernel to."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(g * inv) * d).reshape(x.shape)


# ----------------------------------------------------------------------------- GGUF blocks -> parts


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _half(b: torch.Tensor) -> torch.Tensor:
    """Float16 values stored in bytes, kept float16."""
    return b.contiguous().view(torch.float16)


def narrow_scales(p: QuantPart) -> QuantPart:
    """The part with its scale and min as float16 where each of them is a float16 value (nothing
    changes value), else as they are (float32)."""
    if p.scale.dtype == torch.float16:
        return p
    ts = [p.scale] + ([p.min] if p.min is not None else [])
    halves = [t.half() for t in ts]
    if all(torch.equal(h.float(), t) for h, t in zip(halves, ts)):
        p.scale = halves[0]
        p.min = halves[1] if p.min is not None else None
    return p


def pack_gguf(raw: torch.Tensor, type_name: str) -> QuantPart:
    """GGUF blocks (rows, bytes per row) uint8 -> a part with exactly the same values."""
    from lmlab.loading.gguf import GGML_TYPES, _k_low4, _k_scales, _nibbles

    sizes = {name: (be, bb) for name, be, bb in GGML_TYPES.values()}
    if type_name not in GGUF_TYPES:
        raise LmlabError(
            f"GGUF type {type_name} cannot run quantized in lmlab (it runs {', '.join(GGUF_TYPES)}); "
            "load the model with --dtype float32 or bfloat16 to dequantize it."
        )
    rows = raw.shape[0]
    be, bb = sizes[type_name]
    b = raw.reshape(-1, bb)
    K = raw.shape[1] // bb * be
    if type_name == "Q8_0":
        q = b[:, 2:].view(torch.int8).reshape(rows, K)  # a copy: the quants without the scales between them
        return QuantPart(Q8, 32, q, _half(b[:, :2]).reshape(rows, -1), source_type=type_name)
    if type_name == "Q5_0":  # the low four bits as Q4's nibbles, the fifth as a word per group; m = -16 d
        q = pack_nibbles(_nibbles(b[:, 6:22]).reshape(rows, K // 32, 32))
        qh = b[:, 2:6].contiguous().view(torch.int32).reshape(rows, -1)  # little-endian: bit j is value j's
        return QuantPart(Q4, 32, q, _half(b[:, :2]).reshape(rows, -1), None, type_name, qh.clone())
    if type_name == "Q6_K":
        ql = b[:, 0:128].reshape(-1, 2, 1, 64)
        low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
        q = (low | (high << 4)).view(torch.int8) - 32
        scale = _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()  # (blocks, 16)
        return narrow_scales(QuantPart(Q8, 16, q.reshape(rows, K), scale.reshape(rows, -1), source_type=type_name))
    if type_name in ("Q4_0", "Q4_1"):
        off = 2 if type_name == "Q4_0" else 4
        d = _f16(b[:, :2])
        m = None if type_name == "Q4_0" else _f16(b[:, 2:4]).reshape(rows, -1)  # Q4_0: m = -8 d, not stored
        q = pack_nibbles(_nibbles(b[:, off : off + 16]).reshape(rows, K // 32, 32))
        return narrow_scales(QuantPart(Q4, 32, q, d.reshape(rows, -1), m, source_type=type_name))
    # Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins; nibbles repacked to Q4_0's order
    sc, mn = _k_scales(b[:, 4:16])
    d = _f16(b[:, 0:2]) * sc
    m = -(_f16(b[:, 2:4]) * mn)
    q = pack_nibbles(_k_low4(b[:, 16:144]).reshape(rows, K // 32, 32))
    return narrow_scales(QuantPart(Q4, 32, q, d.reshape(rows, -1), m.reshape(rows, -1), source_type=type_name))


def to_gguf_blocks(p: QuantPart) -> tuple[np.ndarray, str]:
    """A part of lmlab's own q8 / q4 -> GGUF blocks (Q8_0 / Q4_1) with the same values."""
    p = untile_part(p) if p.tile else p
    rows = p.rows
    if p.kind == Q8 and p.group == 32:
        d = p.scale.reshape(-1, 1).to(torch.float16).view(torch.uint8)
        blocks = torch.cat([d.reshape(-1, 2), p.q.reshape(-1, 32).view(torch.uint8)], dim=1)
        return blocks.reshape(rows, -1).numpy(), "Q8_0"
    if p.kind == Q4 and p.qh is None:
        d = p.scale.reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2)
        mn = p.min if p.min is not None else -8 * p.scale.float()
        m = mn.reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2)
        v = unpack_nibbles(p.q).reshape(-1, 32)
        blocks = torch.cat([d, m, v[:, :16] | (v[:, 16:] << 4)], dim=1)
        return blocks.reshape(rows, -1).numpy(), "Q4_1"
    raise LmlabError(f"a {p.source_type} part has no GGUF block of lmlab's own; quantize from the float model.")


# ----------------------------------------------------------------------------- float -> q8 / q4


def quantize(w: torch.Tensor, kind: str) -> QuantPart:
    """A float (N, K) matrix -> lmlab's q8 (GGUF Q8_0's rule) or q4 (GGUF Q4_1's), groups of 32."""
    N, K = w.shape
    if K % GROUP:
        raise LmlabError(
            f"--quant {kind} needs rows that are a multiple of its block of {GROUP} values, but a {N}x{K} "
            f"matrix has rows of {K}; load this model with --dtype instead."
        )
    g = w.detach().float().reshape(N, K // GROUP, GROUP)
    if kind == "q8":
        d = (g.abs().amax(-1, keepdim=True) / 127).half().float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.round(g * inv).clamp(-127, 127).to(torch.int8)
        return narrow_scales(QuantPart(Q8, GROUP, q.reshape(N, K), d.reshape(N, -1), source_type="q8"))
    if kind == "q4":
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).half().float()
        m = lo.half().float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = torch.round((g - m) * inv).clamp(0, 15).to(torch.uint8)  # (N, groups, 32)
        part = QuantPart(Q4, GROUP, pack_nibbles(v), d.reshape(N, -1), m.reshape(N, -1), source_type="q4")
        return narrow_scales(part)
    raise LmlabError(f"unknown quantization {kind!r}; use q8 or q4 (or native for a GGUF file).")


# ----------------------------------------------------------------------------- modules


class QuantMatrixView:
    """What ``module.weight`` gives for a quantized module: shape, dtype and device like the float
    weight, and rows dequantized on indexing (``weight[ids]``); ``float()`` dequantizes it all."""

    def __init__(self, qweight: QuantWeight):
        self.qweight = qweight
        self.shape = torch.Size(qweight.shape)
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.requires_grad = False

    def data_ptr(self) -> int:
        return self.qweight.parts[0].q.data_ptr()

    def element_size(self) -> int:
        return 4

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    def float(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int):
            return self.qweight.rows(idx, idx + 1)[0]
        ids = torch.as_tensor(idx)
        return torch.stack([self.qweight.rows(int(i), int(i) + 1)[0] for i in ids.reshape(-1)]).reshape(*ids.shape, -1)


def _register(module: nn.Module, qweight: QuantWeight) -> None:
    """The parts' tensors as buffers: counted by state_dict and by the bench's stored bytes."""
    for i, p in enumerate(qweight.parts):
        module.register_buffer(f"q{i}", p.q, persistent=True)
        module.register_buffer(f"scale{i}", p.scale, persistent=True)
        if p.min is not None:
            module.register_buffer(f"min{i}", p.min, persistent=True)
        if p.qh is not None:
            module.register_buffer(f"qh{i}", p.qh, persistent=True)


class QuantLinear(nn.Module):
    """``x @ W.T + b`` with W quantized: the native integer kernel for a few rows (decoding), a
    float GEMM on W dequantized one tile of rows at a time for more (prefill)."""

    def __init__(self, qweight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        _register(self, qweight)

    @property
    def weight(self) -> QuantMatrixView:
        return QuantMatrixView(self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, types={'+'.join(self.qweight.types)}"


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes the rows it reads."""

    def __init__(self, qweight: QuantWeight):
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        _register(self, qweight)

    @property
    def weight(self) -> QuantMatrixView:
        return QuantMatrixView(self.qweight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.embedding_dim)
        for j, i in enumerate(flat):
            if not 0 <= i < self.num_embeddings:
                raise IndexError(f"token id {i} is out of range for an embedding of {self.num_embeddings} rows")
            out[j] = self.qweight.rows(i, i + 1)[0]
        return out.reshape(*ids.shape, self.embedding_dim)


def quant_linear(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a quantized W (float32 x, any leading shape)."""
    N, K = qw.shape
    rows = x.numel() // K if K else 0
    x2 = x.reshape(rows, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    lib = native._usable()
    grad = torch.is_grad_enabled() and x.requires_grad
    one_token_per_row = x.dim() < 3 or x.shape[-2] == 1  # decoding; a prompt (T > 1) takes the GEMM
    if lib is not None and not grad and 1 <= rows <= NATIVE_ROWS and one_token_per_row:
        x2 = x2.contiguous()
        y = torch.empty(rows, N)
        b = bias.detach().float().contiguous() if bias is not None else None
        rc = lib.lmlab_qlinear(
            x2.data_ptr(),
            rows,
            K,
            ctypes.byref(qw.struct),
            N,
            b.data_ptr() if b is not None else None,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        if rc == 0:
            return y.view(*x.shape[:-1], N)
    if grad:  # autograd needs the whole float weight: dequantize it, once for this call
        return F.linear(x2, qw.dequantize(), bias).view(*x.shape[:-1], N)
    # a tile of W's rows at a time, dequantized into a float GEMM: never the whole matrix in float
    y = torch.empty(rows, N)
    # a long prompt's GEMM runs faster on wider tiles (8 MB against 2, prefill of 128 / 512 tokens:
    # SmolLM2 +6% / +7%, Gemma 3 +2.5% / +2%); a short one gains nothing, and keeps the lower peak
    values = TILE_VALUES * (4 if rows >= LONG_ROWS else 1)
    step = min(N, max(16, values // max(K, 1)))
    tile = _short_tile(step * K).view(step, K) if rows < LONG_ROWS else torch.empty(step, K)
    for r0 in range(0, N if rows else 0, step):
        r1 = min(N, r0 + step)
        y[:, r0:r1] = x2 @ qw.rows(r0, r1, tile[: r1 - r0]).T
    if bias is not None:
        y += bias.float()
    return y.view(*x.shape[:-1], N)


_kept = threading.local()


def _short_tile(values: int) -> torch.Tensor:
    """A float32 buffer of ``values`` for a short prompt's tiles, kept by this thread from one call to
    the next. A fresh 2 MB tile for each of a prompt's matmuls, freed between them, raised glibc's
    mmap threshold and left holes in the heap: a 5-token prompt on SmolLM2 kept 8.5 MiB more than it
    used, and each prompt after it more again."""
    buf = getattr(_kept, "tile", None)
    if buf is None or buf.numel() < values:
        buf = _kept.tile = torch.empty(max(values, TILE_VALUES))
    return buf[:values]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def _quant_weights(model: nn.Module) -> list[QuantWeight]:
    """Every quantized matrix in ``model``, a tied one once."""
    seen = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            seen.setdefault(id(m.qweight), m.qweight)
    return list(seen.values())


def quant_bytes(model: nn.Module) -> int:
    """Bytes of every quantized matrix in ``model`` (a tied one once)."""
    return sum(qw.nbytes for qw in _quant_weights(model))


def quant_numel(model: nn.Module) -> int:
    """Values (rows × columns) of every quantized matrix in ``model`` (a tied one once): the
    parameters they stand for, which ``nn.Module.parameters`` does not see."""
    return sum(qw.shape[0] * qw.shape[1] for qw in _quant_weights(model))


__all__ = [
    "Q8",
    "Q4",
    "GROUP",
    "QUANTS",
    "GGUF_TYPES",
    "QuantPart",
    "QuantWeight",
    "QuantLinear",
    "QuantEmbedding",
    "QuantMatrixView",
    "pack_gguf",
    "quantize",
    "quantize_activations",
    "pack_nibbles",
    "unpack_nibbles",
    "dequantize_part",
    "TILE",
    "tileable",
    "tile_part",
    "untile_part",
    "narrow_scales",
    "to_gguf_blocks",
    "quant_linear",
    "is_quantized",
    "quant_bytes",
    "quant_numel",
]
