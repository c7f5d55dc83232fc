"""The sampling pipeline: each stage on hand-made logits, parity with HF's processors on random
logits, reproducibility, sampled frequencies, validation messages, and no host sync."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lmlab.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    counts_from_ids,
    entropy,
    min_p_filter,
    no_repeat_ngram_filter,
    sample,
    top_alternatives,
    top_k_filter,
    top_p_filter,
    typical_filter,
    update_counts,
)
from lmlab.errors import LmlabError

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices of the tokens a filter kept, per row."""
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def from_probs(*probs: float) -> torch.Tensor:
    """Logits [1, V] whose softmax is ``probs``."""
    return torch.tensor([probs], dtype=torch.float32).log()


def random_logits(b: int = 4, v: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 3


def assert_same_filtering(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same kept tokens, and the same values on them, within 1e-6."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    mask = torch.isfinite(theirs)
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-6, rtol=0)


# ---- top-k ---------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_even_with_ties_lowest_index_first():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == [[1, 2]]
    assert kept(top_k_filter(logits, 3)) == [[1, 2, 3]]
    assert kept(top_k_filter(logits, 4)) == [[1, 2, 3, 4]]
    # all equal: exactly k, the first k by index
    flat = torch.zeros(2, 10)
    assert kept(top_k_filter(flat, 3)) == [[0, 1, 2], [0, 1, 2]]


def test_top_k_zero_or_whole_vocab_is_off():
    logits = random_logits()
    assert top_k_filter(logits, 0) is logits
    assert top_k_filter(logits, logits.shape[-1]) is logits


# ---- top-p ---------------------------------------------------------------------------------


def test_top_p_keeps_smallest_set_reaching_p():
    # p is kept 0.01 away from the cumulative sums (0.5, 0.8, 0.95): computed through softmax they
    # are only near those values (0.8 came out 0.80000007, one float32 step above p = 0.8f, on this
    # CPU), and which side of p an exact boundary lands on depends on how the CPU's exp rounds
    logits = from_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(top_p_filter(logits, 0.79)) == [[0, 1]]
    assert kept(top_p_filter(logits, 0.81)) == [[0, 1, 2]]
    assert kept(top_p_filter(logits, 0.49)) == [[0]]
    assert kept(top_p_filter(logits, 0.51)) == [[0, 1]]
    # order in the vocabulary does not matter, only probability
    shuffled = from_probs(0.05, 0.3, 0.15, 0.5)
    assert kept(top_p_filter(shuffled, 0.79)) == [[1, 3]]
    # reaching p exactly is enough: equal logits give probabilities 1/4 and sums 0.25, 0.5, 0.75
    # with no rounding at all (exp(0) = 1, then powers of two), so the boundary is exact on any CPU
    equal = torch.zeros(1, 4)
    assert kept(top_p_filter(equal, 0.5)) == [[0, 1]]
    assert kept(top_p_filter(equal, 0.75)) == [[0, 1, 2]]
    assert kept(top_p_filter(equal, 0.25)) == [[0]]


def test_top_p_always_keeps_one_token_and_one_is_off():
    logits = from_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(top_p_filter(logits, 1e-9)) == [[0]]
    assert top_p_filter(logits, 1.0) is logits


# ---- min-p ---------------------------------------------------------------------------------


def test_min_p_is_relative_to_the_top_probability():
    # top 0.6, min_p 0.5 -> threshold 0.3: 0.31 stays, 0.05 and 0.04 go
    logits = from_probs(0.6, 0.31, 0.05, 0.04)
    assert kept(min_p_filter(logits, 0.5)) == [[0, 1]]
    # min_p 0.075 -> threshold 0.045: only 0.04 goes
    assert kept(min_p_filter(logits, 0.075)) == [[0, 1, 2]]
    assert min_p_filter(logits, 0.0) is logits


# ---- penalties -----------------------------------------------------------------------------


def test_frequency_and_presence_penalties_subtract_what_they_say():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0, 3, 1, 0]])
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, counts, None, p)
    expected = torch.tensor([[1.0, 2.0 - 1.5 - 0.25, -1.0 - 0.5 - 0.25, 0.5]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, -1.0, 0.5]]))  # input untouched


def test_repetition_penalty_divides_positive_and_multiplies_negative_once():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    counts = torch.tensor([[5, 1, 0, 0]])
    out = apply_penalties(logits, counts, None, SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, -2.0]]))


def test_counts_ignore_pads_and_update_in_place():
    ids = torch.tensor([[-1, -1, 2, 2, 0], [1, 1, 1, 3, 0]])
    counts = counts_from_ids(ids, 4)
    assert counts.tolist() == [[1, 0, 2, 0], [1, 3, 0, 1]]
    assert update_counts(counts, torch.tensor([3, 3])) is counts
    assert counts.tolist() == [[1, 0, 2, 1], [1, 3, 0, 2]]


def test_no_repeat_ngram_bans_completions_and_ignores_left_pads():
    # ... 5 6 7 ... 5 6 -> 7 would repeat the 3-gram (5, 6, 7)
    ids = torch.tensor([[5, 6, 7, 1, 5, 6]])
    out = no_repeat_ngram_filter(torch.zeros(1, 10), ids, 3)
    assert (out[0] == NEG_INF).nonzero().flatten().tolist() == [7]
    # the same row left-padded gives the same bans; rows shorter than n (down to no token
    # at all) ban nothing, however their pads line up
    padded = torch.tensor(
        [
            [-1, -1, 5, 6, 7, 1, 5, 6],
            [-1, -1, -1, -1, -1, -1, 6, 7],
            [-1, -1, -1, -1, -1, -1, -1, 6],
            [-1, -1, -1, -1, -1, -1, -1, -1],
        ]
    )
    out = no_repeat_ngram_filter(torch.zeros(4, 10), padded, 3)
    assert kept(out) == [[t for t in range(10) if t != 7]] + [list(range(10))] * 3
    assert kept(no_repeat_ngram_filter(torch.zeros(4, 10), padded, 1)) == [
        [0, 2, 3, 4, 8, 9],
        [0, 1, 2, 3, 4, 5, 8, 9],
        [0, 1, 2, 3, 4, 5, 7, 8, 9],
        list(range(10)),
    ]
    assert no_repeat_ngram_filter(out, ids, 0) is out


# ---- parity with transformers' processors --------------------------------------------------


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(v=50)
    ids = torch.randint(0, 50, (4, 30), generator=torch.Generator().manual_seed(1))
    for penalty in (1.3, 0.7):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        ours = apply_penalties(logits, counts_from_ids(ids, 50), None, SamplingParams(repetition_penalty=penalty))
        assert_same_filtering(ours, theirs)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    logits = random_logits(v=6)
    ids = torch.randint(0, 6, (4, 40), generator=torch.Generator().manual_seed(n))
    theirs = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    ours = apply_penalties(logits, None, ids, SamplingParams(no_repeat_ngram_size=n))
    assert (theirs == NEG_INF).any()  # the comparison bans something
    assert_same_filtering(ours, theirs)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = random_logits()
    assert_same_filtering(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = random_logits()
    assert_same_filtering(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = random_logits()
    assert_same_filtering(min_p_filter(logits, min_p), MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.95])
def test_typical_matches_transformers(mass):
    from transformers.generation.logits_process import TypicalLogitsWarper

    logits = random_logits()
    # also after an earlier filter has already put -inf in the row
    for x in (logits, top_k_filter(logits, 40)):
        assert_same_filtering(typical_filter(x, mass), TypicalLogitsWarper(mass)(None, x.clone()))
    assert typical_filter(logits, 1.0) is logits


def test_temperature_matches_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper

    logits = random_logits()
    torch.testing.assert_close(apply_temperature(logits, 0.7), TemperatureLogitsWarper(0.7)(None, logits.clone()))
    assert apply_temperature(logits, 1.0) is logits


# ---- the pipeline --------------------------------------------------------------------------

ALL_ON = SamplingParams(
    temperature=0.8,
    top_k=50,
    top_p=0.95,
    min_p=0.01,
    typical_p=0.95,
    repetition_penalty=1.2,
    frequency_penalty=0.3,
    presence_penalty=0.2,
    no_repeat_ngram_size=2,
    seed=1234,
)


def history(b: int = 4, v: int = 500, s: int = 20):
    ids = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(7))
    return counts_from_ids(ids, v), ids


def test_same_seed_same_samples_different_seed_differs():
    logits = random_logits(b=64)
    counts, ids = history(b=64)
    a, b = Sampler(ALL_ON, 500, "cpu"), Sampler(ALL_ON, 500, "cpu")
    for _ in range(3):  # step after step, the two generators stay in lockstep
        assert torch.equal(a(logits, counts, ids)[0], b(logits, counts, ids)[0])
    other = SamplingParams(**{**ALL_ON.__dict__, "seed": 99})
    first = Sampler(ALL_ON, 500, "cpu")(logits, counts, ids)[0]
    assert torch.equal(first, Sampler(ALL_ON, 500, "cpu")(logits, counts, ids)[0])
    assert not torch.equal(first, Sampler(other, 500, "cpu")(logits, counts, ids)[0])


def test_sampled_frequencies_match_the_filtered_distribution():
    params = SamplingParams(temperature=0.7, top_k=4, seed=0)
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.2, -1.0])
    draws = 40_000
    ids, _ = Sampler(params, 6, "cpu")(row.expand(draws, 6))
    freq = torch.bincount(ids, minlength=6).float() / draws
    expected = torch.zeros(6)
    expected[:4] = (row[:4] / 0.7).softmax(-1)
    assert freq[4:].sum() == 0  # filtered tokens are never drawn
    # each frequency within 5 standard errors of its probability
    stderr = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 5 * stderr + 1e-9).all(), (freq, expected)


def test_temperature_zero_is_argmax_of_penalised_logits_lowest_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 0.0, 4.0, 0.0]])
    ids, logprobs = Sampler(SamplingParams(temperature=0), 4, "cpu")(logits)
    assert ids.tolist() == [1, 0]
    # penalties still apply: token 0 of row 1 was seen, 5/2 < 4
    counts = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])
    ids, _ = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 4, "cpu")(logits, counts)
    assert ids.tolist() == [1, 2]
    # warpers are skipped in greedy decoding: typical-p would drop the top token here
    big = random_logits(b=8)
    ids, _ = Sampler(SamplingParams(temperature=0, typical_p=0.2, top_k=3), 500, "cpu")(big)
    assert torch.equal(ids, big.argmax(-1))


def test_logprobs_are_of_the_raw_distribution():
    logits = random_logits(b=8)
    counts, ids_hist = history(b=8)
    ids, logprobs = Sampler(ALL_ON, 500, "cpu")(logits.bfloat16(), counts, ids_hist)
    raw = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, raw)
    assert ids.dtype == torch.long and logprobs.dtype == torch.float32


def test_padded_lm_head_columns_are_never_sampled():
    logits = torch.zeros(2, 8)
    logits[:, 6:] = 100.0  # padding columns past the real vocabulary
    ids, logprobs = Sampler(SamplingParams(temperature=0), 6, "cpu")(logits)
    assert ids.tolist() == [0, 0]
    torch.testing.assert_close(logprobs, torch.full((2,), -math.log(6)))


def test_top_alternatives_and_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, NEG_INF, 1.0, NEG_INF]])
    probs, ids = top_alternatives(logits, 2)
    assert ids[1].tolist() == [0, 2]
    torch.testing.assert_close(probs[1], torch.tensor([2.0, 1.0]).softmax(-1))
    torch.testing.assert_close(probs[0], torch.full((2,), 0.25))
    ent = entropy(logits)
    p = torch.tensor([2.0, 1.0]).softmax(-1)
    torch.testing.assert_close(ent, torch.stack([torch.tensor(math.log(4)), -(p * p.log()).sum()]))


def test_sample_is_reproducible_with_a_generator():
    logits = random_logits(b=32)
    a = sample(logits, torch.Generator().manual_seed(3))
    b = sample(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(sample(logits, greedy=True), logits.argmax(-1))


def test_missing_history_is_a_clear_error():
    with pytest.raises(LmlabError, match="seq_ids"):
        Sampler(SamplingParams(no_repeat_ngram_size=2), 10, "cpu")(torch.zeros(1, 10))
    with pytest.raises(LmlabError, match="token_counts"):
        Sampler(SamplingParams(presence_penalty=1.0), 10, "cpu")(torch.zeros(1, 10))


# ---- validation ----------------------------------------------------------------------------

BAD = [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("min_p", 1.0),
    ("min_p", -0.1),
    ("min_p", float("nan")),
    ("typical_p", 0.0),
    ("typical_p", 1.01),
    ("typical_p", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("frequency_penalty", float("nan")),
    ("presence_penalty", float("inf")),
    ("n", 0),
    ("no_repeat_ngram_size", -1),
]


@pytest.mark.parametrize("name,value", BAD)
def test_validate_names_the_parameter_in_one_sentence(name, value):
    with pytest.raises(LmlabError) as err:
        SamplingParams(**{name: value}).validate()
    msg = str(err.value)
    assert name in msg
    assert msg.endswith(".") and "\n" not in msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg), msg  # one sentence
    with pytest.raises(LmlabError):  # the Sampler validates too
        Sampler(SamplingParams(**{name: value}), 10, "cpu")


def test_defaults_and_edges_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, typical_p=1.0, min_p=0.0, top_k=0, n=1).validate()
    ALL_ON.validate()


# ---- no host sync --------------------------------------------------------------------------


def test_no_host_sync_with_every_stage_on(monkeypatch):
    logits = random_logits(b=8)
    counts, ids = history(b=8)
    sampler = Sampler(ALL_ON, 500, "cpu")
    greedy = Sampler(SamplingParams(**{**ALL_ON.__dict__, "temperature": 0.0}), 500, "cpu")

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the sampling pipeline")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    out = [sampler(logits, counts, ids), greedy(logits, counts, ids), sampler(logits, None, ids)]
    top_alternatives(logits, 5)
    entropy(logits)
    update_counts(counts, out[0][0])
    monkeypatch.undo()
    for ids_, logprobs in out:
        assert ids_.shape == (8,) and logprobs.shape == (8,)
        assert torch.isfinite(logprobs).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda():
    # CUDA's own sync detector: any op that waits for the GPU raises inside this block.
    dev = torch.device("cuda")
    logits = random_logits(b=8).to(dev)
    counts, ids = (t.to(dev) for t in history(b=8))
    sampler = Sampler(ALL_ON, 500, dev)
    first = Sampler(ALL_ON, 500, dev)(logits, counts, ids)[0]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, logprobs = sampler(logits, counts, ids)
        update_counts(counts, out)
        top_alternatives(logits, 5)
        entropy(logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, first)  # the same seed on the same device repeats
