"""Hook names: the registry, validation (with close-match suggestions), patterns, a context manager.

Every hook point is named in ``lmlab.model.HOOK_POINTS`` (``blocks.{i}.attn.pattern`` ...);
this module expands those templates for one model, checks what a user typed against them and
registers functions on ``model.hooks`` for the length of a ``with`` block.

Patterns use shell-style wildcards (``fnmatch``): ``*`` matches any run of characters, dots
included, ``?`` one character. So ``blocks.*.attn.pattern`` is every layer's pattern,
``blocks.3.*`` everything in block 3 and ``*resid_post`` every block's output.

``python -m lmlab.inspect.hooks --markdown`` prints the table in docs/hooks.md.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError, suggest
from lmlab.model import (
    HOOK_POINTS,
    HookFn,
)  # HookFn: f(tensor, name) -> tensor | None, a returned tensor replaces the activation

# The letters HOOK_POINTS uses for shapes, and the dimension each stands for.
DIM_NAMES = {
    "B": "B",
    "T": "T",
    "S": "S",
    "C": "d_model",
    "H": "n_heads",
    "K": "n_kv_heads",
    "D": "head_dim",
    "F": "d_ff",
    "V": "vocab",
}
DIM_MEANING = {
    "B": "batch (sequences)",
    "T": "new tokens in this forward pass (1 in a decode step)",
    "S": "keys: cached + new tokens",
    "C": "d_model, the residual stream width",
    "H": "n_heads, query heads",
    "K": "n_kv_heads, key/value heads (fewer than H with GQA)",
    "D": "head_dim",
    "F": "d_ff, the MLP hidden width",
    "V": "vocab",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WILDCARD = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------- the registry


def hook_names(cfg: ModelConfig) -> list[str]:
    """Every hook name of this model, in the order the forward pass reaches them."""
    names = ["embed"]
    if cfg.pos == "learned":
        names.append("pos_embed")
    block_templates = [t for t in HOOK_POINTS if t.startswith("blocks.")]
    for i in range(cfg.n_layers):
        names += [t.format(i=i) for t in block_templates]
    return names + ["final_norm", "logits"]


def template(name: str) -> tuple[str, int | None]:
    """('blocks.{i}.attn.q', 3) for 'blocks.3.attn.q'; ('embed', None) for 'embed'."""
    m = _BLOCK.match(name)
    if m:
        return "blocks.{i}." + m.group(2), int(m.group(1))
    return name, None


def shape_letters(name: str) -> list[str]:
    """The documented shape of a hook point as letters, e.g. ['B', 'H', 'T', 'S']."""
    return HOOK_POINTS[template(name)[0]][0].split()


def dim_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Sizes of the config-fixed letters (B, T and S vary per call)."""
    return {
        "C": cfg.d_model,
        "H": cfg.n_heads,
        "K": cfg.n_kv_heads,
        "D": cfg.head_dim,
        "F": cfg.d_ff,
        "V": cfg.vocab_size,
    }


def layer_of(name: str) -> int | None:
    return template(name)[1]


# ----------------------------------------------------------------------------- validation


def check_layer(cfg: ModelConfig, layer: int) -> int:
    if not 0 <= layer < cfg.n_layers:
        raise LmlabError(
            f"layer {layer} is out of range; this model has {cfg.n_layers} layers, numbered 0..{cfg.n_layers - 1}."
        )
    return layer


def check_head(cfg: ModelConfig, layer: int, head: int) -> tuple[int, int]:
    check_layer(cfg, layer)
    if not 0 <= head < cfg.n_heads:
        raise LmlabError(
            f"head {head} (layer {layer}) is out of range; "
            f"this model has {cfg.n_heads} heads per layer, numbered 0..{cfg.n_heads - 1}."
        )
    return layer, head


def _check_one(cfg: ModelConfig, name: str, known: list[str]) -> None:
    """Raise the clearest LmlabError for a name (or pattern) that is not a hook of this model."""
    m = _BLOCK.match(name)
    if m and m.group(1).isdigit():
        check_layer(cfg, int(m.group(1)))  # an out-of-range layer, said as such
    if name == "pos_embed" and cfg.pos != "learned":
        raise LmlabError(
            f"this {cfg.family} model has no 'pos_embed' hook: "
            "it encodes positions with RoPE inside attention (see blocks.{i}.attn.q and .k)."
        )
    if _WILDCARD.search(name):
        raise LmlabError(
            f"the pattern {name!r} matches no hook name of this model; "
            "try e.g. 'blocks.*.attn.pattern' or 'blocks.0.*' (docs/hooks.md lists the names)."
        )
    # Suggest among the names of the same layer, so the list stays short and relevant.
    layer = layer_of(name)
    pool = [n for n in known if layer_of(n) == layer] if layer is not None else known
    raise LmlabError(
        f"unknown hook name {name!r}.{suggest(name, pool)} docs/hooks.md lists the names, e.g. 'blocks.0.attn.pattern'."
    )


def resolve_names(cfg: ModelConfig, spec: str | Iterable[str] | None) -> list[str]:
    """The hook names that a name, a pattern or a list of them selects, in forward order.

    None selects every hook point. An unknown name, an out-of-range layer or a pattern
    that matches nothing raises LmlabError.
    """
    known = hook_names(cfg)
    if spec is None:
        return known
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise LmlabError(
            "no hook names were given; "
            "pass a name such as 'blocks.0.resid_post' or a pattern such as 'blocks.*.attn.pattern'."
        )
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise LmlabError(f"hook names are strings, got {item!r}; use e.g. 'blocks.0.resid_post'.")
        if _WILDCARD.search(item):
            hits = fnmatch.filter(known, item)
        else:
            hits = [item] if item in known else []
        if not hits:
            _check_one(cfg, item, known)
        chosen.update(hits)
    return [n for n in known if n in chosen]


def parse_layers(cfg: ModelConfig, spec: str | int | Iterable[int]) -> list[int]:
    """'7', '3,5', '2-4' or '*' (or ints) -> sorted layer indices, each checked."""
    if isinstance(spec, int):
        return [check_layer(cfg, spec)]
    if not isinstance(spec, str):
        return sorted({check_layer(cfg, int(i)) for i in spec})
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if part == "*":
            layers.update(range(cfg.n_layers))
        elif re.fullmatch(r"\d+-\d+", part):
            lo, hi = map(int, part.split("-"))
            layers.update(check_layer(cfg, i) for i in range(lo, hi + 1))
        elif part.isdigit():
            layers.add(check_layer(cfg, int(part)))
        else:
            raise LmlabError(f"cannot read the layer {part!r}; write layers as '7', '3,5', '2-4' or '*'.")
    return sorted(layers)


def parse_heads(cfg: ModelConfig, spec: str | Iterable) -> list[tuple[int, int]]:
    """'3.5,4.*' (layer.head, * for every head; a bare '7' means every head of layer 7), or
    (layer, head) pairs -> sorted, checked (layer, head) pairs."""
    if not isinstance(spec, str):
        return sorted({check_head(cfg, int(layer), int(head)) for layer, head in spec})
    heads: set[tuple[int, int]] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        layer_s, _, head_s = part.partition(".")
        if not head_s:
            head_s = "*"
        if not (layer_s.isdigit() or layer_s == "*") or not (head_s.isdigit() or head_s == "*"):
            raise LmlabError(
                f"cannot read the head {part!r}; write heads as LAYER.HEAD, e.g. '3.5', '4.*' or '3.5,4.*'."
            )
        layers = range(cfg.n_layers) if layer_s == "*" else [check_layer(cfg, int(layer_s))]
        for layer in layers:
            hs = range(cfg.n_heads) if head_s == "*" else [int(head_s)]
            heads.update(check_head(cfg, layer, h) for h in hs)
    if not heads:
        raise LmlabError("no heads were given; write heads as LAYER.HEAD, e.g. '3.5' or '4.*'.")
    return sorted(heads)


# ----------------------------------------------------------------------------- registering


def model_of(obj):
    """The Transformer inside an LM (or the Transformer itself)."""
    return getattr(obj, "model", obj)


def add_hooks(model, pairs: list[tuple[str, HookFn]]) -> None:
    for name, fn in pairs:
        model.hooks.setdefault(name, []).append(fn)


def remove_hooks(model, pairs: list[tuple[str, HookFn]]) -> None:
    """Remove exactly these functions; a name with no function left is dropped, so a model
    with nothing registered has ``model.hooks == {}`` again and runs the hook-free path."""
    for name, fn in pairs:
        fns = model.hooks.get(name, [])
        for j, f in enumerate(fns):
            if f is fn:
                del fns[j]
                break
        if not fns:
            model.hooks.pop(name, None)


@contextmanager
def registered(model, pairs: list[tuple[str, HookFn]]) -> Iterator[None]:
    """Register (name, fn) pairs for the length of a with-block (names already resolved)."""
    add_hooks(model, pairs)
    try:
        yield
    finally:
        remove_hooks(model, pairs)


def _pairs(cfg: ModelConfig, spec) -> list[tuple[str, HookFn]]:
    """{pattern: fn} or [(pattern, fn), ...] -> [(name, fn), ...] with every pattern expanded."""
    items = spec.items() if isinstance(spec, dict) else spec
    pairs = []
    for pattern, fn in items:
        if not callable(fn):
            raise LmlabError(f"the hook for {pattern!r} is not a function; pass fn(tensor, name) -> tensor or None.")
        pairs += [(name, fn) for name in resolve_names(cfg, pattern)]
    return pairs


@contextmanager
def hooked(lm, spec=None, **named: HookFn) -> Iterator[None]:
    """Run hook functions at named points for the length of a with-block.

    ``spec`` is {name or pattern: fn} or a list of (name or pattern, fn); keyword arguments
    add more, with '__' standing for '.' (``embed=fn``). Each fn is called as fn(tensor, name)
    and may return a tensor to replace the activation. Hooks also run inside generation::

        with lm.hooks({"blocks.*.attn.pattern": lambda p, name: print(name, p.shape)}):
            lm(ids)
    """
    model = model_of(lm)
    items = list(spec.items() if isinstance(spec, dict) else (spec or []))
    items += [(k.replace("__", "."), fn) for k, fn in named.items()]
    with registered(model, _pairs(model.cfg, items)):
        yield


def clear_hooks(lm) -> None:
    """Remove every hook from the model (e.g. after an interrupted notebook cell)."""
    model_of(lm).hooks.clear()


# ----------------------------------------------------------------------------- the table


def markdown_table() -> str:
    """docs/hooks.md: every hook point with its shape and meaning, generated from HOOK_POINTS."""
    lines = [
        "# Hook points",
        "",
        "<!-- generated by `python -m lmlab.inspect.hooks --markdown > docs/hooks.md`; do not edit -->",
        "",
        "Every model lmlab runs has these hook points; `{i}` is the layer, 0-based. Register a",
        "function at any of them with `lm.hooks({name: fn})`, record them with",
        "`lm.run_with_cache(prompt, names=...)`. Names accept shell wildcards: `blocks.*.attn.pattern`,",
        "`blocks.3.*`. Hooks run in a plain forward pass and in every step of cached generation.",
        "",
        "| name | shape | what it is |",
        "|---|---|---|",
    ]
    for name, (shape, what) in HOOK_POINTS.items():
        lines.append(f"| `{name}` | ({', '.join(shape.split())}) | {what} |")
    lines += ["", "Dimensions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in DIM_MEANING.items()]
    lines += [
        "",
        "Notes:",
        "",
        "- `attn.scores` and `attn.pattern` exist only when asked for: a hook on either makes that",
        "  layer compute attention eagerly (the normal path is fused SDPA, which never forms the",
        "  pattern). The eager result equals the fused one to float rounding (about 1e-6).",
        "- With GQA the eager path repeats each of the K key/value heads for the H/K query heads",
        "  that share it, so `scores` and `pattern` have H heads while `k` and `v` have K.",
        "- In a decode step T is 1 and S is the number of cached tokens plus one; `final_norm` and",
        "  `logits` cover only the last position during generation.",
        "- `pos_embed` exists only for models with learned positions (GPT-2).",
        "",
    ]
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    if "--markdown" in argv:
        sys.stdout.write(markdown_table())
        return 0
    for name, (shape, what) in HOOK_POINTS.items():
        print(f"{name:28} ({', '.join(shape.split())})  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
