"""Interventions: small objects that change a forward pass through hooks, composable in a list.

    with lm.intervene(AblateHeads("3.5,4.*"), SkipLayers(7)):
        lm.generate("The capital of France is")      # every step, cached or not

Each intervention turns into (hook name, function) pairs when it is applied to a model. The
functions act on absolute token positions (the forward pass's ``HookContext``), so an intervention gives
the same result in a plain forward, in a cached decode step (T == 1) and when generation
recomputes the whole sequence without a cache. Nothing is changed in place: every function
returns a new tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from lmlab.errors import LmlabError
from lmlab.inspect.hooks import (
    check_layer,
    model_of,
    parse_heads,
    parse_layers,
    registered,
    resolve_names,
    shape_letters,
)
from lmlab.model import HookContext

# ----------------------------------------------------------------------------- positions


def with_context(fn: Callable) -> Callable:
    """Mark a hook function as ``fn(x, name, ctx)``: the model passes the forward pass's
    ``HookContext`` (its token ids and positions) as the third argument."""
    fn.wants_context = True
    return fn


def step_positions(ctx: HookContext, T: int) -> torch.Tensor:
    """(B, T) absolute positions of the tokens an activation with T positions covers.

    final_norm and logits cover only the last position during generation (last_only), so the
    positions are the last T of the call's.
    """
    pos = ctx.positions
    return pos[:, -T:] if pos.shape[1] != T else pos


def position_mask(ctx: HookContext, T: int, positions: list[int] | None) -> torch.Tensor | None:
    """(B, T) True where the token's position is selected; None when every position is."""
    if positions is None:
        return None
    pos = step_positions(ctx, T)
    return torch.isin(pos, torch.tensor(positions, device=pos.device))


def check_positions(positions) -> list[int] | None:
    if positions is None:
        return None
    positions = [positions] if isinstance(positions, int) else [int(p) for p in positions]
    if any(p < 0 for p in positions):
        raise LmlabError(
            f"positions are absolute token indices counted from 0, got {min(positions)}; use e.g. positions=[0, 3]."
        )
    return sorted(set(positions))


# ----------------------------------------------------------------------------- the protocol


class Intervention(ABC):
    """Base class. ``hooks(lm)`` validates against the model and returns (name, fn) pairs."""

    @abstractmethod
    def hooks(self, lm) -> list[tuple[str, Callable]]:
        """Check this intervention against the model; the (hook name, function) pairs that do it."""

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.describe()


def flatten(interventions) -> list[Intervention]:
    """Interventions given as objects, lists of them, or lists of lists -> one flat list."""
    out: list[Intervention] = []
    for iv in interventions:
        if isinstance(iv, Intervention):
            out.append(iv)
        elif isinstance(iv, (list, tuple)):
            out += flatten(iv)
        elif iv is not None:
            raise LmlabError(
                f"{iv!r} is not an intervention; "
                "use AblateHeads, SkipLayers, Patch, Steer, ScaleEmbeddings or ReplaceEmbeddings."
            )
    return out


@contextmanager
def intervene(lm, *interventions) -> Iterator[list[Intervention]]:
    """Apply interventions together for the length of a with-block (a plain forward, run_with_cache
    and generation all see them). They apply in the order given where they touch the same point."""
    model = model_of(lm)
    ivs = flatten(interventions)
    pairs = [pair for iv in ivs for pair in iv.hooks(lm)]  # validates everything before anything runs
    with registered(model, pairs):
        yield ivs


# ----------------------------------------------------------------------------- heads


class AblateHeads(Intervention):
    """Remove attention heads: their output (``attn.head_out``, before the output projection)
    becomes zero, or its mean over positions.

    Zeroing every head of a layer makes the layer's ``attn_out`` equal the output projection's
    bias (zero for models without one, e.g. Llama; GPT-2 has one).

    mode="mean": each head's output is replaced by its mean over positions (and batch rows).
    The mean comes from ``reference`` (a prompt run once on the model as it is when the
    intervention is applied), or, without one, from the first forward pass it sees (the prompt,
    during generation) and is then kept, so cached and uncached generation agree.
    """

    def __init__(self, heads, mode: str = "zero", positions=None, reference=None):
        if mode not in ("zero", "mean"):
            raise LmlabError(f"unknown ablation mode {mode!r}; use 'zero' or 'mean'.")
        self.spec, self.mode, self.positions, self.reference = heads, mode, check_positions(positions), reference

    def describe(self) -> str:
        spec = self.spec if isinstance(self.spec, str) else ",".join(f"{layer}.{h}" for layer, h in self.spec)
        where = f" at positions {self.positions}" if self.positions is not None else ""
        return f"ablate heads {spec} ({self.mode}){where}"

    def hooks(self, lm):
        model = model_of(lm)
        by_layer: dict[int, list[int]] = {}
        for layer, head in parse_heads(model.cfg, self.spec):
            by_layer.setdefault(layer, []).append(head)
        means = self._reference_means(lm, by_layer) if self.mode == "mean" and self.reference is not None else {}
        return [
            (f"blocks.{layer}.attn.head_out", self._fn(model, hs, means.get(layer))) for layer, hs in by_layer.items()
        ]

    def _reference_means(self, lm, by_layer) -> dict[int, torch.Tensor]:
        from lmlab.inspect.cache import run_with_cache

        _, cache = run_with_cache(lm, self.reference, [f"blocks.{layer}.attn.head_out" for layer in by_layer])
        return {layer: cache[f"blocks.{layer}.attn.head_out"].mean(dim=(0, 1)) for layer in by_layer}  # (H, D)

    def _fn(self, model, heads: list[int], mean: torch.Tensor | None):
        H = model.cfg.n_heads
        state = {"mean": mean}

        @with_context
        def ablate(y: torch.Tensor, name: str, ctx: HookContext) -> torch.Tensor:  # y: (B, T, H, D)
            B, T = y.shape[:2]
            head_mask = torch.zeros(H, dtype=torch.bool, device=y.device)
            head_mask[heads] = True
            drop = head_mask[None, None, :, None]  # (1, 1, H, 1)
            pos = position_mask(ctx, T, self.positions)
            if pos is not None:
                drop = drop & pos[:, :, None, None]  # (B, T, H, 1)
            if self.mode == "zero":
                return y.masked_fill(drop, 0.0)
            if state["mean"] is None:  # first pass: the mean over this pass's positions, then kept
                state["mean"] = y.mean(dim=(0, 1))
            return torch.where(drop, state["mean"].to(y.dtype), y)

        return ablate


# ----------------------------------------------------------------------------- layers


class SkipLayers(Intervention):
    """Skip whole blocks: a skipped block's output (``resid_post``) is its input (``resid_pre``).

    The block still runs (so its KV cache is filled as usual); its result is discarded.
    """

    def __init__(self, layers):
        self.spec = layers

    def describe(self) -> str:
        spec = self.spec if isinstance(self.spec, (str, int)) else ",".join(map(str, self.spec))
        return f"skip layers {spec}"

    def hooks(self, lm):
        cfg = model_of(lm).cfg
        pairs = []
        for layer in parse_layers(cfg, self.spec):
            saved: dict[str, torch.Tensor] = {}

            def keep(x, name, saved=saved):
                saved["x"] = x

            def restore(x, name, saved=saved):
                return saved.pop("x")

            pairs += [(f"blocks.{layer}.resid_pre", keep), (f"blocks.{layer}.resid_post", restore)]
        return pairs


# ----------------------------------------------------------------------------- patching


def _gather_positions(src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """src (Bs, Ts, ...) with time on dim 1, pos (B, T) -> src at those positions (B, T, ...).

    A source with one sequence is used for every row."""
    if src.shape[0] == 1:
        return src[0][pos]
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
    return src[rows, pos]


def _fit_keys(src: torch.Tensor, S: int, fill: float) -> torch.Tensor:
    """Cut or pad the key axis (last) of a scores/pattern tensor to S entries; padded keys are
    masked ones (0 in a pattern, -inf in scores): they lie after the query, in its future."""
    if src.shape[-1] >= S:
        return src[..., :S]
    pad = src.new_full((*src.shape[:-1], S - src.shape[-1]), fill)
    return torch.cat([src, pad], dim=-1)


class Patch(Intervention):
    """Put activations from another run (an ActivationCache) into this one.

    names: hook names or patterns to patch (default: everything the source cache holds).
    positions: absolute token positions to patch (default: every position the source has).
    heads: for names with a head axis (q, k, v, scores, pattern, head_out), only these heads.
    Positions are matched by position, so the source should be a run of the same length, or
    at least cover the positions patched.
    """

    def __init__(self, source, names=None, positions=None, heads=None):
        self.source, self.names, self.positions = source, names, check_positions(positions)
        self.heads = None if heads is None else ([heads] if isinstance(heads, int) else list(heads))

    def describe(self) -> str:
        names = (
            self.names
            if isinstance(self.names, str)
            else ("all cached" if self.names is None else ",".join(self.names))
        )
        where = f" at positions {self.positions}" if self.positions is not None else ""
        return f"patch {names}{where}" + (f" heads {self.heads}" if self.heads is not None else "")

    def hooks(self, lm):
        model = model_of(lm)
        cfg = model.cfg
        names = list(self.source.keys()) if self.names is None else resolve_names(cfg, self.names)
        missing = [n for n in names if n not in self.source]
        if missing:
            raise LmlabError(
                f"the source cache has no {missing[0]!r}; "
                f"record it first with run_with_cache(..., names=[{missing[0]!r}])."
            )
        if self.heads is not None:
            for n in names:
                letters = shape_letters(n)
                axis = "K" if "K" in letters else "H"
                if axis not in letters:
                    raise LmlabError(
                        f"{n!r} has no head axis, so heads= cannot apply; "
                        "patch a head point such as 'blocks.3.attn.head_out'."
                    )
                limit = cfg.n_kv_heads if axis == "K" else cfg.n_heads
                for h in self.heads:
                    if not 0 <= h < limit:
                        raise LmlabError(
                            f"head {h} is out of range for {n!r}; it has {limit} heads, numbered 0..{limit - 1}."
                        )
        return [(n, self._fn(model, n)) for n in names]

    def _fn(self, model, name: str):
        letters = shape_letters(name)
        t_axis = letters.index("T")
        head_axis = next((letters.index(a) for a in ("H", "K") if a in letters), None)
        fill = float("-inf") if name.endswith("attn.scores") else 0.0
        src_all = self.source[name].movedim(t_axis, 1)  # (Bs, Ts, ...)

        @with_context
        def patch(x: torch.Tensor, _name: str, ctx: HookContext) -> torch.Tensor:
            xt = x.movedim(t_axis, 1)  # (B, T, ...)
            B, T = xt.shape[:2]
            src = src_all.to(device=x.device, dtype=x.dtype)
            if src.shape[0] not in (1, B):
                raise LmlabError(
                    f"the source run has {src.shape[0]} sequences but this run has {B}; "
                    "patch from a run with one sequence or the same number."
                )
            pos = step_positions(ctx, T)  # (B, T)
            inside = pos < src.shape[1]
            mask = inside if self.positions is None else inside & position_mask(ctx, T, self.positions)
            if "S" in letters:
                src = _fit_keys(src, xt.shape[-1], fill)
            new = _gather_positions(src, pos.clamp(max=src.shape[1] - 1))  # (B, T, ...)
            mask = mask.reshape(B, T, *[1] * (xt.dim() - 2))
            if self.heads is not None:
                # head axis index in the (B, T, ...) layout: time moved to 1 shifts axes before it
                h = head_axis if head_axis > t_axis else head_axis + 1
                heads = torch.zeros(xt.shape[h], dtype=torch.bool, device=x.device)
                heads[self.heads] = True
                shape = [1] * xt.dim()
                shape[h] = -1
                mask = mask & heads.view(shape)
            return torch.where(mask, new, xt).movedim(1, t_axis)

        return patch


# ----------------------------------------------------------------------------- steering


def steering_ids(lm, prompt) -> tuple[list[int], int]:
    """(token ids to run, how many leading positions to leave out) for a steering prompt.

    The first position of any sequence is an attention sink whose activation is huge (SmolLM2: a
    norm 50x the others) and says nothing about the prompt, so it would swamp the difference. A
    text prompt therefore runs after the tokenizer's BOS, or after a newline when the tokenizer
    adds none (SmolLM2's BOS token, unused in training, leaves its next position a half-sink),
    and only the prompt's own tokens count: one word, even one token, is a valid steering prompt,
    as in activation addition. Token ids run as given, without their first position."""
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
        if len(ids) < 2:
            raise LmlabError(
                f"the steering prompt {ids} is a single token id, and a first token only holds the attention sink; "
                "pass it as text, or put a token before it."
            )
        return ids, 1
    ids = lm.encode(prompt)
    if not ids:
        raise LmlabError("a steering prompt is empty; give at least one word, e.g. 'love' against 'hate'.")
    bos = lm.config.bos_token_id
    if bos is not None and ids[0] == bos:  # the tokenizer adds BOS: it takes the sink
        return ids, 1
    prefix = []
    for neutral in ("\n", " ", "."):  # the first this vocabulary has
        prefix = lm.tokenizer.encode(neutral, add_special=False) if lm.tokenizer is not None else []
        if prefix:
            break
    prefix = prefix or ([bos] if bos is not None else [])
    if not prefix:
        raise LmlabError(
            f"cannot place the steering prompt {prompt!r} after a neutral token in this model; pass token ids instead."
        )
    return prefix + ids, len(prefix)


def _mean_activation(lm, prompts, name: str) -> torch.Tensor:
    """Mean of one hook point's activation (C,) over the tokens of one or more prompts (see
    ``steering_ids``: the attention sink before them is left out)."""
    from lmlab.inspect.cache import run_with_cache

    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
    vectors = []
    for p in [prompts] if single else prompts:
        ids, skip = steering_ids(lm, p)
        _, cache = run_with_cache(lm, ids, [name])
        vectors.append(cache[name][0][skip:])  # (T - skip, C)
    return torch.cat(vectors).mean(0)


class Steer(Intervention):
    """Add ``scale * vector`` to the residual stream at one layer, at every position (or some).

    ``Steer.from_prompts(lm, toward, away, layer, scale)`` makes the vector: the mean activation
    of the ``toward`` prompt(s) minus that of the ``away`` prompt(s) at that point, each prompt
    run after a neutral token that takes the attention sink (``steering_ids``), so one word is
    enough. The default scale, 0.5, shifted SmolLM2's sentiment ("love" - "hate") by 1-4 nats and
    kept its text fluent; 1 and more broke it (README, "Steering").
    point: "resid_pre" (the stream entering the block, as in activation addition) or any
    (B, T, C) block point: "resid_mid", "resid_post", "attn_out", "mlp_out".
    """

    POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

    def __init__(
        self,
        vector: torch.Tensor,
        layer: int,
        scale: float = 1.0,
        point: str = "resid_pre",
        positions=None,
        label: str = "",
    ):
        if point not in self.POINTS:
            raise LmlabError(f"cannot steer at {point!r}; use one of {', '.join(self.POINTS)}.")
        self.vector, self.layer, self.scale, self.point = vector, layer, float(scale), point
        self.positions, self.label = check_positions(positions), label

    @classmethod
    def from_prompts(
        cls, lm, toward, away, layer: int, scale: float = 0.5, point: str = "resid_pre", positions=None
    ) -> "Steer":
        check_layer(lm.config, layer)
        name = f"blocks.{layer}.{point}"
        if point not in cls.POINTS:
            raise LmlabError(f"cannot steer at {point!r}; use one of {', '.join(cls.POINTS)}.")
        vector = _mean_activation(lm, toward, name) - _mean_activation(lm, away, name)
        label = f"{toward!r} - {away!r}" if isinstance(toward, str) and isinstance(away, str) else "toward - away"
        return cls(vector, layer, scale, point, positions, label)

    def describe(self) -> str:
        what = f" ({self.label})" if self.label else ""
        return (
            f"steer blocks.{self.layer}.{self.point} by {self.scale:g} x vector{what}, "
            f"|v|={self.vector.norm().item():.2f}"
        )

    def hooks(self, lm):
        model = model_of(lm)
        cfg = model.cfg
        check_layer(cfg, self.layer)
        if self.vector.shape != (cfg.d_model,):
            raise LmlabError(
                f"the steering vector has shape {tuple(self.vector.shape)} but this model's residual stream is "
                f"({cfg.d_model},); make it from this model."
            )

        @with_context
        def steer(x: torch.Tensor, name: str, ctx: HookContext) -> torch.Tensor:  # (B, T, C)
            add = (self.scale * self.vector).to(device=x.device, dtype=x.dtype)
            pos = position_mask(ctx, x.shape[1], self.positions)
            return x + add if pos is None else x + pos[..., None] * add

        return [(f"blocks.{self.layer}.{self.point}", steer)]


# ----------------------------------------------------------------------------- embeddings


def _select(ctx: HookContext, x: torch.Tensor, tokens: list[int] | None, positions: list[int] | None) -> torch.Tensor:
    """(B, T, 1) True at the tokens chosen by id and/or position (both given: either)."""
    B, T = x.shape[:2]
    if tokens is None and positions is None:
        return torch.ones(B, T, 1, dtype=torch.bool, device=x.device)
    sel = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    if tokens is not None:
        sel |= torch.isin(ctx.input_ids, torch.tensor(tokens, device=x.device))
    if positions is not None:
        sel |= position_mask(ctx, T, positions)
    return sel[..., None]


def _check_ids(cfg, ids: Iterable[int], what: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise LmlabError(
            f"{what} token id {bad[0]} is out of range; this model's vocabulary has ids 0..{cfg.vocab_size - 1}."
        )
    return ids


class ScaleEmbeddings(Intervention):
    """Multiply token embeddings (the ``embed`` point) by ``scale``: all of them, or those of
    some token ids and/or positions."""

    def __init__(self, scale: float, tokens=None, positions=None):
        self.scale = float(scale)
        self.tokens = None if tokens is None else ([tokens] if isinstance(tokens, int) else list(tokens))
        self.positions = check_positions(positions)

    def describe(self) -> str:
        which = (
            "all tokens"
            if self.tokens is None and self.positions is None
            else f"tokens {self.tokens or []} positions {self.positions or []}"
        )
        return f"scale embeddings of {which} by {self.scale:g}"

    def hooks(self, lm):
        model = model_of(lm)
        if self.tokens is not None:
            _check_ids(model.cfg, self.tokens, "the")

        @with_context
        def scale(x: torch.Tensor, name: str, ctx: HookContext) -> torch.Tensor:  # (B, T, C)
            sel = _select(ctx, x, self.tokens, self.positions)
            return torch.where(sel, x * self.scale, x)

        return [("embed", scale)]


class ReplaceEmbeddings(Intervention):
    """Replace token embeddings (the ``embed`` point).

    tokens: {token id: other token id, or a (C,) vector}: wherever that token appears (prompt
    and generated tokens alike), its embedding becomes the other token's (or the vector).
    positions: {position: token id or (C,) vector}: the same, at absolute positions.
    A token id's embedding is its row of the embedding table as the model scales it (Gemma
    multiplies by sqrt(d_model)), so replacing a token by itself changes nothing.
    """

    def __init__(self, tokens: dict | None = None, positions: dict | None = None):
        if not tokens and not positions:
            raise LmlabError(
                "ReplaceEmbeddings needs tokens={id: new id or vector} or positions={position: new id or vector}."
            )
        self.tokens, self.positions = dict(tokens or {}), dict(positions or {})
        check_positions(list(self.positions))

    def describe(self) -> str:
        show = lambda v: f"id {v}" if isinstance(v, int) else "a vector"  # noqa: E731
        parts = [f"token {k} -> {show(v)}" for k, v in self.tokens.items()] + [
            f"position {k} -> {show(v)}" for k, v in self.positions.items()
        ]
        return "replace embeddings: " + ", ".join(parts)

    def _vector(self, model, value) -> torch.Tensor:
        """A replacement as a (C,) vector in the space of the ``embed`` point."""
        cfg = model.cfg
        if isinstance(value, torch.Tensor):
            if value.shape != (cfg.d_model,):
                raise LmlabError(f"a replacement embedding must have shape ({cfg.d_model},), got {tuple(value.shape)}.")
            return value
        (tid,) = _check_ids(cfg, [value], "the replacement")
        row = model.tok_embed.weight[tid].detach()
        if cfg.embed_scale is not None:  # as the model does it, rounded to the model dtype
            row = row * torch.tensor(cfg.embed_scale, dtype=row.dtype)
        return row

    def hooks(self, lm):
        model = model_of(lm)
        by_token = [
            (i, self._vector(model, v)) for i, v in zip(_check_ids(model.cfg, self.tokens, "the"), self.tokens.values())
        ]
        by_pos = [(p, self._vector(model, v)) for p, v in self.positions.items()]

        @with_context
        def replace(x: torch.Tensor, name: str, ctx: HookContext) -> torch.Tensor:  # (B, T, C)
            for tid, vec in by_token:
                sel = _select(ctx, x, [tid], None)
                x = torch.where(sel, vec.to(x.dtype), x)
            for pos, vec in by_pos:
                sel = _select(ctx, x, None, [pos])
                x = torch.where(sel, vec.to(x.dtype), x)
            return x

        return [("embed", replace)]
