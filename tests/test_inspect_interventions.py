"""The activation cache and interventions: exact identities a user can rely on.

- ablating every head of layer i (zero) makes attn_out of layer i equal the output
  projection's bias: the heads' outputs are the projection's input, so o(0) = o.bias
  (zero for Llama, which has no bias; GPT-2 has one);
- skipping a layer makes its resid_post equal its resid_pre;
- patching a run with its own activations changes nothing, bit for bit;
- every intervention gives the same greedy tokens in cached generation as in generation that
  recomputes the whole sequence each step.
"""

import warnings

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inspect import (
    AblateHeads,
    Patch,
    ReplaceEmbeddings,
    ScaleEmbeddings,
    SkipLayers,
    Steer,
    intervene,
    run_with_cache,
)
from lmlab.inspect.cache import activation_shape
from tiny import VOCAB


def ids_of(n=16, b=1, seed=3):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the cache


def test_run_with_cache_keeps_only_what_was_asked(tiny):
    lm = tiny("llama")
    ids = ids_of(9, b=2)
    logits, cache = run_with_cache(lm, ids, names=["blocks.*.resid_post", "blocks.1.attn.k"])
    assert list(cache) == ["blocks.0.resid_post", "blocks.1.attn.k", "blocks.1.resid_post"]
    for name in cache:
        assert tuple(cache[name].shape) == activation_shape(lm.config, name, 2, 9)
    assert torch.equal(logits, lm(ids))  # no pattern asked for: still the fused path
    assert torch.equal(cache.stack("blocks.*.resid_post")[1], cache["blocks.1.resid_post"])
    with pytest.raises(LmlabError, match="'blocks.0.attn.q' is not in this cache"):
        cache["blocks.0.attn.q"]
    assert "<table" in cache._repr_html_() and "blocks.1.attn.k" in cache._repr_html_()
    assert repr(cache).startswith("ActivationCache(3 names, B=2, T=9")


def test_cache_over_budget_refuses_unless_forced(tiny):
    lm = tiny("llama")
    ids = ids_of(64)
    with pytest.raises(LmlabError, match=r"would take 0\.\d+ MB, over the 0\.01 MB budget.*force=True"):
        run_with_cache(lm, ids, budget_mb=0.01)
    with pytest.warns(ResourceWarning, match=r"will take 0\.\d+ MB, over the 0\.01 MB budget"):
        _, cache = run_with_cache(lm, ids, budget_mb=0.01, force=True)
    assert len(cache) == len(lm.hook_names())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under the budget: no warning at all
        run_with_cache(lm, ids, names="logits", budget_mb=1.0)


def test_bad_prompts(tiny):
    lm = tiny("llama")
    with pytest.raises(LmlabError, match="token id 500 is out of range"):
        run_with_cache(lm, [1, 2, 500])
    with pytest.raises(LmlabError, match="different lengths"):
        run_with_cache(lm, [[1, 2], [1, 2, 3]])
    with pytest.raises(LmlabError, match="has no tokenizer"):
        run_with_cache(lm, "text needs a tokenizer")


# ----------------------------------------------------------------------------- exact identities


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ablating_every_head_makes_attn_out_the_output_bias(tiny, family):
    lm = tiny(family)
    ids = ids_of()
    layer = 1
    o = lm.model.blocks[layer].attn.o
    bias = o.bias if o.bias is not None else torch.zeros(lm.config.d_model)
    assert (family == "gpt2") == (o.bias is not None)
    with intervene(lm, AblateHeads(f"{layer}.*")):
        ablated, cache = run_with_cache(lm, ids, f"blocks.{layer}.attn_out")
    assert torch.equal(cache[f"blocks.{layer}.attn_out"], bias.expand(1, ids.shape[1], -1))
    with lm.hooks({f"blocks.{layer}.attn_out": lambda x, n: bias.expand_as(x).clone()}):
        assert torch.equal(lm(ids), ablated)
    assert not torch.equal(lm(ids), ablated)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3"])
def test_skipping_a_layer_passes_its_input_through(tiny, family):
    lm = tiny(family)
    ids = ids_of()
    with intervene(lm, SkipLayers(1)):
        logits, cache = run_with_cache(lm, ids, ["blocks.1.resid_pre", "blocks.1.resid_post", "blocks.0.resid_post"])
    assert torch.equal(cache["blocks.1.resid_post"], cache["blocks.1.resid_pre"])
    assert torch.equal(cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"])
    assert not torch.equal(logits, lm(ids))
    assert lm.model.hooks == {}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_patching_a_run_with_its_own_activations_changes_nothing(tiny, family):
    lm = tiny(family)
    ids = ids_of(12, b=2)
    logits, cache = run_with_cache(lm, ids)  # every point (so attention ran eagerly)
    with intervene(lm, Patch(cache)):
        assert torch.equal(lm(ids), logits)
    with intervene(lm, Patch(cache, "blocks.*.attn.head_out", positions=[0, 5], heads=[1, 2])):
        assert torch.equal(lm(ids), lm(ids))


def test_patching_from_another_run_changes_only_later_positions(tiny):
    lm = tiny("llama")
    clean, corrupt = ids_of(12, seed=1), ids_of(12, seed=2)
    clean_logits, cache = run_with_cache(lm, clean, "blocks.0.resid_pre")
    with intervene(lm, Patch(cache)):  # the whole input of block 0: the clean run itself
        assert torch.equal(lm(corrupt), clean_logits)
    base = lm(corrupt)
    with intervene(lm, Patch(cache, positions=[7])):
        patched = lm(corrupt)
    assert torch.equal(patched[:, :7], base[:, :7])  # causal: earlier positions cannot see it
    assert not torch.equal(patched[:, 7:], base[:, 7:])


def test_patch_needs_what_it_patches(tiny):
    lm = tiny("llama")
    _, cache = run_with_cache(lm, ids_of(), "blocks.0.resid_pre")
    with pytest.raises(LmlabError, match="the source cache has no 'blocks.1.resid_pre'"):
        with intervene(lm, Patch(cache, "blocks.1.resid_pre")):
            pass
    with pytest.raises(LmlabError, match="has no head axis"):
        with intervene(lm, Patch(cache, "blocks.0.resid_pre", heads=[0])):
            pass
    assert lm.model.hooks == {}  # nothing was left registered by the failed attempts


def test_mean_ablation_uses_the_mean_over_positions(tiny):
    lm = tiny("llama")
    ids, ref = ids_of(10, seed=4), ids_of(14, seed=5)
    _, ref_cache = run_with_cache(lm, ref, "blocks.0.attn.head_out")
    mean = ref_cache["blocks.0.attn.head_out"].mean(dim=(0, 1))  # (H, D)
    with intervene(lm, AblateHeads("0.1,0.3", mode="mean", reference=ref)):
        _, cache = run_with_cache(lm, ids, "blocks.0.attn.head_out")
    out = cache["blocks.0.attn.head_out"][0]  # (T, H, D)
    assert torch.equal(out[:, 1], mean[1].expand(10, -1)) and torch.equal(out[:, 3], mean[3].expand(10, -1))
    _, clean = run_with_cache(lm, ids, "blocks.0.attn.head_out")
    assert torch.equal(out[:, [0, 2]], clean["blocks.0.attn.head_out"][0][:, [0, 2]])


def test_steering_adds_the_scaled_difference_of_mean_activations(tiny):
    lm = tiny("llama")
    toward, away = ids_of(6, seed=7)[0].tolist(), ids_of(8, seed=8)[0].tolist()
    steer = Steer.from_prompts(lm, toward, away, layer=1, scale=3.0)
    _, a = run_with_cache(lm, toward, "blocks.1.resid_pre")
    _, b = run_with_cache(lm, away, "blocks.1.resid_pre")
    # the first position (an attention sink) is left out of each mean
    assert torch.allclose(steer.vector, a["blocks.1.resid_pre"][0, 1:].mean(0) - b["blocks.1.resid_pre"][0, 1:].mean(0))
    ids = ids_of()
    _, base = run_with_cache(lm, ids, "blocks.1.resid_pre")
    with intervene(lm, steer):
        _, steered = run_with_cache(lm, ids, "blocks.1.resid_pre")
    assert torch.allclose(
        steered["blocks.1.resid_pre"] - base["blocks.1.resid_pre"], 3.0 * steer.vector.expand(1, 16, -1), atol=1e-5
    )
    with intervene(lm, Steer(steer.vector, 1, scale=0.0)):
        assert torch.equal(lm(ids), lm(ids))
    with pytest.raises(LmlabError, match="layer 2 is out of range"):
        Steer.from_prompts(lm, toward, away, layer=2)
    with pytest.raises(LmlabError, match="is a single token"):
        Steer.from_prompts(lm, [5], away, layer=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma scales embeddings by sqrt(d_model)
def test_replacing_a_token_embedding_is_the_same_as_using_that_token(tiny, family):
    lm = tiny(family)
    ids = ids_of(10, seed=9)
    a, b = ids[0, 4].item(), (ids[0, 4].item() + 1) % VOCAB
    swapped = ids.clone()
    swapped[ids == a] = b
    with intervene(lm, ReplaceEmbeddings(tokens={a: b})):
        assert torch.equal(lm(ids), lm(swapped))
    with intervene(lm, ReplaceEmbeddings(positions={4: b})):
        only4 = ids.clone()
        only4[0, 4] = b
        assert torch.equal(lm(ids), lm(only4))
    with intervene(lm, ReplaceEmbeddings(tokens={a: a})):
        assert torch.equal(lm(ids), lm(ids))


def test_scaling_embeddings_by_token_and_position(tiny):
    lm = tiny("llama")
    ids = torch.tensor([[5, 9, 5, 11, 12]])
    _, base = run_with_cache(lm, ids, "embed")
    with intervene(lm, ScaleEmbeddings(0.5, tokens=[5], positions=[4])):
        _, cache = run_with_cache(lm, ids, "embed")
    scale = torch.tensor([0.5, 1, 0.5, 1, 0.5])[None, :, None]
    assert torch.equal(cache["embed"], torch.where(scale < 1, base["embed"] * 0.5, base["embed"]))


def test_interventions_compose_and_validate_before_running(tiny):
    lm = tiny("llama")
    ids = ids_of()
    with intervene(lm, [AblateHeads("0.1"), SkipLayers(1)]) as ivs:
        both = lm(ids)
        assert len(ivs) == 2
    with intervene(lm, AblateHeads("0.1")):
        with intervene(lm, SkipLayers(1)):
            assert torch.equal(lm(ids), both)
    with pytest.raises(LmlabError, match="head 9"):
        with intervene(lm, SkipLayers(1), AblateHeads("0.9")):
            pass
    with pytest.raises(LmlabError, match="unknown ablation mode 'half'"):
        AblateHeads("0.1", mode="half")
    assert lm.model.hooks == {}


# ----------------------------------------------------------------------------- generation


def _interventions(lm):
    """One of each kind, built for this model."""
    prompt = ids_of(10, seed=11)[0].tolist()
    _, other = run_with_cache(lm, ids_of(14, seed=12), ["blocks.0.resid_post", "blocks.1.attn.v"])
    vector = torch.randn(lm.config.d_model, generator=torch.Generator().manual_seed(0))
    return prompt, {
        "ablate-zero": [AblateHeads("0.0,1.2")],
        "ablate-mean": [AblateHeads("1.*", mode="mean")],
        "skip": [SkipLayers(0)],
        "patch": [
            Patch(other, "blocks.0.resid_post", positions=[3, 11, 12]),
            Patch(other, "blocks.1.attn.v", positions=[12]),
        ],
        "steer": [Steer(vector, 1, scale=2.0)],
        "steer-positions": [Steer(vector, 0, scale=4.0, positions=[2, 12, 14])],
        "scale-embed": [ScaleEmbeddings(3.0, tokens=prompt[:3])],
        "replace-embed": [ReplaceEmbeddings(tokens={prompt[2]: 7}, positions={12: 9})],
        "combined": [AblateHeads("0.1"), SkipLayers(1), Steer(vector, 0, scale=1.0)],
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_interventions_in_cached_generation_equal_recomputing(tiny, family):
    lm = tiny(family)
    prompt, ivs = _interventions(lm)
    base = lm.generate(prompt, max_new_tokens=8, temperature=0.0).token_ids
    changed = 0
    for name, iv in ivs.items():
        with intervene(lm, iv):
            cached = lm.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=True).token_ids
            recomputed = lm.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=False).token_ids
        assert cached == recomputed, name
        changed += cached != base
    assert changed >= len(ivs) - 2  # and they do change what is generated
    assert lm.model.hooks == {}


def test_a_single_token_is_a_steering_prompt(tmp_path):
    """One token each way: each runs after a neutral token that takes the attention sink, and the
    vector is the difference of the two tokens' activations there."""
    import lmlab
    from lmlab.inspect import run_with_cache
    from tiny import make_tiny, save_char_tokenizer

    make_tiny("llama", tmp_path)
    save_char_tokenizer(tmp_path)
    lm = lmlab.load(tmp_path)
    steer = Steer.from_prompts(lm, "a", "b", layer=1)
    assert steer.scale == 0.5
    prefix = lm.tokenizer.encode(" ", add_special=False)  # the char vocabulary has no newline
    acts = []
    for word in "ab":
        _, cache = run_with_cache(lm, prefix + lm.encode(word), ["blocks.1.resid_pre"])
        acts.append(cache["blocks.1.resid_pre"][0, -1])
    torch.testing.assert_close(steer.vector, acts[0] - acts[1])
