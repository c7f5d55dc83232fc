"""The induction experiment: random tokens repeated twice, and the heads that do the copying.

A sequence of random tokens cannot be predicted the first time through; the second time, a
model with induction heads ("after A came B before, so predict B") predicts it well. So the
mean loss on the second repeat is far below the first. Which heads do it? Ablate them (their
output set to zero) and see how much of that drop disappears:

    drop     = loss(first repeat) - loss(second repeat)
    removed  = 1 - drop(with the ablation) / drop(unmodified)

A head is *named* by what it attends to, not by its ablation effect (a head that many later
heads read from removes much of the drop when ablated without copying anything itself):

    induction score       mean attention from a second-repeat token to the token right after
                          that token's earlier occurrence (the one to copy)
    previous-token score  mean attention to the token just before

A head with an induction score of at least INDUCTION_MIN is an induction head; one with a
previous-token score of at least PREVIOUS_TOKEN_MIN is a previous-token head (chance is about
1 / (2 seq_len) for either). Together they are the induction circuit: a previous-token head
writes "the token before me was A" into each position, and an induction head in a later layer
finds the position whose previous token matches the current one and copies what follows. The
experiment checks that link: ablating each previous-token head, how much of each later
induction head's induction score is left.

Ablation effects are reported beside the roles. A full scan is every head of every layer; to
stay fast it goes in two stages: ablate each whole layer, then each head of the layers that
matter most and every named head; many ablations share one batched forward pass
(``run_variants``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.inspect.hooks import model_of, registered
from lmlab.inspect.patching import run_variants

INDUCTION_MIN = 0.3  # induction score that makes a head an induction head
PREVIOUS_TOKEN_MIN = 0.5  # previous-token score that makes a head a previous-token head


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
    role: str = ""  # "induction", "previous-token" or "" (heads only; from the attention pattern)

    @property
    def label(self) -> str:
        return f"L{self.layer}" if self.head is None else f"{self.layer}.{self.head}"


@dataclass
class CircuitLink:
    """A previous-token head and a later induction head: how much of the induction head's
    score is left when the previous-token head is ablated (zeroed)."""

    prev_head: tuple[int, int]
    induction_head: tuple[int, int]
    score: float  # the induction head's induction score, unmodified
    score_ablated: float  # ... with the previous-token head ablated

    @property
    def kept(self) -> float:
        return self.score_ablated / self.score if self.score else float("nan")


def head_label(head: tuple[int, int]) -> str:
    return f"{head[0]}.{head[1]}"


def pattern_scores(pattern: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction score (H,), previous-token score (H,)) of one layer's attention pattern
    (n, H, T, S) over sequences that end in two repeats of seq_len tokens (with any prefix, e.g.
    BOS, before them). Queries: the second repeat's tokens."""
    T = pattern.shape[-2]
    off = T - 2 * seq_len
    q = torch.arange(off + seq_len, off + 2 * seq_len, device=pattern.device)
    induction = pattern[:, :, q, q - seq_len + 1].float().mean(dim=(0, 2)).cpu()
    previous = pattern[:, :, q, q - 1].float().mean(dim=(0, 2)).cpu()
    return induction, previous


def classify_heads(
    scores: torch.Tensor,
    prev_scores: torch.Tensor,
    induction_min: float = INDUCTION_MIN,
    previous_min: float = PREVIOUS_TOKEN_MIN,
) -> dict[str, list[tuple[int, int]]]:
    """Heads by role from their attention scores (each (L, H)): {"induction": [(layer, head)...],
    "previous-token": [...]}, each sorted by its score, highest first."""

    def pick(m: torch.Tensor, least: float) -> list[tuple[int, int]]:
        found = [(layer, head) for layer, head in (m >= least).nonzero().tolist()]
        return sorted(found, key=lambda lh: -m[lh[0], lh[1]].item())

    induction = pick(scores, induction_min)
    previous = [h for h in pick(prev_scores, previous_min) if h not in induction]
    return {"induction": induction, "previous-token": previous}


@dataclass
class InductionResult:
    model_name: str
    seq_len: int
    n_seqs: int
    seed: int
    loss_first: float  # nats, unmodified
    loss_second: float
    layers: list[Ablation]  # every layer ablated whole, in layer order
    heads: list[Ablation]  # single heads (the top layers' and every named one), most drop removed first
    scores: torch.Tensor  # (L, H) attention induction score of every head
    prev_scores: torch.Tensor  # (L, H) attention to the previous token
    seconds: float = 0.0
    roles: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # classify_heads
    circuit: list[CircuitLink] = field(default_factory=list)
    thresholds: tuple[float, float] = (
        INDUCTION_MIN,
        PREVIOUS_TOKEN_MIN,
    )  # (induction, previous-token) score to name a head

    @property
    def drop(self) -> float:
        return self.loss_first - self.loss_second

    def top_heads(self, n: int = 5) -> list[Ablation]:
        """The heads whose ablation removes most of the drop (whatever their role)."""
        return self.heads[:n]

    def ablation(self, head: tuple[int, int]) -> Ablation | None:
        return next((a for a in self.heads if (a.layer, a.head) == tuple(head)), None)

    @property
    def induction_heads(self) -> list[tuple[int, int]]:
        return self.roles.get("induction", [])

    @property
    def previous_token_heads(self) -> list[tuple[int, int]]:
        return self.roles.get("previous-token", [])

    def to_dict(self) -> dict:
        def row(a):
            return {
                "layer": a.layer,
                "head": a.head,
                "loss_first": a.loss_first,
                "loss_second": a.loss_second,
                "removed": a.removed,
                **(
                    {"induction_score": a.score, "previous_token_score": a.prev_score, "role": a.role or None}
                    if a.head is not None
                    else {}
                ),
            }

        def named(head):
            a = self.ablation(head)
            return {
                "layer": head[0],
                "head": head[1],
                "induction_score": self.scores[head].item(),
                "previous_token_score": self.prev_scores[head].item(),
                "removed": a.removed if a is not None else None,
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
            "thresholds": {"induction_score": INDUCTION_MIN, "previous_token_score": PREVIOUS_TOKEN_MIN},
            "induction_heads": [named(h) for h in self.induction_heads],
            "previous_token_heads": [named(h) for h in self.previous_token_heads],
            "circuit": [
                {
                    "previous_token_head": head_label(c.prev_head),
                    "induction_head": head_label(c.induction_head),
                    "induction_score": c.score,
                    "induction_score_with_previous_token_head_ablated": c.score_ablated,
                }
                for c in self.circuit
            ],
            "layers": [row(a) for a in self.layers],
            "heads": [row(a) for a in self.heads],
            "induction_scores": self.scores.tolist(),
            "previous_token_scores": self.prev_scores.tolist(),
            "seconds": self.seconds,
        }

    def __rich__(self):
        from lmlab.inspect.display import induction_renderable

        return induction_renderable(self)

    def __str__(self) -> str:
        from lmlab.inspect.display import as_text

        return as_text(self)

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


def _attention_scores(
    model, ids: torch.Tensor, seq_len: int, layers: list[int] | None = None, edits=()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward with the patterns of ``layers`` (default: all) looked at -> (logits,
    induction scores (L, H), previous-token scores (L, H)); see ``pattern_scores``. ``edits``:
    more (hook name, function) pairs to run in the same pass (an ablation)."""
    cfg = model.cfg
    induction = torch.zeros(cfg.n_layers, cfg.n_heads)
    previous = torch.zeros(cfg.n_layers, cfg.n_heads)

    def score(layer):
        def look(p, name):  # (n, H, T, S)
            induction[layer], previous[layer] = pattern_scores(p, seq_len)

        return look

    chosen = range(cfg.n_layers) if layers is None else layers
    with registered(model, [*edits, *[(f"blocks.{layer}.attn.pattern", score(layer)) for layer in chosen]]):
        logits = model(ids)
    return logits, induction, previous


def circuit_links(model, ids: torch.Tensor, seq_len: int, roles: dict, scores: torch.Tensor) -> list[CircuitLink]:
    """For each previous-token head with a later induction head: one forward with the
    previous-token head zeroed, reading the later induction heads' scores."""
    links = []
    for prev in roles.get("previous-token", []):
        later = [h for h in roles.get("induction", []) if h[0] > prev[0]]
        if not later:
            continue
        zero = _zero_heads([prev[1]])
        edit = (f"blocks.{prev[0]}.attn.head_out", lambda y, name, zero=zero: zero(y.clone()))
        _, ablated, _ = _attention_scores(model, ids, seq_len, sorted({h[0] for h in later}), [edit])
        links += [CircuitLink(prev, h, scores[h].item(), ablated[h].item()) for h in later]
    return links


def _zero_heads(heads: list[int]):
    def edit(y):  # (n, T, H, D)
        y[:, :, heads] = 0.0
        return y

    return edit


@torch.inference_mode()
def induction_experiment(
    lm, seq_len: int = 40, n_seqs: int = 4, seed: int = 0, top_layers: int = 3, rows_per_pass: int = 16, progress=None
) -> InductionResult:
    """Repeated random tokens: the losses on each repeat; the induction and previous-token heads,
    named by their attention scores, with the links between them (see ``circuit_links``); and
    beside them how much of the drop each layer's and head's (zero) ablation removes.
    ``progress(done, total)`` reports the ablation passes."""
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

    roles = classify_heads(scores, prev_scores)
    named = [h for role in ("induction", "previous-token") for h in roles[role]]
    # the progress total: the head count is known once the layers are ranked (named heads may repeat)
    layer_results = scan(
        [(layer, None) for layer in range(cfg.n_layers)], 0, cfg.n_layers + top_layers * cfg.n_heads + len(named)
    )
    best_layers = sorted(layer_results, key=lambda a: -a.removed)[:top_layers]
    keys = [(a.layer, h) for a in best_layers for h in range(cfg.n_heads)]
    keys += [h for h in named if h not in keys]
    head_results = scan(keys, cfg.n_layers, cfg.n_layers + len(keys))
    role_of = {h: role for role, heads in roles.items() for h in heads}
    for a in head_results:
        a.score, a.prev_score = scores[a.layer, a.head].item(), prev_scores[a.layer, a.head].item()
        a.role = role_of.get((a.layer, a.head), "")
    head_results.sort(key=lambda a: -a.removed)
    circuit = circuit_links(model, ids, seq_len, roles, scores)
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
        roles,
        circuit,
    )
