"""GGUF files (llama.cpp's format) as a lazy tensor source with Hugging Face names.

``GGUFSource(path)`` parses the header (metadata and tensor table) and nothing else. ``get(name,
dtype)`` then reads one tensor's bytes with plain file reads, dequantizes it in chunks of rows
straight into a preallocated tensor of the asked dtype, and undoes what llama.cpp's converter did,
so the result has HF's layout and HF's meaning:

- llama-arch files: q_proj/k_proj rows were permuted to interleaved rotary pairs; put back into
  HF's rotate_half order.
- gemma3 files: every RMSNorm weight was stored as ``1 + w``; subtract the 1 (lmlab's gemma norm
  computes ``x * (1 + w)`` like HF).
- gpt2 files: Linear weights are (out, in); HF's Conv1D wants (in, out).

The header is parsed here rather than with ``gguf.GGUFReader``: that reader builds a numpy object
per vocabulary entry (seconds, and hundreds of MB, for a 262k vocabulary) and reports a corrupt
file with assorted internal exceptions. Dequantization is vectorised torch code for the common
types, and ``gguf.quants`` (numpy) for the rare ones.

GGUF layout (v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count, the metadata key/values, the tensor table (name, dims fastest-first, ggml type, offset),
then, aligned to ``general.alignment`` (32), the tensor data.
"""

from __future__ import annotations

import gc
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.host import give_back_freed_memory

ARCHITECTURES = ("gemma3", "gpt2", "llama", "qwen2", "qwen3")

# ----------------------------------------------------------------------------- ggml types

# ggml type id -> (name, elements per block, bytes per block), for every type ggml defines that
# lmlab can read or should name in an error.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
_TYPE_BY_NAME = {name: (tid, be, bb) for tid, (name, be, bb) in GGML_TYPES.items()}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Types whose blocks ``gguf.quants`` (numpy) dequantizes for us; rare enough that speed is moot.
_NUMPY_TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) packed bytes -> (n, 2k): all low nibbles, then all high nibbles (ggml's order)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) bits, least significant first: bit j of a little-endian word."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


def _q4_0(b):  # d f16 | 16 bytes of 4-bit quants, offset 8
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b):  # d f16 | m f16 | 16 bytes of 4-bit quants
    return _f16(b[:, :2]) * _nibbles(b[:, 4:20]).float() + _f16(b[:, 2:4])


def _q5_0(b):  # d f16 | 32 high bits (u32) | 16 bytes of low nibbles, offset 16
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b):  # d f16 | m f16 | 32 high bits | 16 bytes of low nibbles
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q8_0(b):  # d f16 | 32 int8
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, (n, 8) each, as float32."""
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], dim=1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return sc.float(), m.float()


def _k_low4(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 128 bytes -> (n, 8, 32) nibbles: each 32-byte run holds sub-blocks 2i (low) and 2i+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b):  # d f16 | dmin f16 | 12 bytes of scales/mins | 128 bytes of 4-bit quants: 8 sub-blocks of 32
    sc, m = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * m).unsqueeze(-1)
    return (d * _k_low4(b[:, 16:144]).float() - dm).reshape(-1, 256)


def _q5_k(b):  # d | dmin | 12 bytes scales | 32 bytes high bits (bit k = sub-block k) | 128 bytes nibbles
    sc, m = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * m).unsqueeze(-1)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # (n, 8, 32)
    q = _k_low4(b[:, 48:176]) | (high << 4)
    return (d * q.float() - dm).reshape(-1, 256)


def _q6_k(b):  # 128 bytes low nibbles | 64 bytes high 2-bit pairs | 16 int8 scales | d f16; two halves of 128
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # groups l, l+32, l+64, l+96
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = ((low | (high << 4)).view(torch.int8) - 32).float().reshape(-1, 16, 16)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(-1, 256)


_DEQUANT = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
SUPPORTED_TYPES = tuple(_PLAIN) + tuple(_DEQUANT) + _NUMPY_TYPES


def dequantize(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Blocks of one ggml type -> float32 values.

    raw: (rows, bytes per row) uint8. Returns (rows, elements per row) float32 (F16/BF16 rows come
    back in their own dtype, which is exact).
    """
    rows = raw.shape[0]
    if type_name in _PLAIN:
        return raw.view(_PLAIN[type_name])
    if type_name in _DEQUANT:
        _, _, block_bytes = _TYPE_BY_NAME[type_name]
        return _DEQUANT[type_name](raw.reshape(-1, block_bytes)).reshape(rows, -1)
    if type_name in _NUMPY_TYPES:
        import gguf.quants

        qtype = getattr(gguf.GGMLQuantizationType, type_name)
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw.numpy(), qtype), dtype=np.float32))
    raise LmlabError(
        f"ggml type {type_name} cannot be dequantized by lmlab; supported types: {', '.join(SUPPORTED_TYPES)}."
    )


# ----------------------------------------------------------------------------- header parsing

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_BIG_ARRAY = 256  # arrays longer than this (vocabularies, merges) stay out of ``metadata``


class _Corrupt(Exception):
    """The header does not parse; the message says where."""


class _HeaderCursor:
    """Sequential reads over the start of a file, fetched in large pieces (headers can be ~10 MB)."""

    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size
        self.buf = bytearray()
        self.pos = 0

    def need(self, n: int) -> None:
        end = self.pos + n
        if end > self.size:
            raise _Corrupt(f"it ends at byte {self.size}, inside its header")
        if end > len(self.buf):
            self.buf += self.fh.read(max(end - len(self.buf), 1 << 22))
            if end > len(self.buf):
                raise _Corrupt(f"it ends at byte {len(self.buf)}, inside its header")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        out = []
        unpack, buf = struct.unpack_from, self.buf
        for _ in range(count):
            self.need(8)
            (n,) = unpack("<Q", buf, self.pos)
            self.pos += 8
            self.need(n)
            buf = self.buf  # need() may have grown it
            out.append(buf[self.pos : self.pos + n].decode("utf-8", errors="replace"))
            self.pos += n
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > self.size:
                raise _Corrupt(f"an array claims {count} elements")
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype])
                self.need(count * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr
            if etype == 8:
                return self.strings(count)
            if etype == 9:
                return [self.value(9) for _ in range(count)]
            raise _Corrupt(f"an array has unknown element type {etype}")
        raise _Corrupt(f"a metadata value has unknown type {vtype}")


def _plain(v):
    """numpy scalars/arrays -> Python values (metadata must be JSON-friendly)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


# ----------------------------------------------------------------------------- names

# GGUF tensor name -> HF name, for the "model.layers.{i}.self_attn.q_proj" families.
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# gemma3 has sandwich norms: llama.cpp's ffn_norm is HF's pre_feedforward_layernorm there.
_GEMMA3_LAYER = {
    **_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_GLOBAL = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_SKIP = {"rope_freqs.weight"}  # llama3 rope factors: read into hf_config()["rope_scaling"], not a weight


def _hf_name(arch: str, gguf_name: str) -> str | None:
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    glob, layer, prefix = (
        (_GPT2_GLOBAL, _GPT2_LAYER, "transformer.h")
        if arch == "gpt2"
        else (_GLOBAL, _GEMMA3_LAYER if arch == "gemma3" else _LAYER, "model.layers")
    )
    if stem in glob:
        return f"{glob[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer:
        return f"{prefix}.{parts[1]}.{layer[parts[2]]}.{suffix}"
    return None


# Tokens that end a turn in chat models; generation should stop at them like at EOS (HF lists them
# in generation_config.json, llama.cpp treats them as end-of-generation).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")


@dataclass
class _Tensor:
    gguf_name: str
    type_name: str
    shape: tuple[int, ...]  # HF/torch order (slowest first)
    offset: int  # absolute file offset
    nbytes: int
    transform: tuple = ()  # ("permute", n_heads) | ("offset", -1.0) | ("transpose",)


class GGUFSource:
    """A GGUF file's tensors under HF names, read and dequantized one at a time.

    path: the file. metadata: the header's key/values as plain Python (without the big vocabulary
    arrays; read those with ``array(key)``). arch: ``general.architecture``.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LmlabError(f"{self.path} does not exist; check the path to the .gguf file.")
        self.file_size = self.path.stat().st_size
        self.metadata: dict = {}
        self._arrays: dict = {}
        try:
            with open(self.path, "rb") as fh:
                infos = self._parse(fh)
        except _Corrupt as e:
            raise LmlabError(f"{self.path} is not a valid GGUF file ({e}); re-download it.") from None
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            raise LmlabError(
                f"{self.path} is not a valid GGUF file ({type(e).__name__}: {e}); re-download it."
            ) from None
        self.arch = str(self.metadata.get("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise LmlabError(
                f"{self.path} holds a {self.arch or 'unnamed'!r} model, which lmlab cannot load from GGUF; "
                f"supported architectures: {', '.join(ARCHITECTURES)}."
            )
        self._tensors: dict[str, _Tensor] = {}
        self._extra: dict[str, _Tensor] = {}
        self._eos_ids: list[int] | None = None
        self._build(infos)

    # -- parsing

    def _parse(self, fh) -> list[tuple[str, tuple[int, ...], int, int]]:
        cur = _HeaderCursor(fh, self.file_size)
        cur.need(4)
        if bytes(cur.buf[:4]) != b"GGUF":
            raise _Corrupt("it does not start with the GGUF magic bytes")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            if int.from_bytes(struct.pack("<I", version), "big") in (2, 3):
                raise LmlabError(
                    f"{self.path} is a big-endian GGUF file, which lmlab cannot read; "
                    "use the little-endian version of the model."
                )
            raise _Corrupt(f"it has GGUF version {version}; lmlab reads versions 2 and 3")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise _Corrupt(f"its header claims {n_tensors} tensors and {n_kv} metadata keys")
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(cur.scalar("<I"))
            if isinstance(value, (list, np.ndarray)) and len(value) > _BIG_ARRAY:
                self._arrays[key] = value
            else:
                self.metadata[key] = _plain(value)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise _Corrupt(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", 32)) or 32
        self.data_start = (cur.pos + align - 1) // align * align
        return infos

    def _build(self, infos) -> None:
        md, arch = self.metadata, self.arch
        n_heads = _first(md.get(f"{arch}.attention.head_count"))
        n_kv = _first(md.get(f"{arch}.attention.head_count_kv")) or n_heads
        for name, shape, type_id, rel_offset in infos:
            if type_id not in GGML_TYPES:
                raise LmlabError(
                    f"{self.path}: tensor {name!r} has ggml type id {type_id}, which lmlab does not know; "
                    f"supported types: {', '.join(SUPPORTED_TYPES)}."
                )
            type_name, block_elems, block_bytes = GGML_TYPES[type_id]
            if type_name not in SUPPORTED_TYPES:
                raise LmlabError(
                    f"{self.path}: tensor {name!r} is quantized as {type_name}, which lmlab cannot dequantize; "
                    f"supported types: {', '.join(SUPPORTED_TYPES)} (re-quantize the model with one of these)."
                )
            numel = math.prod(shape)
            if shape[-1] % block_elems:
                raise LmlabError(
                    f"{self.path} is not a valid GGUF file (tensor {name!r} has rows of {shape[-1]} values, "
                    f"not a multiple of {type_name}'s block of {block_elems}); re-download it."
                )
            nbytes = numel // block_elems * block_bytes
            offset = self.data_start + rel_offset
            if offset + nbytes > self.file_size:
                raise LmlabError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {offset + nbytes} "
                    f"but the file has {self.file_size}; re-download it."
                )
            t = _Tensor(name, type_name, shape, offset, nbytes)
            hf = _hf_name(arch, name)
            if hf is None:
                self._extra[name] = t  # rope_freqs and anything llama.cpp adds that HF has no name for
                continue
            leaf = name.split(".")[-2]
            if arch == "llama" and leaf in ("attn_q", "attn_k"):
                heads = n_heads if leaf == "attn_q" else n_kv
                if not heads or shape[0] % (2 * heads):
                    raise LmlabError(
                        f"{self.path} is not a valid GGUF file ({name!r} has {shape[0]} rows, which "
                        f"{heads} heads of rotary pairs cannot split); re-download it."
                    )
                t.transform = ("permute", heads)
            elif arch == "gemma3" and name.endswith("norm.weight"):
                t.transform = ("offset", -1.0)
            elif (
                arch == "gpt2"
                and name.endswith(".weight")
                and leaf in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
            ):
                t.transform = ("transpose",)
            if t.transform and t.transform[0] == "transpose":
                t.shape = tuple(reversed(shape))
            self._tensors[hf] = t

    # -- public API

    def keys(self) -> list[str]:
        """HF tensor names, in file order."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def array(self, key: str):
        """A metadata value that may be a big array (tokenizer.ggml.tokens, .scores, .merges...), or None."""
        if self._arrays is None:
            raise RuntimeError("GGUFSource.array() after release_arrays(): read the arrays before releasing them")
        if key in self._arrays:
            return self._arrays[key]
        return self.metadata.get(key)

    def release_arrays(self) -> None:
        """Drop the big metadata arrays once the tokenizer and the config are built from them, so
        they do not stay in memory while the weights load (Gemma 3's 262k-token vocabulary: ~70 MiB)."""
        self.eos_token_ids()  # the one later reader: computed now, kept
        self._arrays = None
        # the arrays and the tokenizer's building lists were small Python objects: their freed heap
        # pages stay in the process (the weights' large blocks are mapped apart and never reuse
        # them) until handed back (Gemma 3: 68 MiB)
        gc.collect()
        give_back_freed_memory()

    def tensor_types(self) -> dict[str, str]:
        """HF name -> ggml type name (F32, Q4_K...)."""
        return {hf: t.type_name for hf, t in self._tensors.items()}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {hf: t.shape for hf, t in self._tensors.items()}

    def weight_bytes_on_disk(self) -> int:
        """Bytes of tensor data in the file (quantized size), all tensors included."""
        return sum(t.nbytes for t in self._tensors.values()) + sum(t.nbytes for t in self._extra.values())

    @property
    def quantization(self) -> str:
        """The file's overall quantization as llama.cpp names it (Q4_K_M, Q8_0, F16...)."""
        ftype = self.metadata.get("general.file_type")
        try:
            import gguf

            return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError, ImportError):
            types = sorted({t.type_name for t in self._tensors.values()})
            return "+".join(types)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor into a new tensor of ``dtype``, in HF layout and HF semantics."""
        t = self._tensors.get(name)
        if t is None:
            raise LmlabError(
                f"{self.path} has no tensor {name!r} (it has {len(self._tensors)}, "
                f"e.g. {next(iter(self._tensors), '')}); "
                "the file does not match this model's architecture."
            )
        if not t.transform:
            return self._read(t, dtype)
        w = self._read(t, torch.float32)
        kind = t.transform[0]
        if kind == "permute":
            # llama.cpp stored each head's rows as (D/2, 2) interleaved pairs; HF wants (2, D/2) halves.
            heads = t.transform[1]
            w = w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(t.shape)
        elif kind == "offset":
            w += t.transform[1]
        elif kind == "transpose":
            w = w.reshape(tuple(reversed(t.shape))).t().contiguous()
        return w if dtype == torch.float32 else w.to(dtype)

    def raw(self, name: str, r0: int = 0, r1: int | None = None) -> tuple[torch.Tensor, str]:
        """One tensor's blocks as stored, (rows, bytes per row) uint8, and its ggml type name: what
        lmlab.quant repacks without dequantizing. Rows come in HF's order (llama.cpp's q/k
        permutation undone, a permutation of whole rows); a "transpose" tensor (gpt2's) comes as
        stored, (out, in), which is nn.Linear's layout. Norm offsets do not apply (norms are F32)."""
        t = self._tensors.get(name)
        if t is None:
            raise LmlabError(f"{self.path} has no tensor {name!r}; the file does not match this model's architecture.")
        _, block_elems, block_bytes = _TYPE_BY_NAME[t.type_name]
        shape = t.shape if t.transform[:1] != ("transpose",) else tuple(reversed(t.shape))
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        row_bytes = t.nbytes // rows
        if t.transform[:1] == ("permute",):
            r0, r1 = 0, None  # a permutation of rows: read them all (q and k projections are small)
        r1 = rows if r1 is None else min(r1, rows)
        out = torch.empty(r1 - r0, row_bytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            _read_into(fh, t.offset + r0 * row_bytes, out.view(-1), self.path, t.gguf_name)
        if t.transform[:1] == ("permute",):
            heads = t.transform[1]
            out = out.reshape(heads, -1, 2, out.shape[1]).transpose(1, 2).reshape(rows, -1).contiguous()
        return out, t.type_name

    def _read(self, t: _Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as stored (llama.cpp's layout), dequantized into ``dtype`` chunk by chunk."""
        shape = t.shape if t.transform[:1] != ("transpose",) else tuple(reversed(t.shape))
        out = torch.empty(shape, dtype=dtype)
        if out.numel() == 0:
            return out
        row_elems = shape[-1]
        rows = out.numel() // row_elems
        row_bytes = t.nbytes // rows
        with open(self.path, "rb", buffering=0) as fh:
            if _PLAIN.get(t.type_name) == dtype:  # stored exactly as asked: read straight into the result
                _read_into(fh, t.offset, out.view(-1).view(torch.uint8), self.path, t.gguf_name)
                return out
            flat = out.view(rows, row_elems)
            step = max(1, _CHUNK_ELEMENTS // row_elems)
            buf = torch.empty(min(step, rows) * row_bytes, dtype=torch.uint8)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                raw = buf[: n * row_bytes]
                _read_into(fh, t.offset + r0 * row_bytes, raw, self.path, t.gguf_name)
                try:
                    vals = dequantize(raw.view(n, row_bytes), t.type_name)
                except LmlabError:
                    raise
                except Exception as e:  # noqa: BLE001 - numpy fallback on a corrupt block
                    raise LmlabError(
                        f"{self.path}: tensor {t.gguf_name!r} could not be dequantized ({type(e).__name__}: {e}); "
                        "re-download the file."
                    ) from None
                flat[r0 : r0 + n].copy_(vals)
        del buf, raw, vals
        give_back_freed_memory()
        return out

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.path)!r}, arch={self.arch!r}, tensors={len(self._tensors)}, {self.quantization})"

    # -- config

    def eos_token_ids(self) -> list[int]:
        """EOS, plus the end-of-turn tokens (eot/eom ids, or control tokens like <end_of_turn>) that
        also end generation."""
        if self._eos_ids is None:
            self._eos_ids = self._find_eos_ids()
        return list(self._eos_ids)

    def _find_eos_ids(self) -> list[int]:
        md = self.metadata
        ids = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        tokens, types = self.array("tokenizer.ggml.tokens"), self.array("tokenizer.ggml.token_type")
        if tokens is not None:
            index = {}
            for i, tok in enumerate(tokens):
                if tok in END_OF_TURN_TOKENS and (types is None or int(types[i]) == 3):
                    index.setdefault(tok, i)
            ids += [index[t] for t in END_OF_TURN_TOKENS if t in index]
        out: list[int] = []
        for i in ids:
            if i is not None and int(i) not in out:
                out.append(int(i))
        return out

    def hf_config(self) -> dict:
        """A transformers-style config.json dict for this model (what ``config_from_hf`` reads)."""
        md, arch = self.metadata, self.arch

        def key(name, default=None):
            return md.get(f"{arch}.{name}", default)

        vocab = self._vocab_size()
        eos = self.eos_token_ids()
        special = {
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        }
        tie = "lm_head.weight" not in self._tensors
        heads = _first(key("attention.head_count"))
        hidden = key("embedding_length")
        layers = key("block_count")
        ctx = key("context_length", 2048)
        if None in (heads, hidden, layers):
            raise LmlabError(
                f"{self.path} lacks {arch}.embedding_length, .block_count or .attention.head_count in its metadata; "
                "re-convert it with a current llama.cpp."
            )
        ff = _first(key("feed_forward_length"))
        if arch == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": hidden,
                "n_layer": layers,
                "n_head": heads,
                "n_inner": ff,
                "n_positions": ctx,
                "n_ctx": ctx,
                "vocab_size": vocab,
                "layer_norm_epsilon": _f32(key("attention.layer_norm_epsilon", 1e-5)),
                "activation_function": "gelu_new",
                "tie_word_embeddings": tie,
                **special,
            }
        kv = _first(key("attention.head_count_kv")) or heads
        head_dim = (
            key("attention.key_length") or (key("rope.dimension_count") if arch == "llama" else None) or hidden // heads
        )
        cfg = {
            "architectures": [],
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": ff,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(key("rope.freq_base", 10000.0)),
            "max_position_embeddings": ctx,
            "vocab_size": vocab,
            "tie_word_embeddings": tie,
            "rope_scaling": self._rope_scaling(),
            **special,
        }
        # transformers 5 style too: one RoPE dict, or one per layer type (gemma3)
        cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": cfg["rope_theta"],
            **(cfg["rope_scaling"] or {}),
        }
        bias = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        if arch == "llama":
            name = str(md.get("general.name", "")).lower()
            mt = "mistral" if "mistral" in name else "llama"  # llama.cpp writes Mistral as llama, as transformers notes
            cfg.update(
                model_type=mt,
                architectures=["MistralForCausalLM" if mt == "mistral" else "LlamaForCausalLM"],
                hidden_act="silu",
                attention_bias=bias,
                mlp_bias=False,
            )
            if mt == "mistral":
                cfg["sliding_window"] = key("attention.sliding_window")
        elif arch == "qwen2":
            cfg.update(architectures=["Qwen2ForCausalLM"], hidden_act="silu", use_sliding_window=False)
        elif arch == "qwen3":
            cfg.update(architectures=["Qwen3ForCausalLM"], hidden_act="silu", attention_bias=bias)
        elif arch == "gemma3":
            pattern = 6  # llama.cpp hard-codes gemma3's 5 sliding : 1 full layers
            # llama.cpp: the 27B scales queries by 1/sqrt(hidden/heads), the others by 1/sqrt(head_dim).
            scalar = hidden // heads if (hidden, layers) == (5376, 62) else head_dim
            cfg.update(
                model_type="gemma3_text",
                architectures=["Gemma3ForCausalLM"],
                hidden_activation="gelu_pytorch_tanh",
                rope_local_base_freq=_f32(key("rope.freq_base_swa", 10000.0)),
                sliding_window=key("attention.sliding_window", 512),
                sliding_window_pattern=pattern,
                query_pre_attn_scalar=scalar,
                layer_types=[
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
                ],
                final_logit_softcapping=key("final_logit_softcapping"),
                attn_logit_softcapping=key("attn_logit_softcapping"),
                attention_bias=False,
            )
            cfg["rope_parameters"] = {
                "full_attention": cfg["rope_parameters"],
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]},
            }
        return cfg

    def _vocab_size(self) -> int:
        for name in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if name in self._tensors:
                return self._tensors[name].shape[0]
        tokens = self.array("tokenizer.ggml.tokens")
        return self.metadata.get(f"{self.arch}.vocab_size") or (len(tokens) if tokens is not None else 0)

    def _rope_scaling(self) -> dict | None:
        md, arch = self.metadata, self.arch
        kind = md.get(f"{arch}.rope.scaling.type")
        factor = md.get(f"{arch}.rope.scaling.factor")
        if kind in ("linear", "yarn") and factor:
            out = {"rope_type": kind, "factor": _f32(factor)}
            orig = md.get(f"{arch}.rope.scaling.original_context_length")
            if orig:
                out["original_max_position_embeddings"] = int(orig)
            return out
        if "rope_freqs.weight" in self._extra:
            factors = self._read(self._extra["rope_freqs.weight"], torch.float32).double().reshape(-1)
            # one factor per rotary frequency: the rotary dim is twice their count
            return _llama3_scaling(factors, 2 * factors.numel(), md.get(f"{arch}.rope.freq_base", 10000.0))
        return None


_CHUNK_ELEMENTS = 1 << 20  # values dequantized per step: bounds the float32 temporaries to a few MB


def _read_into(fh, offset: int, dest: torch.Tensor, path, name: str) -> None:
    """Fill ``dest`` (uint8, contiguous) with file bytes from ``offset`` (plain reads: no mmap pages in RSS)."""
    view = memoryview(dest.numpy()).cast("B")
    fh.seek(offset)
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise LmlabError(f"{path} is truncated while reading tensor {name!r}; re-download it.")
        got += n


def _first(v):
    """Per-layer lists (some files give head counts per layer) -> the first value."""
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _f32(v) -> float:
    """A float32 from the file as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(v))) if v is not None else None


def _llama3_scaling(factors: torch.Tensor, rotary_dim: int, theta: float) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor (the per-frequency divisors).

    llama.cpp keeps only the divisors: 1 for short wavelengths, ``factor`` for long ones, and
    ``1 / ((1 - s) / factor + s)`` between, with ``s = (old_ctx / wavelen - low) / (high - low)``.
    ``s`` is linear in 1/wavelen; with low_freq_factor = 1 (every Llama 3.x), the fit gives ``high``
    and ``old_ctx``.
    """
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    out = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    mid = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    if int(mid.sum()) >= 2:
        s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        xm = x[mid]
        a = float(((xm - xm.mean()) * (s - s.mean())).sum() / ((xm - xm.mean()) ** 2).sum())
        b = float(s.mean() - a * xm.mean())
        if b < 0:
            high = 1.0 - 1.0 / b
            out["high_freq_factor"] = round(high * 2) / 2
            out["original_max_position_embeddings"] = int(round(a * (high - 1.0)))
    return out


__all__ = ["GGUFSource", "dequantize", "SUPPORTED_TYPES", "ARCHITECTURES", "GGML_TYPES", "END_OF_TURN_TOKENS"]
