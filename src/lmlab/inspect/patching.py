"""Activation patching: which (layer, position) carries the information that decides the answer?

Run a clean prompt ("The Eiffel Tower is in" -> " Paris") and a corrupted one of the same
length ("The Colosseum is in" -> " Rome"). For every layer and position, put the clean
activation into the corrupted run and measure how much of the clean answer comes back:

    metric = logit(answer) - logit(wrong) at the last position
    restored = (metric_patched - metric_corrupt) / (metric_clean - metric_corrupt)

1 means that single activation restores the clean behaviour, 0 that it does nothing. The
sweep runs many variants per forward pass: each batch row carries a different patch
(``run_variants``, which the induction experiment uses for head ablations too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmlab.errors import LmlabError
from lmlab.inspect.cache import as_token_ids, run_with_cache, token_labels
from lmlab.inspect.hooks import check_layer, model_of, registered

Edit = Callable[[torch.Tensor], torch.Tensor]  # an activation of one variant's rows -> its replacement


@torch.inference_mode()
def run_variants(
    model,
    ids: torch.Tensor,
    variants: list[list[tuple[str, Edit]]],
    reduce: Callable,
    *,
    rows_per_pass: int = 16,
    last_only: bool = False,
    progress: Callable | None = None,
) -> list:
    """Run ``ids`` (n, T) once per variant, many variants per forward pass.

    A variant is a list of (hook name, edit); each edit gets that variant's n rows of the
    activation and returns their replacement. ``reduce(logits (n, T, V), ids)`` turns each
    variant's logits into its result. ``progress(done, total)`` is called after each pass.
    """
    n = ids.shape[0]
    per_pass = max(1, rows_per_pass // n)
    results = []
    for start in range(0, len(variants), per_pass):
        chunk = variants[start : start + per_pass]
        by_name: dict[str, list[tuple[int, Edit]]] = {}
        for v, edits in enumerate(chunk):
            for name, edit in edits:
                by_name.setdefault(name, []).append((v, edit))

        def make_hook(entries):
            def hook(x, name):
                x = x.clone()
                for v, edit in entries:
                    x[v * n : (v + 1) * n] = edit(x[v * n : (v + 1) * n])
                return x

            return hook

        with registered(model, [(name, make_hook(entries)) for name, entries in by_name.items()]):
            logits = model(ids.repeat(len(chunk), 1), last_only=last_only)  # (len(chunk) * n, T, V)
        results += [reduce(logits[v * n : (v + 1) * n], ids) for v in range(len(chunk))]
        if progress is not None:
            progress(min(start + per_pass, len(variants)), len(variants))
    return results


# ----------------------------------------------------------------------------- the sweep


def single_token(lm, token) -> int:
    """A token id from an id or a string that must encode to exactly one token."""
    if isinstance(token, int):
        if not 0 <= token < lm.config.vocab_size:
            raise LmlabError(
                f"token id {token} is out of range; this model's vocabulary has ids 0..{lm.config.vocab_size - 1}."
            )
        return token
    ids = lm.encode(token, add_special=False)
    if len(ids) != 1:
        raise LmlabError(
            f"{token!r} is {len(ids)} tokens, but the metric compares single tokens; "
            "try it with a leading space (e.g. ' Paris') or pick a shorter word."
        )
    return ids[0]


@dataclass
class PatchingResult:
    point: str  # which block point was patched, e.g. "resid_pre"
    layers: list[int]
    positions: list[int]
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answer: str
    wrong: str
    clean_metric: float  # logit(answer) - logit(wrong), clean run
    corrupt_metric: float
    metric: torch.Tensor  # (L, P) the metric with one activation patched
    restored: torch.Tensor  # (L, P) fraction of the clean-corrupt gap restored

    def column_labels(self) -> list[str]:
        """Each position's token, 'clean/corrupted' where the two differ (whitespace made visible)."""
        from lmlab.inspect.display import show_token

        out = []
        for p in self.positions:
            a, b = show_token(self.clean_tokens[p]), show_token(self.corrupt_tokens[p])
            out.append(a if a == b else f"{a}/{b}")
        return out

    def best(self) -> tuple[int, int, float]:
        """(layer, position, restored) of the strongest single patch."""
        flat = self.restored.nan_to_num(-1e9).argmax().item()
        li, pi = divmod(flat, self.restored.shape[1])
        return self.layers[li], self.positions[pi], self.restored[li, pi].item()

    def to_dict(self) -> dict:
        return {
            "point": self.point,
            "layers": self.layers,
            "positions": self.positions,
            "clean_tokens": self.clean_tokens,
            "corrupt_tokens": self.corrupt_tokens,
            "answer": self.answer,
            "wrong": self.wrong,
            "clean_metric": self.clean_metric,
            "corrupt_metric": self.corrupt_metric,
            "metric": self.metric.tolist(),
            "restored": self.restored.tolist(),
        }

    def __rich__(self):
        from lmlab.inspect.display import heatmap_table

        return heatmap_table(
            self.restored,
            [f"L{layer}" for layer in self.layers],
            self.column_labels(),
            title=f"patching {self.point}: fraction of logit({self.answer!r}) - logit({self.wrong!r}) restored",
            center=0.0,
        )

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import heatmap_html

        return heatmap_html(
            self.restored,
            [f"L{layer}" for layer in self.layers],
            self.column_labels(),
            title=(
                f"patching {self.point}: fraction restored "
                f"(clean {self.clean_metric:.2f}, corrupt {self.corrupt_metric:.2f})"
            ),
            center=0.0,
        )

    def save_png(self, path) -> None:
        from lmlab.inspect.display import save_heatmap_png

        save_heatmap_png(
            self.restored,
            [f"L{layer}" for layer in self.layers],
            self.column_labels(),
            path,
            title=f"activation patching of {self.point}: fraction of logit diff restored",
            xlabel="position",
            ylabel="layer",
            center=0.0,
        )


PATCH_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@torch.inference_mode()
def patching_sweep(
    lm,
    clean,
    corrupt,
    answer=None,
    wrong=None,
    *,
    point: str = "resid_pre",
    layers=None,
    positions=None,
    rows_per_pass: int = 32,
    progress: Callable | None = None,
) -> PatchingResult:
    """Patch the clean run's ``blocks.{l}.{point}`` into the corrupted run at each (layer, position).

    answer / wrong: the tokens whose logit difference is the metric (ids or one-token strings);
    default: the clean and the corrupted run's own top next tokens.
    """
    model = model_of(lm)
    cfg = model.cfg
    if point not in PATCH_POINTS:
        raise LmlabError(f"cannot patch {point!r}; use one of {', '.join(PATCH_POINTS)}.")
    clean_ids, corrupt_ids = as_token_ids(lm, clean), as_token_ids(lm, corrupt)
    if clean_ids.shape != corrupt_ids.shape or clean_ids.shape[0] != 1:
        raise LmlabError(
            "the clean and corrupted prompts must be one sequence each with the same number of tokens "
            f"(got {clean_ids.shape[1]} and {corrupt_ids.shape[1]}); "
            "patching pairs them position by position (`lmlab inspect` shows the tokens)."
        )
    T = clean_ids.shape[1]
    layers = list(range(cfg.n_layers)) if layers is None else [check_layer(cfg, int(layer)) for layer in layers]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    bad = [p for p in positions if not 0 <= p < T]
    if bad:
        raise LmlabError(f"position {bad[0]} is out of range; the prompts have {T} tokens, numbered 0..{T - 1}.")

    names = [f"blocks.{layer}.{point}" for layer in layers]
    clean_logits, cache = run_with_cache(lm, clean_ids, names)
    corrupt_logits = model(corrupt_ids, last_only=True)
    a = single_token(lm, answer) if answer is not None else int(clean_logits[0, -1].argmax())
    w = single_token(lm, wrong) if wrong is not None else int(corrupt_logits[0, -1].argmax())
    if a == w:
        raise LmlabError(
            f"the answer and the wrong token are the same ({token_labels(lm, [a])[0]!r}); "
            "pass --answer and --wrong (one token each) that the two prompts should tell apart."
        )

    def logit_diff(logits, _ids=None) -> float:
        return (logits[0, -1, a] - logits[0, -1, w]).item()

    clean_m, corrupt_m = logit_diff(clean_logits), logit_diff(corrupt_logits)

    def put(layer: int, pos: int) -> Edit:
        src = cache[f"blocks.{layer}.{point}"][0, pos]  # (C,)

        def edit(x):  # (1, T, C)
            x[:, pos] = src
            return x

        return edit

    variants = [[(f"blocks.{layer}.{point}", put(layer, p))] for layer in layers for p in positions]
    metrics = run_variants(
        model, corrupt_ids, variants, logit_diff, rows_per_pass=rows_per_pass, last_only=True, progress=progress
    )
    metric = torch.tensor(metrics).view(len(layers), len(positions))
    gap = clean_m - corrupt_m
    restored = (metric - corrupt_m) / gap if gap != 0 else torch.full_like(metric, float("nan"))
    return PatchingResult(
        point,
        layers,
        positions,
        token_labels(lm, clean_ids[0]),
        token_labels(lm, corrupt_ids[0]),
        token_labels(lm, [a])[0],
        token_labels(lm, [w])[0],
        clean_m,
        corrupt_m,
        metric,
        restored,
    )
