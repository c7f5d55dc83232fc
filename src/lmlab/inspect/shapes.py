"""Shape trace: every tensor shape through one prefill and one decode step, with named dims.

A look-only hook at every hook point records the shapes while the model runs as the engine
runs it: a prefill of the prompt into a KV cache, then one decode step of one token. Because
the attention scores and pattern are hooked too, attention runs eagerly and the trace shows
where GQA repeats each key/value head for the query heads that share it. Each recorded shape
is checked against the documented one (docs/hooks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.inspect.cache import as_token_ids, token_labels
from lmlab.inspect.hooks import DIM_NAMES, dim_sizes, hook_names, model_of, registered, shape_letters, template

MB = 1024 * 1024


def named(letters: list[str], shape: tuple[int, ...]) -> str:
    """['B', 'T', 'C'], (1, 7, 576) -> 'B=1, T=7, d_model=576'."""
    return ", ".join(f"{DIM_NAMES[letter]}={n}" for letter, n in zip(letters, shape))


@dataclass
class ShapeRow:
    step: str  # "prefill" | "decode"
    name: str  # a hook name, or a template when every layer has the same shape ("blocks.{0..29}.attn.q")
    shape: tuple[int, ...]
    dims: str  # named dims, e.g. "B=1, n_heads=9, T=7, S=7"
    ok: bool  # the shape equals the documented one
    note: str = ""


@dataclass
class ShapeTrace:
    model_name: str
    tokens: list[str]
    rows: list[ShapeRow]
    params: list[tuple[str, tuple[int, ...], str]]  # (name, shape, named dims) of block 0 and the ends
    kv: dict  # the KV cache: shape, bytes allocated, bytes per token, bytes used after each step
    config: dict = field(default_factory=dict)

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "tokens": self.tokens,
            "config": self.config,
            "parameters": [{"name": n, "shape": list(s), "dims": d} for n, s, d in self.params],
            "trace": [
                {"step": r.step, "name": r.name, "shape": list(r.shape), "dims": r.dims, "ok": r.ok, "note": r.note}
                for r in self.rows
            ],
            "kv_cache": self.kv,
        }

    def __rich__(self):
        from lmlab.inspect.display import shapes_renderable

        return shapes_renderable(self)

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import shapes_html

        return shapes_html(self)


def _param_shapes(model) -> list[tuple[str, tuple[int, ...], str]]:
    """Weights of the embedding, block 0 and the head, with their shapes in named dims."""
    cfg = model.cfg
    gated = "2·d_ff" if cfg.mlp == "gated" else "d_ff"
    out = [("tok_embed.weight", tuple(model.tok_embed.weight.shape), "vocab, d_model")]
    if cfg.pos == "learned":
        out.append(("pos_embed.weight", tuple(model.pos_embed.weight.shape), "max_seq_len, d_model"))
    b = model.blocks[0]
    out += [
        ("blocks.0.attn.qkv.weight", tuple(b.attn.qkv.weight.shape), "(n_heads + 2·n_kv_heads)·head_dim, d_model"),
        ("blocks.0.attn.o.weight", tuple(b.attn.o.weight.shape), "d_model, n_heads·head_dim"),
        ("blocks.0.mlp.up.weight", tuple(b.mlp.up.weight.shape), f"{gated}, d_model"),
        ("blocks.0.mlp.down.weight", tuple(b.mlp.down.weight.shape), "d_model, d_ff"),
        (
            "lm_head.weight",
            tuple(model.lm_head.weight.shape),
            "vocab, d_model" + (" (tied to tok_embed)" if cfg.tie_embeddings else ""),
        ),
    ]
    return out


def _rows_for_step(cfg, step: str, recorded: list[tuple[str, tuple]], B: int, T: int, S: int) -> list[ShapeRow]:
    """Turn recorded (name, shape) into rows; add the k/v as read from the cache and, with
    GQA, as repeated for the query heads (these two are not hook points, so they are derived
    from the pattern's shape)."""
    sizes = dim_sizes(cfg) | {"B": B, "T": T, "S": S}
    rows = []
    for name, shape in recorded:
        letters = shape_letters(name)
        # final_norm and logits cover only the last position, as in the engine (last_only)
        expect = tuple(
            sizes[letter] if not (letter == "T" and name in ("final_norm", "logits")) else 1 for letter in letters
        )
        note = "last position only (as generation runs it)" if name in ("final_norm", "logits") else ""
        rows.append(ShapeRow(step, name, shape, named(letters, shape), shape == expect, note))
        if name.endswith("attn.v"):
            layer = template(name)[1]
            kv = (B, cfg.n_kv_heads, S, cfg.head_dim)
            rows.append(
                ShapeRow(
                    step,
                    f"blocks.{layer}.attn.k/v (from cache)",
                    kv,
                    named(["B", "K", "S", "D"], kv),
                    True,
                    "new keys/values written at slots "
                    + (f"0..{T - 1}" if S == T else f"{S - T}")
                    + f"; all {S} read back",
                )
            )
            if cfg.gqa_groups > 1:
                rep = (B, cfg.n_heads, S, cfg.head_dim)
                rows.append(
                    ShapeRow(
                        step,
                        f"blocks.{layer}.attn.k/v (GQA repeat)",
                        rep,
                        named(["B", "H", "S", "D"], rep),
                        True,
                        f"each of {cfg.n_kv_heads} kv heads repeated x{cfg.gqa_groups} for the query heads sharing it",
                    )
                )
    return rows


def _collapse(rows: list[ShapeRow], n_layers: int) -> list[ShapeRow]:
    """One row per block point when every layer has the same shape: 'blocks.{0..L-1}.attn.q'."""
    by_tmpl: dict[tuple[str, str], list[ShapeRow]] = {}
    for r in rows:
        tmpl, layer = template(r.name)
        by_tmpl.setdefault((r.step, tmpl if layer is not None else r.name), []).append(r)
    out, seen = [], set()
    for r in rows:
        tmpl, layer = template(r.name)
        key = (r.step, tmpl if layer is not None else r.name)
        group = by_tmpl[key]
        if layer is None or len(group) == 1 or len({g.shape for g in group}) > 1:
            out.append(r)
            continue
        if key in seen:
            continue
        seen.add(key)
        name = tmpl.replace("{i}", f"{{0..{n_layers - 1}}}")
        out.append(ShapeRow(r.step, name, r.shape, r.dims, all(g.ok for g in group), r.note))
    return out


@torch.inference_mode()
def shape_trace(lm, prompt, collapse_layers: bool = True) -> ShapeTrace:
    """Record every hook point's shape through a prefill of ``prompt`` and one decode step."""
    from lmlab.engine.cache import KVCache, kv_bytes_per_token, kv_dtype

    model = model_of(lm)
    cfg = model.cfg
    ids = as_token_ids(lm, prompt)
    B, T = ids.shape
    if T + 1 > cfg.max_seq_len:
        from lmlab.errors import LmlabError

        raise LmlabError(
            f"the prompt fills the model's context ({cfg.max_seq_len} tokens), leaving no room for a decode step; "
            "shorten it."
        )
    cache = KVCache(cfg, B, T + 1, kv_dtype(lm.dtype, lm.device), lm.device)
    recorded: list[tuple[str, tuple]] = []

    def look(x, name):
        recorded.append((name, tuple(x.shape)))

    rows: list[ShapeRow] = [ShapeRow("prefill", "input_ids", (B, T), f"B={B}, T={T}", True, "token ids")]
    kv = {
        "shape_k_and_v_each": [cfg.n_layers, B, cfg.n_kv_heads, T + 1, cfg.head_dim],
        "dims": "n_layers, B, n_kv_heads, max_len, head_dim",
        "allocated_bytes": cache.nbytes,
        "bytes_per_token": kv_bytes_per_token(cfg, kv_dtype(lm.dtype, lm.device), B),
    }
    with registered(model, [(n, look) for n in hook_names(cfg)]):
        logits = model(ids, cache=cache, last_only=True)  # prefill, as generation runs it
        rows += _rows_for_step(cfg, "prefill", recorded, B, T, T)
        kv["used_after_prefill_bytes"] = cache.bytes_used()
        kv["length_after_prefill"] = cache.length
        recorded.clear()
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        rows.append(ShapeRow("decode", "input_ids", (B, 1), f"B={B}, T=1", True, "the token just generated"))
        model(nxt, cache=cache, last_only=True)
        rows += _rows_for_step(cfg, "decode", recorded, B, 1, T + 1)
    kv["used_after_decode_bytes"] = cache.bytes_used()
    kv["length_after_decode"] = cache.length
    if collapse_layers:
        rows = _collapse(rows, cfg.n_layers)
    config = {
        k: getattr(cfg, k)
        for k in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size")
    }
    return ShapeTrace(getattr(lm, "name", ""), token_labels(lm, ids[0]), rows, _param_shapes(model), kv, config)
