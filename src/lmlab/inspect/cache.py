"""run_with_cache: one forward pass that keeps the activations you ask for, within a memory budget.

Only the requested names are kept (caching every point of a big model costs more memory than
the model itself). Before running, the size of what was asked for is computed from the
documented shapes: over the budget it refuses, unless ``force=True``, and then it warns with
the size in MB. Asking for ``attn.pattern`` / ``attn.scores`` makes those layers compute
attention eagerly; the result equals the fused (SDPA) path to float rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import torch

from lmlab.errors import LmlabError, suggest
from lmlab.inspect.hooks import dim_sizes, model_of, registered, resolve_names, shape_letters

DEFAULT_BUDGET_MB = 1024.0
MB = 1024 * 1024


# ----------------------------------------------------------------------------- inputs


def as_token_ids(lm, prompt) -> torch.Tensor:
    """A prompt as token ids (B, T) on the model's device.

    Accepts a string (encoded as lm.encode does: with BOS where the tokenizer adds one), a list of ids, a list of
    equal-length id lists, or a tensor (T,) / (B, T).
    """
    if isinstance(prompt, str):
        ids = torch.tensor([lm.encode(prompt)])
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.long()
        ids = ids[None] if ids.dim() == 1 else ids
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        lengths = sorted({len(p) for p in prompt})
        if len(lengths) > 1:
            raise LmlabError(
                f"the prompts have different lengths ({', '.join(map(str, lengths))} tokens); "
                "pass prompts of equal length, or one at a time."
            )
        ids = torch.tensor([list(p) for p in prompt], dtype=torch.long)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = torch.tensor([list(prompt)], dtype=torch.long)
    else:
        raise LmlabError(
            f"cannot read a prompt of type {type(prompt).__name__}; "
            "pass a string, a list of token ids or a (B, T) tensor."
        )
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise LmlabError("the prompt is empty; give at least one token.")
    vocab = lm.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise LmlabError(
            f"token id {int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())} is out of range; "
            f"this model's vocabulary has ids 0..{vocab - 1}."
        )
    if ids.shape[1] > lm.config.max_seq_len:
        raise LmlabError(
            f"the prompt is {ids.shape[1]} tokens but the model's context is {lm.config.max_seq_len}; shorten it."
        )
    return ids.to(lm.device)


def token_labels(lm, ids) -> list[str]:
    """A readable label per token id: the tokenizer's piece, or the id for models without one."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return [tok.token_str(i) for i in ids]


def text_pieces(lm, ids) -> list[str]:
    """The text each token adds, so the pieces join into the decoded text (multi-byte characters
    come out whole on the token that completes them); ids with a space for models without a
    tokenizer."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if getattr(lm, "tokenizer", None) is None:
        return [f"{i} " for i in ids]
    pieces, before = [], ""
    for k in range(1, len(ids) + 1):
        text = lm.decode(ids[:k])
        if text.startswith(before):
            pieces.append(text[len(before) :])
            before = text
        else:  # a character still incomplete: it shows up on a later token
            pieces.append("")
    return pieces


# ----------------------------------------------------------------------------- sizes


def activation_shape(cfg, name: str, B: int, T: int, S: int | None = None) -> tuple[int, ...]:
    """The shape of hook point ``name`` in a forward over (B, T) tokens with S keys (default T)."""
    sizes = dim_sizes(cfg) | {"B": B, "T": T, "S": T if S is None else S}
    return tuple(sizes[d] for d in shape_letters(name))


def estimate_bytes(cfg, names: list[str], B: int, T: int, dtype: torch.dtype) -> int:
    """Bytes a cache of these names takes for one plain forward over (B, T) tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(activation_shape(cfg, n, B, T)) * itemsize for n in names)


def check_budget(nbytes: int, budget_mb: float, force: bool) -> None:
    """Refuse a cache over the budget unless forced; warn (with the size) when forced."""
    if nbytes <= budget_mb * MB:
        return
    size = f"{nbytes / MB:.1f} MB"
    if not force:
        raise LmlabError(
            f"caching these activations would take {size}, over the {budget_mb:g} MB budget; ask for fewer names "
            "(e.g. names='blocks.*.resid_post'), a shorter prompt, or pass force=True (--force) to go ahead."
        )
    warnings.warn(
        f"the activation cache will take {size}, over the {budget_mb:g} MB budget (forced).",
        ResourceWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- the cache


class ActivationCache:
    """Activations of one forward pass by hook name: ``cache["blocks.3.attn.pattern"]``.

    Also holds the input ids and their labels, so displays can name the tokens.
    """

    def __init__(
        self, acts: dict[str, torch.Tensor], input_ids: torch.Tensor, labels: list[str], cfg, model_name: str = ""
    ):
        self.acts = acts
        self.input_ids = input_ids  # (B, T)
        self.labels = labels  # one per position of sequence 0
        self.cfg = cfg
        self.model_name = model_name

    # -- mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.acts:
            hint = suggest(name, self.acts) if self.acts else ""
            raise LmlabError(
                f"{name!r} is not in this cache.{hint} Pass it in names= to run_with_cache "
                f"(this cache holds {len(self.acts)} names)."
            )
        return self.acts[name]

    def __contains__(self, name) -> bool:
        return name in self.acts

    def __iter__(self) -> Iterator[str]:
        return iter(self.acts)

    def __len__(self) -> int:
        return len(self.acts)

    def keys(self):
        return self.acts.keys()

    def items(self):
        return self.acts.items()

    # -- views
    def stack(self, pattern: str) -> torch.Tensor:
        """The cached names matching a pattern, stacked in forward order: e.g.
        ``stack("blocks.*.resid_post")`` -> (L, B, T, C)."""
        names = [n for n in resolve_names(self.cfg, pattern) if n in self.acts]
        if not names:
            raise LmlabError(
                f"no cached activation matches {pattern!r}; this cache holds e.g. {next(iter(self.acts), 'nothing')!r}."
            )
        return torch.stack([self.acts[n] for n in names])

    def attention(self, layer: int, head: int | None = None, batch: int = 0) -> "AttentionPattern":
        """The attention pattern of one layer (all heads, or one) as a displayable object."""
        from lmlab.inspect.hooks import check_head, check_layer

        check_layer(self.cfg, layer)
        pattern = self[f"blocks.{layer}.attn.pattern"][batch]  # (H, T, S)
        if head is not None:
            check_head(self.cfg, layer, head)
            pattern = pattern[head]  # (T, S)
        return AttentionPattern(pattern.float().cpu(), self.labels, layer, head)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acts.values())

    def to(self, device) -> "ActivationCache":
        return ActivationCache(
            {k: v.to(device) for k, v in self.acts.items()},
            self.input_ids.to(device),
            self.labels,
            self.cfg,
            self.model_name,
        )

    def summary(self) -> list[dict]:
        """One row per cached name: shape, dtype, MB, mean, std and mean L2 norm over the last dim."""
        rows = []
        for name, t in self.acts.items():
            f = t.float()
            finite = f[torch.isfinite(f)]  # scores hold -inf where masked
            rows.append(
                {
                    "name": name,
                    "shape": tuple(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "mb": t.numel() * t.element_size() / MB,
                    "mean": finite.mean().item() if finite.numel() else float("nan"),
                    "std": finite.std().item() if finite.numel() > 1 else float("nan"),
                    "norm": f.nan_to_num(neginf=0.0).norm(dim=-1).mean().item(),
                }
            )
        return rows

    def __repr__(self) -> str:
        B, T = self.input_ids.shape
        return f"ActivationCache({len(self.acts)} names, B={B}, T={T}, {self.nbytes / MB:.2f} MB)"

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import cache_html

        return cache_html(self)


class AttentionPattern:
    """An attention pattern (H, T, S) or one head's (T, S), with the tokens it is over."""

    def __init__(self, pattern: torch.Tensor, labels: list[str], layer: int, head: int | None):
        self.pattern, self.labels, self.layer, self.head = pattern, labels, layer, head

    @property
    def title(self) -> str:
        return f"layer {self.layer}, " + ("all heads (mean)" if self.head is None else f"head {self.head}")

    def __repr__(self) -> str:
        return f"AttentionPattern({self.title}, {len(self.labels)} tokens)"

    def matrix(self) -> torch.Tensor:
        """(T, S): the head's pattern, or the mean over heads."""
        return self.pattern if self.pattern.dim() == 2 else self.pattern.mean(0)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "tokens": self.labels, "pattern": self.matrix().tolist()}

    def __rich__(self):
        from lmlab.inspect.display import heatmap_table

        return heatmap_table(
            self.matrix(),
            self.labels,
            self.labels,
            title=f"attention pattern, {self.title} (rows: query, columns: key)",
        )

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import heatmap_html

        return heatmap_html(self.matrix(), self.labels, self.labels, title=f"attention pattern, {self.title}")

    def save_png(self, path) -> None:
        from lmlab.inspect.display import save_heatmap_png

        save_heatmap_png(
            self.matrix(),
            self.labels,
            self.labels,
            path,
            title=f"attention pattern, {self.title}",
            xlabel="key",
            ylabel="query",
        )


# ----------------------------------------------------------------------------- running


@torch.inference_mode()
def run_with_cache(lm, prompt, names=None, *, budget_mb: float = DEFAULT_BUDGET_MB, force: bool = False, device=None):
    """Run one forward pass and keep the activations at ``names`` -> (logits (B, T, V), ActivationCache).

    names: a hook name, a pattern (``"blocks.*.attn.pattern"``) or a list of them; None keeps
    every hook point. budget_mb: refuse (LmlabError) when the cache would be larger, unless
    force=True, which warns with the size instead. device: where to keep the activations
    (default: the model's device; "cpu" frees GPU memory).

    Interventions active on the model (``with lm.intervene(...)``) apply, and the cache records
    each activation as it is after them.
    """
    model = model_of(lm)
    ids = as_token_ids(lm, prompt)
    B, T = ids.shape
    chosen = resolve_names(model.cfg, names)
    check_budget(estimate_bytes(model.cfg, chosen, B, T, lm.dtype), budget_mb, force)

    acts: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, name: str) -> None:
        # a copy: a later hook may change the tensor in place
        acts[name] = x.detach().to(device, copy=True) if device is not None else x.detach().clone()

    with registered(model, [(n, keep) for n in chosen]):
        logits = model(ids)
    return logits, ActivationCache(acts, ids, token_labels(lm, ids[0]), model.cfg, getattr(lm, "name", ""))
