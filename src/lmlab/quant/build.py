"""Build a Transformer whose matmuls hold quantized weights: from a GGUF file's own blocks
(``quant="native"``) or by quantizing a float model's weights at load (``quant="q8"|"q4"``).

Both reuse the loader's key map (``loading.hf.lmlab_tensors``), which says how lmlab's
matrices are made from a checkpoint's tensors (q, k and v stacked; gate and up stacked). For
GGUF, a first pass over it with empty "meta" tensors records which file tensors make each
matrix; the second pass then reads the matrices' blocks and the rest (norms, biases) as floats.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lmlab import native
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.host import give_back_freed_memory, huge_pages
from lmlab.kernels import in_one_block
from lmlab.quant import (
    GGUF_TYPES,
    TILE,
    QuantEmbedding,
    QuantLinear,
    QuantPart,
    QuantWeight,
    pack_gguf,
    quantize,
    tile_part,
    tileable,
)

# lmlab's matrices that may be quantized: every Linear of the blocks, the head and the token embedding
_SLOTS = re.compile(r"^(tok_embed|lm_head|blocks\.\d+\.(attn\.qkv|attn\.o|mlp\.up|mlp\.down))\.weight$")


def _slot(name: str) -> bool:
    return bool(_SLOTS.match(name))


class _ShapesOnly(TorchFunctionMode):
    """Meta tensors without torch's Python meta kernels: ``torch.cat`` of meta tensors computes its
    shape here, and random init of a meta parameter (``nn.Embedding``'s ``normal_``) is skipped.

    The first meta op without a C++ meta kernel imports ``torch._decomp``'s decompositions and with
    them ``torch._dynamo``: ~800 modules, ~70 MB of RSS for a load that only wants shapes
    (measured on SmolLM2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
            t = args[0] if args else kwargs["tensor"]
            if t.is_meta:
                return t
        if func is torch.cat:
            ts = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if ts and all(isinstance(t, torch.Tensor) and t.is_meta for t in ts):
                shape = list(ts[0].shape)
                shape[dim] = sum(t.shape[dim] for t in ts)
                return torch.empty(shape, dtype=ts[0].dtype, device="meta")
        return func(*args, **kwargs)


class _Recorder:
    """A tensor source that hands out meta tensors for the names in ``meta`` (all 2-D ones when
    None) and remembers which it handed out since the last ``take``."""

    def __init__(self, source, shapes: dict, meta: set | None):
        self.source, self.shapes, self.meta, self.asked = source, shapes, meta, []

    def keys(self):
        return self.source.keys()

    def get(self, name, dtype):
        if (self.meta is None and len(self.shapes[name]) == 2) or (self.meta is not None and name in self.meta):
            self.asked.append(name)
            return torch.empty(self.shapes[name], device="meta")
        return self.source.get(name, dtype)

    def take(self) -> list[str]:
        out, self.asked = self.asked, []
        return out


def gguf_tensors(cfg: ModelConfig, source):
    """(lmlab name, float tensor or QuantWeight) for every parameter, from a GGUFSource: a matrix
    whose tensors all have a type lmlab runs natively (``GGUF_TYPES``) stays in its blocks."""
    from lmlab.loading.hf import lmlab_tensors

    # what was freed before the weights arrive (the tokenizer's construction: ~75 MiB of heap for
    # Gemma 3's 262k-token vocabulary) goes back to the OS instead of under the weights' peak
    give_back_freed_memory()
    types, shapes = source.tensor_types(), source.tensor_shapes()
    dry = _Recorder(source, shapes, None)
    made_of = {}
    with _ShapesOnly():
        for name, t in lmlab_tensors(cfg, dry, torch.float32):
            made_of[name] = dry.take()
    quantized = {
        name: parts
        for name, parts in made_of.items()
        if _slot(name) and parts and all(types[p] in GGUF_TYPES for p in parts) and len(parts) <= 4
    }
    dequantized = [name for name, parts in made_of.items() if _slot(name) and parts and name not in quantized]
    gguf_name = {hf: getattr(t, "gguf_name", hf) for hf, t in getattr(source, "_tensors", {}).items()}
    _say_what_is_dequantized(
        {gguf_name.get(p, p): types[p] for n in dequantized for p in made_of[n] if types[p] not in GGUF_TYPES},
        len(dequantized),
    )
    real = _Recorder(source, shapes, {p for parts in quantized.values() for p in parts})
    for name, t in _shapes_only(lmlab_tensors(cfg, real, torch.float32)):
        real.take()
        if name in quantized:
            parts = []
            for hf in quantized[name]:
                parts.append(_pack_in_chunks(source, hf, shapes[hf]))
            # the file's bytes and the repacking's temporaries are freed between the parts kept: give
            # their pages back, or the heap's holes add ~20% to the peak (measured on SmolLM2)
            give_back_freed_memory()
            yield name, QuantWeight(parts, t.shape[-1])
        else:
            yield name, t


def _shapes_only(pairs):
    """``pairs`` iterated under ``_ShapesOnly`` (the mode is off while the consumer runs)."""
    it = iter(pairs)
    while True:
        with _ShapesOnly():
            item = next(it, None)
        if item is None:
            return
        yield item


def _say_what_is_dequantized(types_of: dict[str, str], matrices: int) -> None:
    """One warning for a native load whose file has tensors of a type with no native kernel (F16,
    Q5_K...): which types and tensors, and that the matrices holding them run dequantized."""
    if not types_of:
        return
    by_type: dict[str, list[str]] = {}
    for tensor, type_name in types_of.items():
        by_type.setdefault(type_name, []).append(tensor)
    listed = "; ".join(
        f"{t}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        for t, names in sorted(by_type.items())
    )
    warnings.warn(
        f"{len(types_of)} GGUF tensor(s) have a type without a native kernel ({listed}); the {matrices} "
        f"matrices holding them run dequantized to float32 (lmlab runs {', '.join(GGUF_TYPES)} natively; "
        "--dtype float32 dequantizes every matrix).",
        DequantizedWarning,
        stacklevel=2,
    )


class DequantizedWarning(UserWarning):
    """A native-quant load holds some matrices dequantized (their GGUF type has no native kernel)."""


CHUNK_ROWS = 4096  # rows of a big tensor (an embedding table) read and repacked at a time


def _tiled(part: QuantPart, tile: int) -> QuantPart:
    """The part tiled (``tile_part``) where this build's kernel wants tiles and the part allows it."""
    return tile_part(part) if tile and tileable(part) else part


def _empty_on_huge_pages(shape, dtype) -> torch.Tensor:
    """torch.empty with its memory asked to be transparent huge pages before anything touches it
    (see ``_in_one_block``, which leaves such tensors where they are)."""
    t = torch.empty(shape, dtype=dtype)
    huge_pages(t)
    t._lmlab_huge_pages = True
    return t


def _pack_in_chunks(source, name: str, shape) -> QuantPart:
    """One tensor's blocks repacked (and tiled), CHUNK_ROWS rows at a time into the final tensors,
    so a load holds the file's bytes of one chunk beside the result, never a second whole copy."""
    rows = shape[0]
    tile = native.q_tiles() if rows % TILE == 0 else 0  # CHUNK_ROWS is a multiple of TILE
    if rows <= CHUNK_ROWS:
        return _tiled(pack_gguf(*source.raw(name)), tile)
    first = _tiled(pack_gguf(*source.raw(name, 0, CHUNK_ROWS)), tile)
    full = [
        _empty_on_huge_pages((rows, *t.shape[1:]), t.dtype) if t is not None else None
        for t in (first.q, first.scale, first.min, first.qh)
    ]
    for r0 in range(0, rows, CHUNK_ROWS):
        part = first if r0 == 0 else _tiled(pack_gguf(*source.raw(name, r0, r0 + CHUNK_ROWS)), tile)
        if part.scale.dtype != full[1].dtype:  # float16 scales so far, float32 ones here: widen (exact)
            full[1:3] = [t.float() if t is not None else None for t in full[1:3]]
        for dst, src in zip(full, (part.q, part.scale, part.min, part.qh)):
            if dst is not None:
                dst[r0 : r0 + src.shape[0]] = src
    return QuantPart(first.kind, first.group, full[0], full[1], full[2], first.source_type, full[3], first.tile)


def float_tensors_quantized(cfg: ModelConfig, tensors, kind: str):
    """The float (lmlab name, tensor) pairs with every matrix slot quantized to ``kind``."""
    for name, t in tensors:
        if _slot(name) and t.dim() == 2:
            yield name, QuantWeight([_tiled(quantize(t, kind), native.q_tiles())], t.shape[1])
        else:
            yield name, t


def build(cfg: ModelConfig, tensors) -> nn.Module:
    """A Transformer (float32 activations, CPU) from (name, float tensor or QuantWeight) pairs:
    nn.Linear / nn.Embedding slots with a QuantWeight become QuantLinear / QuantEmbedding."""
    from lmlab.model import Transformer

    with torch.device("meta"), _ShapesOnly():
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, quant = {}, {}
    for name, t in tensors:
        if name not in expected:
            raise LmlabError(
                f"internal key map produced an unknown parameter {name!r}; please report this as an lmlab bug."
            )
        if tuple(t.shape) != tuple(expected[name]):
            raise LmlabError(
                f"weight {name} has shape {tuple(t.shape)} but the config implies {tuple(expected[name])}; "
                "the weights do not match the config."
            )
        if isinstance(t, QuantWeight):
            quant[name] = t
        else:
            state[name] = t.to(device="cpu", dtype=torch.float32)
    if cfg.tie_embeddings:
        if "tok_embed.weight" in quant:
            quant.setdefault("lm_head.weight", quant["tok_embed.weight"])
        elif "tok_embed.weight" in state:
            state.setdefault("lm_head.weight", state["tok_embed.weight"])
    missing = [k for k in expected if k not in state and k not in quant]
    if missing:
        raise LmlabError(
            f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); it does not match its config."
        )
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_embeddings and "tok_embed.weight" not in quant:
        model.lm_head.weight = model.tok_embed.weight
    for name, qw in quant.items():
        path = name.removesuffix(".weight")
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(qw)
        else:
            new = QuantLinear(qw, old.bias if old.bias is not None and not old.bias.is_meta else None)
        setattr(parent, leaf, new)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise LmlabError(f"the checkpoint lacks {left[0]}; it does not match its config.")
    model._rope_cache = {}
    _in_one_block(model)
    return model.eval()


def _in_one_block(model: nn.Module) -> None:
    """Every quantized matrix's tensors moved into one block on huge pages (``kernels.in_one_block``),
    in the order a decoding step reads them: block by block, then the head. The 1.1B Llama's Q4_0
    weights decode 34.6 -> 44.0 tok/s, Q8_0 22.7 -> 26.4, Gemma 3 100.5 -> 110.3. The big tensors
    (more than CHUNK_ROWS rows: an embedding table, a wide MLP) were made on huge pages by
    ``_pack_in_chunks`` and stay where they are, as copying them would hold two at once.
    """
    qws, seen = [], set()
    mods = [m for block in model.blocks for m in block.modules()] + [model.lm_head, model.tok_embed]
    for m in mods:
        qw = getattr(m, "qweight", None)
        if isinstance(qw, QuantWeight) and id(qw) not in seen:
            seen.add(id(qw))
            qws.append(qw)
    owners: dict[int, list] = {}  # id(tensor) -> its (part, field), then the (module, buffer name) pairs
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((m, name))
    tensors = []
    for qw in qws:
        for p in qw.parts:
            for f in ("q", "scale", "min", "qh"):
                t = getattr(p, f)
                if t is not None and not getattr(t, "_lmlab_huge_pages", False):
                    tensors.append(t)
                    owners.setdefault(id(t), []).insert(0, (p, f))
        qw._struct = None  # its pointers are made again from the moved tensors

    def replace(old, new):
        (part, field), *buffers = owners.pop(id(old))
        setattr(part, field, new)
        for m, name in buffers:
            m._buffers[name] = new

    in_one_block(tensors, replace, trim_every=2 << 20)


__all__ = ["gguf_tensors", "float_tensors_quantized", "build", "DequantizedWarning"]
