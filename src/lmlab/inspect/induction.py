"""The induction experiment: random tokens repeated twice, and the heads that do the copying.

A sequence of random tokens cannot be predicted the first time through; the second time, a
model with induction heads ("after A came B before, so predict B") predicts it well. So the
mean loss on the second repeat is far below the first. Which heads do it? Ablate them (their
output set to zero) and see how much of that drop disappears:

    drop     = loss(first repeat) - loss(second repeat)
    removed  = 1 - drop(with the ablation) / drop(unmodified)

A full scan is every head of every layer. To stay fast it goes in two stages: ablate each
whole layer, then each head of the layers that matter most; many ablations share one batched
forward pass (``run_variants``). Each head also gets the classic attention score: how much a
token of the second repeat attends to the token right after its earlier occurrence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.inspect.hooks import model_of, registered
from lmlab.inspect.patching import run_variants


def repeated_tokens(lm, seq_len: int, n_seqs: int, seed: int) -> torch.Tensor:
    """(n_seqs, 1 + 2 * seq_len) ids: BOS (when the model has one), random tokens, the same again.

    Tokens are drawn from the upper part of the vocabulary's first 32k ids (ordinary word
    pieces in every BPE vocabulary here), away from the special tokens at the start."""
    vocab = lm.config.vocab_size
    lo, hi = min(vocab // 8, 1000), min(vocab, 32000)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(lo, hi, (n_seqs, seq_len), generator=g)
    parts = [rand, rand]
    bos = lm.config.bos_token_id
    if bos is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1).to(lm.device)


def repeat_losses(logits: torch.Tensor, ids: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """Mean next-token loss (nats) on the first and on the second repeat.

    Both exclude each repeat's first token (nothing in the repeat predicts it), so the two
    means are over the same count of tokens: seq_len - 1 per sequence.
    """
    off = ids.shape[1] - 2 * seq_len  # 1 with BOS, else 0
    loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
    )  # (n, S-1): loss of token t+1
    # column c holds the loss of the token at position c + 1
    first = loss[:, off : off + seq_len - 1]  # tokens off+1 .. off+seq_len-1
    second = loss[:, off + seq_len : off + 2 * seq_len - 1]  # tokens off+seq_len+1 .. off+2*seq_len-1
    return first.mean().item(), second.mean().item()


@dataclass
class Ablation:
    layer: int
    head: int | None  # None: the whole layer
    loss_first: float
    loss_second: float
    removed: float  # fraction of the clean drop that this ablation removes
    score: float = float("nan")  # attention induction score (heads only)
    prev_score: float = float("nan")  # attention to the previous token (heads only)

    @property
    def label(self) -> str:
        return f"L{self.layer}" if self.head is None else f"{self.layer}.{self.head}"


@dataclass
class InductionResult:
    model_name: str
    seq_len: int
    n_seqs: int
    seed: int
    loss_first: float  # nats, unmodified
    loss_second: float
    layers: list[Ablation]  # every layer ablated whole, in layer order
    heads: list[Ablation]  # single heads of the top layers, most important first
    scores: torch.Tensor  # (L, H) attention induction score of every head
    prev_scores: torch.Tensor  # (L, H) attention to the previous token
    seconds: float = 0.0

    @property
    def drop(self) -> float:
        return self.loss_first - self.loss_second

    def top_heads(self, n: int = 5) -> list[Ablation]:
        return self.heads[:n]

    def to_dict(self) -> dict:
        def row(a):
            return {
                "layer": a.layer,
                "head": a.head,
                "loss_first": a.loss_first,
                "loss_second": a.loss_second,
                "removed": a.removed,
                **({"induction_score": a.score, "previous_token_score": a.prev_score} if a.head is not None else {}),
            }

        return {
            "model": self.model_name,
            "seq_len": self.seq_len,
            "n_seqs": self.n_seqs,
            "seed": self.seed,
            "ablation": "zero",
            "loss_first_repeat": self.loss_first,
            "loss_second_repeat": self.loss_second,
            "drop": self.drop,
            "layers": [row(a) for a in self.layers],
            "heads": [row(a) for a in self.heads],
            "induction_scores": self.scores.tolist(),
            "previous_token_scores": self.prev_scores.tolist(),
            "seconds": self.seconds,
        }

    def __rich__(self):
        from lmlab.inspect.display import induction_renderable

        return induction_renderable(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import induction_html

        return induction_html(self)

    def save_png(self, path) -> None:
        from lmlab.inspect.display import save_heatmap_png

        H = self.scores.shape[1]
        save_heatmap_png(
            self.scores,
            [f"L{layer}" for layer in range(self.scores.shape[0])],
            [f"H{h}" for h in range(H)],
            path,
            title="induction score: attention to the token after the earlier occurrence",
            xlabel="head",
            ylabel="layer",
        )


def _attention_scores(model, ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward with every layer's pattern looked at -> (logits, induction scores (L, H),
    previous-token scores (L, H)).

    Induction score of a head: the mean attention from each second-repeat token to the token
    right after that token's first occurrence (seq_len - 1 positions back). Previous-token
    score: the mean attention to the token just before, over the same queries; induction
    heads read what previous-token heads wrote."""
    cfg = model.cfg
    off = ids.shape[1] - 2 * seq_len
    q = torch.arange(off + seq_len, off + 2 * seq_len, device=ids.device)  # second-repeat queries
    induction = torch.zeros(cfg.n_layers, cfg.n_heads)
    previous = torch.zeros(cfg.n_layers, cfg.n_heads)

    def score(layer):
        def look(p, name):  # (n, H, T, S)
            induction[layer] = p[:, :, q, q - seq_len + 1].float().mean(dim=(0, 2)).cpu()
            previous[layer] = p[:, :, q, q - 1].float().mean(dim=(0, 2)).cpu()

        return look

    with registered(model, [(f"blocks.{layer}.attn.pattern", score(layer)) for layer in range(cfg.n_layers)]):
        logits = model(ids)
    return logits, induction, previous


def _zero_heads(heads: list[int]):
    def edit(y):  # (n, T, H, D)
        y[:, :, heads] = 0.0
        return y

    return edit


@torch.inference_mode()
def induction_experiment(
    lm, seq_len: int = 40, n_seqs: int = 4, seed: int = 0, top_layers: int = 3, rows_per_pass: int = 16, progress=None
) -> InductionResult:
    """Repeated random tokens: the losses on each repeat, and the heads whose (zero) ablation
    removes most of the drop. ``progress(done, total)`` reports the ablation passes."""
    t0 = time.perf_counter()
    model = model_of(lm)
    cfg = model.cfg
    if seq_len < 2 or n_seqs < 1:
        raise LmlabError(f"the experiment needs seq_len >= 2 and n_seqs >= 1, got {seq_len} and {n_seqs}.")
    if 2 * seq_len + 1 > cfg.max_seq_len:
        raise LmlabError(
            f"2 x {seq_len} tokens do not fit in the model's context of {cfg.max_seq_len}; use a smaller --seq-len."
        )
    top_layers = max(1, min(top_layers, cfg.n_layers))
    ids = repeated_tokens(lm, seq_len, n_seqs, seed)
    logits, scores, prev_scores = _attention_scores(model, ids, seq_len)
    l1, l2 = repeat_losses(logits, ids, seq_len)
    drop = l1 - l2

    def scan(keys: list[tuple[int, int | None]], done_before: int, total: int) -> list[Ablation]:
        """Ablate each (layer, head) key (head None: every head of the layer), batched."""
        variants = [
            [(f"blocks.{layer}.attn.head_out", _zero_heads(list(range(cfg.n_heads)) if h is None else [h]))]
            for layer, h in keys
        ]
        report = (lambda done, _n: progress(done_before + done, total)) if progress else None
        losses = run_variants(
            model,
            ids,
            variants,
            lambda lg, x: repeat_losses(lg, x, seq_len),
            rows_per_pass=rows_per_pass,
            progress=report,
        )
        return [
            Ablation(layer, h, a1, a2, 1.0 - (a1 - a2) / drop if drop else float("nan"))
            for (layer, h), (a1, a2) in zip(keys, losses)
        ]

    total = cfg.n_layers + top_layers * cfg.n_heads
    layer_results = scan([(layer, None) for layer in range(cfg.n_layers)], 0, total)
    best_layers = sorted(layer_results, key=lambda a: -a.removed)[:top_layers]
    head_results = scan([(a.layer, h) for a in best_layers for h in range(cfg.n_heads)], cfg.n_layers, total)
    for a in head_results:
        a.score, a.prev_score = scores[a.layer, a.head].item(), prev_scores[a.layer, a.head].item()
    head_results.sort(key=lambda a: -a.removed)
    return InductionResult(
        getattr(lm, "name", ""),
        seq_len,
        n_seqs,
        seed,
        l1,
        l2,
        layer_results,
        head_results,
        scores,
        prev_scores,
        time.perf_counter() - t0,
    )
