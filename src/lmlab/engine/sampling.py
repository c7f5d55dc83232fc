"""The sampling pipeline: from one decode step's logits to the next token of every row.

The engine calls :class:`Sampler` once per decode step with logits ``[B, vocab]``. Each stage
is one function on float32 logits, in Hugging Face's order::

    repetition penalty -> frequency/presence penalties -> no_repeat_ngram      (processors)
    -> temperature -> top-k -> top-p -> min-p -> typical-p                       (warpers)
    -> sample (Gumbel-max draw, or argmax when temperature == 0)

Every stage runs without a host sync: no ``.item()``, ``.tolist()``, ``nonzero`` or Python
``if`` on a tensor's values -- only on shapes and on the (Python) parameters -- so the engine
can queue step after step on the GPU without waiting. A stage that is off returns its input
tensor itself, so greedy decoding pays only for the argmax.

Filters remove a token by setting its logit to ``-inf``; they never renormalise (softmax does).

Token history comes in two forms, both ``[B, ...]`` on the logits' device:

- ``token_counts [B, vocab]``: how often each token occurred so far in the row (prompt and
  generated). The engine keeps it up to date with :func:`update_counts`; :func:`counts_from_ids`
  builds it from a prompt. Used by the repetition, frequency and presence penalties.
- ``seq_ids [B, S]`` (long): the row's token ids in order, latest token in the last column.
  Ragged rows are *left*-padded with any negative id (e.g. ``-1``); negative ids are ignored
  everywhere. Used by ``no_repeat_ngram_size`` (and to build counts when none are given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError

# ----------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class SamplingParams:
    """One batch's sampling settings (every row of a batch shares them).

    ``n`` (samples per prompt) is the engine's concern: it repeats each prompt ``n`` times as
    rows; the Sampler itself samples one token per row.
    """

    temperature: float = 1.0  # 0 means greedy (argmax), must be >= 0
    top_k: int = 0  # 0 = off; must be >= 0
    top_p: float = 1.0  # in (0, 1]; 1 = off
    min_p: float = 0.0  # in [0, 1); relative to the top token's probability
    typical_p: float = 1.0  # in (0, 1]; 1 = off
    repetition_penalty: float = 1.0  # > 0; HF semantics (divide positive logits, multiply negative)
    frequency_penalty: float = 0.0  # OpenAI semantics: logit -= f * count(token)
    presence_penalty: float = 0.0  # logit -= p * (count(token) > 0)
    no_repeat_ngram_size: int = 0  # >= 0; ban tokens that would complete an n-gram already seen
    seed: int | None = None
    n: int = 1  # samples per prompt, >= 1

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0): the warpers are then skipped."""
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """True when a penalty needs ``token_counts``."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def __post_init__(self):
        self.validate()  # a SamplingParams that exists is valid: the one place values are checked

    def validate(self) -> None:
        """Raise :class:`LmlabError` (one sentence naming the fix) for the first bad value.

        Comparisons are written so that NaN fails them (``not (x >= 0)`` is True for NaN).
        """
        _check_number("temperature", self.temperature)
        if not self.temperature >= 0:
            raise LmlabError(
                f"temperature must be >= 0, got {self.temperature}; use --temperature 0 for "
                "greedy decoding or a value like 0.7 for sampling."
            )
        _check_int("top_k", self.top_k, "--top-k 40")
        if self.top_k < 0:
            raise LmlabError(
                f"top_k must be >= 0, got {self.top_k}; use --top-k 40 to keep the 40 most likely "
                "tokens or 0 to turn it off."
            )
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise LmlabError(
                f"top_p must be in (0, 1], got {self.top_p}; use --top-p 0.9 for nucleus sampling or 1 to turn it off."
            )
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise LmlabError(
                f"min_p must be in [0, 1), got {self.min_p}; use --min-p 0.05 to drop tokens "
                "below 5% of the top token's probability or 0 to turn it off."
            )
        _check_number("typical_p", self.typical_p)
        if not 0 < self.typical_p <= 1:
            raise LmlabError(
                f"typical_p must be in (0, 1], got {self.typical_p}; use --typical-p 0.9 for "
                "locally typical sampling or 1 to turn it off."
            )
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise LmlabError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}; use "
                "--repetition-penalty 1.2 to discourage repeats or 1 to turn it off."
            )
        _check_number("frequency_penalty", self.frequency_penalty)
        if not math.isfinite(self.frequency_penalty):
            raise LmlabError(
                f"frequency_penalty must be a finite number, got {self.frequency_penalty}; use "
                "--frequency-penalty 0.5 or 0 to turn it off."
            )
        _check_number("presence_penalty", self.presence_penalty)
        if not math.isfinite(self.presence_penalty):
            raise LmlabError(
                f"presence_penalty must be a finite number, got {self.presence_penalty}; use "
                "--presence-penalty 0.5 or 0 to turn it off."
            )
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, "--no-repeat-ngram-size 3")
        if self.no_repeat_ngram_size < 0:
            raise LmlabError(
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}; use "
                "--no-repeat-ngram-size 3 to forbid repeated 3-grams or 0 to turn it off."
            )
        if self.seed is not None:
            _check_int("seed", self.seed, "--seed 0")
        _check_int("n", self.n, "--n 4")
        if self.n < 1:
            raise LmlabError(f"n must be >= 1, got {self.n}; use --n 1 for one sample per prompt or more for several.")


def _check_number(name: str, value) -> None:
    """Reject non-numbers (e.g. a string from a config file) with the fix in one sentence."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LmlabError(f"{name} must be a number, got {value!r}; pass a plain number instead.")


def _check_int(name: str, value, example: str) -> None:
    """Reject non-integers (a float top_k would silently truncate) with the fix in one sentence."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LmlabError(f"{name} must be a whole number, got {value!r}; use e.g. {example}.")


# ----------------------------------------------------------------------------------------------
# Token history


def update_counts(token_counts: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """Add one occurrence of ``new_ids [B]`` to ``token_counts [B, vocab]`` in place; return it."""
    token_counts.scatter_add_(1, new_ids.view(-1, 1).to(torch.long), torch.ones_like(token_counts[:, :1]))
    return token_counts


def counts_from_ids(seq_ids: torch.Tensor, vocab_size: int, dtype=torch.int32) -> torch.Tensor:
    """Token counts ``[B, vocab_size]`` of ``seq_ids [B, S]``; negative (pad) ids are not counted.

    Pads (and any id >= vocab_size) land in a spare column past the vocabulary that is dropped,
    so no Python filtering (and no host sync) is needed.
    """
    b = seq_ids.shape[0]
    ids = torch.where((seq_ids >= 0) & (seq_ids < vocab_size), seq_ids, vocab_size).long()
    counts = torch.zeros(b, vocab_size + 1, dtype=dtype, device=seq_ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]


# ----------------------------------------------------------------------------------------------
# Processors: penalties and bans (applied in greedy decoding too)


def apply_repetition_penalty(logits: torch.Tensor, token_counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF repetition penalty on ``logits [B, V]`` for every token seen at least once.

    A seen token's logit is divided by ``penalty`` when positive and multiplied when negative,
    so ``penalty > 1`` always makes it less likely, once, however often it occurred.
    """
    if penalty == 1.0:
        return logits
    seen = token_counts > 0  # [B, V]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(
    logits: torch.Tensor, token_counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI penalties on ``logits [B, V]``: ``-= frequency * count + presence * (count > 0)``."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    counts = token_counts.to(logits.dtype)
    if frequency != 0.0:
        logits = logits - frequency * counts
    if presence != 0.0:
        logits = logits - presence * (counts > 0).to(logits.dtype)
    return logits


def no_repeat_ngram_filter(logits: torch.Tensor, seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ban (``-inf``) every token that would complete an n-gram already in ``seq_ids``.

    ``logits [B, V]``; ``seq_ids [B, S]`` long, latest token last, left-padded with negative
    ids. Same result as HF's ``NoRepeatNGramLogitsProcessor`` on the unpadded rows: the last
    ``n - 1`` tokens are matched against the first ``n - 1`` tokens of every length-``n``
    window (``unfold``, ``[B, S-n+1, n]``), and each matching window bans its last token.
    Pads cannot create bans: in a left-padded row an earlier window holds at least as many
    pads as the suffix, and more unless both are all pads, so the only windows that match
    across pads are all-pad ones, whose last id (a pad) goes to the dropped spare column.
    A row with fewer than ``n`` tokens therefore bans nothing, as in HF.
    """
    if n == 0:
        return logits
    b, s = seq_ids.shape
    if s < n:  # no complete n-gram in any row yet
        return logits
    vocab = logits.shape[-1]
    # For n == 1 the suffix is empty, every window matches, and every token seen is banned.
    suffix = seq_ids[:, s - n + 1 :]  # [B, n-1]
    windows = seq_ids.unfold(1, n, 1)  # [B, S-n+1, n]
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(-1)  # [B, S-n+1]
    # Non-matching windows (and pad / out-of-vocab ids) go to a spare column that is dropped,
    # so one scatter bans everything without filtering on the host.
    last = windows[..., -1]
    target = torch.where(matches & (last >= 0) & (last < vocab), last, vocab)
    banned = torch.zeros(b, vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, target, True)
    return logits.masked_fill(banned[:, :vocab], float("-inf"))


def apply_penalties(
    logits: torch.Tensor,
    token_counts: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    params: SamplingParams,
) -> torch.Tensor:
    """Repetition, then frequency/presence penalties, then the no-repeat-n-gram ban.

    ``logits [B, V]`` float32; ``token_counts [B, V]`` (needed when a penalty is on);
    ``seq_ids [B, S]`` (needed when ``no_repeat_ngram_size > 0``; see the module docstring
    for padding). Returns new logits; the input is never modified.
    """
    if params.uses_counts:
        if token_counts is None:
            if seq_ids is None:
                raise LmlabError(
                    "Repetition, frequency and presence penalties need the token history; pass "
                    "token_counts or seq_ids to the sampler."
                )
            token_counts = counts_from_ids(seq_ids, logits.shape[-1])
        logits = apply_repetition_penalty(logits, token_counts, params.repetition_penalty)
        logits = apply_frequency_presence(logits, token_counts, params.frequency_penalty, params.presence_penalty)
    if params.no_repeat_ngram_size > 0:
        if seq_ids is None:
            raise LmlabError("no_repeat_ngram_size needs the token ids so far; pass seq_ids to the sampler.")
        logits = no_repeat_ngram_filter(logits, seq_ids, params.no_repeat_ngram_size)
    return logits


# ----------------------------------------------------------------------------------------------
# Warpers: temperature and filters (skipped in greedy decoding)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide ``logits [B, V]`` by ``temperature``; 1 and 0 (greedy: argmax is scale-free) are no-ops."""
    if temperature == 1.0 or temperature == 0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row of ``[B, V]``; ``k == 0`` is off.

    Ties at the k-th value are broken by index (lowest kept), deterministically: ``topk``
    alone leaves the choice among equal values to the kernel.
    """
    vocab = logits.shape[-1]
    if k == 0 or k >= vocab:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    above = logits > kth
    # Of the tokens equal to the k-th value, keep the first (k - #above) by index.
    tied = logits == kth
    n_free = k - above.sum(-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(-1) <= n_free))
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on ``[B, V]``: keep the smallest most-likely set whose probability reaches ``p``.

    Sorted by probability (descending, ties by index), a token is kept when the mass strictly
    before it is below ``p``: the token that makes the sum reach ``p`` is kept and the ones
    after it are not. The top token always stays. ``p == 1`` is off.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # exclusive cumulative sum, [B, V]
    # The most likely token has mass_before 0 < p, so it always stays (at least one token).
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens of ``[B, V]`` whose probability is below ``min_p`` times the top token's.

    The top token always survives (its probability is >= ``min_p * itself``). ``min_p == 0`` is off.
    """
    if min_p == 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.amax(-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling on ``[B, V]``, as HF's ``TypicalLogitsWarper``; ``mass == 1`` is off.

    Tokens are ranked by how far their surprisal ``-log p`` is from the distribution's entropy
    (closest first), and the smallest such set whose probability reaches ``mass`` is kept
    (at least one token). Unlike top-p, this may drop the single most likely token.
    """
    if mass >= 1.0:
        return logits
    logp = torch.log_softmax(logits, dim=-1)
    ent = _entropy_of_logprobs(logp).unsqueeze(-1)  # [B, 1], nats
    distance = (-logp - ent).abs()
    sorted_distance, order = torch.sort(distance, dim=-1, stable=True)
    cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
    # Index of the token at which the mass reaches `mass` (HF's `last_ind`); keep every token
    # no farther than it, and always the closest one.
    last = (cum < mass).sum(-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_distance > sorted_distance.gather(-1, last)
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Drawing a token, and what the engine reports about each step


def sample(logits: torch.Tensor, generator: torch.Generator | None = None, *, greedy: bool = False) -> torch.Tensor:
    """One token id per row of ``logits [B, V]`` -> ``[B]`` long.

    ``greedy`` takes the argmax (lowest index among ties). Otherwise a draw from
    ``softmax(logits)`` by the exponential-race trick, ``argmax(p / E)`` with
    ``E ~ Exp(1)``: exact, and unlike ``torch.multinomial`` it never syncs with the host.
    ``generator`` (on the logits' device) makes the draw reproducible.
    """
    if greedy:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A zero draw would give 0/0 = NaN for a filtered token; keep the divisor positive.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(-1)


def chosen_logprobs(raw_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(raw_logits)[ids]`` per row, ``[B]`` nats, without materialising [B, V] logprobs."""
    raw = raw_logits.float()
    return raw.gather(-1, ids.view(-1, 1)).squeeze(-1) - torch.logsumexp(raw, dim=-1)


def top_alternatives(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row of ``logits [B, V]``: ``(probs [B, k], ids [B, k])``.

    Probabilities are of the raw distribution (softmax of the logits as given), most likely first.
    """
    probs = logits.float().softmax(-1)
    top = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return top.values, top.indices


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row of ``[B, V]``, ``[B]`` in nats; ``-inf`` logits count as 0."""
    return _entropy_of_logprobs(torch.log_softmax(logits.float(), dim=-1))


def _entropy_of_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last axis of log-probabilities ``[B, V]`` -> ``[B]`` nats.

    ``nansum`` skips the ``0 * -inf = NaN`` terms of filtered tokens (as HF does).
    """
    return -(logp * logp.exp()).nansum(-1)


# ----------------------------------------------------------------------------------------------
# The pipeline


class Sampler:
    """Pipeline in HF's order: penalties (repetition, then frequency/presence), no_repeat_ngram,
    temperature, top-k, top-p, min-p, typical-p, then sample.

    Holds the ``torch.Generator`` (on ``device``) seeded from ``params.seed``: the same seed
    gives identical output run after run; ``seed=None`` draws a fresh random seed, readable
    afterwards as ``sampler.seed`` so the run can be recorded and repeated.

    Greedy decoding (temperature 0) applies the penalties and the n-gram ban, skips the
    warpers (as HF does with ``do_sample=False``) and takes the argmax.

    Logits wider than ``vocab_size`` (an lm_head padded past the tokenizer, e.g. 50304 for
    GPT-2's 50257) are cut to ``vocab_size`` first, so padding columns are never sampled.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device):
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.seed = self.generator.seed()
        else:
            self.seed = params.seed
            self.generator.manual_seed(params.seed)

    def process(
        self,
        logits: torch.Tensor,
        token_counts: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every stage but the draw: ``[B, V]`` raw logits -> ``[B, vocab_size]`` float32 processed logits."""
        p = self.params
        x = self._cut(logits).float()
        x = apply_penalties(x, token_counts, seq_ids, p)
        if p.greedy:
            return x
        x = apply_temperature(x, p.temperature)
        x = top_k_filter(x, p.top_k)
        x = top_p_filter(x, p.top_p)
        x = min_p_filter(x, p.min_p)
        x = typical_filter(x, p.typical_p)
        return x

    def __call__(
        self,
        logits: torch.Tensor,
        token_counts: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose one token per row: ``logits [B, V]`` -> ``(ids [B] long, logprobs [B] float32)``.

        ``logprobs`` is the log-probability (nats) of each chosen token under the model's raw
        distribution -- ``log_softmax`` of the logits as given, before penalties, temperature
        or filters -- so it measures how likely the model itself found the token.
        ``token_counts [B, V]`` and ``seq_ids [B, S]`` are the history (see the module
        docstring); counts are built from ``seq_ids`` when only those are given.
        """
        processed = self.process(logits, token_counts, seq_ids)
        ids = sample(processed, self.generator, greedy=self.params.greedy)
        return ids, chosen_logprobs(self._cut(logits), ids)

    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        """Drop lm_head padding columns past ``vocab_size`` (a view; a no-op when there are none)."""
        if logits.shape[-1] < self.vocab_size:
            raise LmlabError(
                f"The model gives {logits.shape[-1]} logits per token but the sampler expects "
                f"{self.vocab_size}; create the Sampler with vocab_size={logits.shape[-1]}."
            )
        return logits[..., : self.vocab_size]
