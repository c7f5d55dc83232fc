"""The induction classifier on hand-built attention patterns: heads are named by where they
attend, whatever their ablation effect."""

import pytest
import torch

from lmlab.inspect.induction import (
    INDUCTION_MIN,
    PREVIOUS_TOKEN_MIN,
    Ablation,
    CircuitLink,
    InductionResult,
    classify_heads,
    pattern_scores,
)


def hand_built_pattern(seq_len: int = 10, n: int = 2, bos: bool = True) -> torch.Tensor:
    """(n, 4, T, T) patterns over [BOS] + A + A (A: seq_len tokens), causal rows summing to 1:
    head 0 an induction head (each token of the second A attends to the token after its earlier
    occurrence), head 1 a previous-token head, head 2 uniform over the past, head 3 on BOS (a sink)."""
    off = 1 if bos else 0
    T = off + 2 * seq_len
    p = torch.zeros(n, 4, T, T)
    for q in range(T):
        p[:, 2, q, : q + 1] = 1.0 / (q + 1)
        p[:, 3, q, 0] = 1.0
        p[:, 1, q, max(q - 1, 0)] = 1.0
        if q >= off + seq_len:
            p[:, 0, q, q - seq_len + 1] = 0.9  # the induction target ...
            p[:, 0, q, 0] += 0.1  # ... and a little sink
        else:
            p[:, 0, q, 0] = 1.0
    return p


def test_scores_of_a_hand_built_pattern():
    for bos in (True, False):
        induction, previous = pattern_scores(hand_built_pattern(bos=bos), seq_len=10)
        assert induction[0].item() == pytest.approx(0.9) and induction[1] == 0.0 and induction[3] == 0.0
        assert previous[1] == 1.0 and previous[0] == 0.0 and previous[3] == 0.0
        assert induction[2] < 0.1 and previous[2] < 0.1  # uniform: about 1/T to each


def test_heads_are_classified_by_their_pattern():
    # two layers of the hand-built heads; layer 0's previous-token head, layer 1's induction head
    pattern = hand_built_pattern()
    induction, previous = pattern_scores(pattern, seq_len=10)
    scores = torch.stack([torch.tensor([0.0, 0.0, 0.02, 0.0]), induction])  # (L=2, H=4)
    prev_scores = torch.stack([previous, torch.tensor([0.0, 0.05, 0.02, 0.0])])
    roles = classify_heads(scores, prev_scores)
    assert roles == {"induction": [(1, 0)], "previous-token": [(0, 1)]}
    # the thresholds: just under is not enough
    just_under = torch.tensor([[INDUCTION_MIN - 0.01, 0.0]]), torch.tensor([[0.0, PREVIOUS_TOKEN_MIN - 0.01]])
    assert classify_heads(*just_under) == {"induction": [], "previous-token": []}
    # several: strongest first
    many = classify_heads(torch.tensor([[0.4, 0.0, 0.9]]), torch.tensor([[0.0, 0.8, 0.0]]))
    assert many == {"induction": [(0, 2), (0, 0)], "previous-token": [(0, 1)]}


def test_the_report_names_roles_not_ablation_ranks():
    """A head whose ablation removes most of the drop but does not attend inductively (the
    SmolLM2 16.0 case) is reported as what its pattern says, with its ablation effect beside it."""
    from lmlab.inspect.display import as_text

    scores = torch.tensor([[0.0, 0.0], [0.0, 0.87]])
    prev_scores = torch.tensor([[0.0, 0.91], [0.0, 0.0]])
    heads = [Ablation(0, 1, 13.9, 9.1, 0.55, 0.0, 0.91, "previous-token"), Ablation(1, 1, 13.8, 5.6, 0.23, 0.87, 0.0)]
    heads[1].role = "induction"
    r = InductionResult(
        "hand-built",
        40,
        4,
        0,
        13.8,
        3.1,
        [Ablation(0, None, 13.9, 9.0, 0.5), Ablation(1, None, 13.8, 5.0, 0.3)],
        heads,
        scores,
        prev_scores,
        roles=classify_heads(scores, prev_scores),
        circuit=[CircuitLink((0, 1), (1, 1), 0.87, 0.05)],
    )
    text = " ".join(as_text(r, width=100).split())
    assert "attend to the token after the earlier occurrence): 1.1 (0.87)" in text
    assert "attend to the token before): 0.1 (0.91)" in text
    assert "circuit: previous-token head 0.1 feeds induction head 1.1; with 0.1 ablated, its induction score" in text
    d = r.to_dict()
    assert [h["layer"] for h in d["induction_heads"]] == [1] and d["induction_heads"][0]["removed"] == 0.23
    assert d["previous_token_heads"][0]["removed"] == 0.55
    assert d["circuit"][0]["previous_token_head"] == "0.1"
