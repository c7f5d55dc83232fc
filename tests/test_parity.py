"""Parity: lmlab's logits and greedy tokens equal transformers' on the same random weights."""

import pytest
import torch

import lmlab
from tiny import FAMILIES, VOCAB, make_tiny

ATOL = 1e-4  # max |Δ| of fp32 logits


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, folder)
    return request.param, hf, lmlab.load(folder)


def test_logits_match(pair):
    family, hf, lm = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = lm(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < ATOL, family


def test_greedy_16_tokens_match(pair):
    family, hf, lm = pair
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 10:]
    seq = ids
    for _ in range(16):  # uncached argmax loop: the plainest possible decoder
        nxt = lm(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert seq[0, 10:].tolist() == ref.tolist(), family


def test_config_family(pair):
    family, _, lm = pair
    assert lm.config.family == {"llama3": "llama"}.get(family, family)
