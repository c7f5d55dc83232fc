"""Logit lens, effect metrics, shape trace and activation patching on tiny models."""

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.inspect import (
    AblateHeads,
    Patch,
    SkipLayers,
    Steer,
    effect,
    generation_diff,
    intervene,
    kl_per_position,
    layer_logits,
    logit_lens,
    logit_lens_generation,
    patching_sweep,
    run_with_cache,
    shape_trace,
    top1_agreement,
    top_token_change,
)
from lmlab.inspect.lens import unembed
from tiny import VOCAB

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen3", "gemma3"]


def ids_of(n=12, b=1, seed=5):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- logit lens


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_layers_lens_is_the_models_output(tiny, family):
    lm = tiny(family)
    ids = ids_of(b=2)
    assert torch.equal(layer_logits(lm, ids, lm.config.n_layers - 1), lm(ids))
    lens = logit_lens(lm, ids[:1], k=3)
    probs = lm(ids[:1])[0].softmax(-1).topk(3)
    assert torch.equal(lens.top_ids[-1], probs.indices)
    assert torch.allclose(lens.top_probs[-1], probs.values)
    assert lens.top_ids.shape == (lm.config.n_layers, 12, 3)
    # the target of each position is the next input token (the model's own top token at the end)
    assert lens.targets[:-1] == [str(t) for t in ids[0, 1:].tolist()]


def test_lens_of_generated_tokens_matches_the_lens_of_the_whole_sequence(tiny):
    lm = tiny("llama")
    prompt = ids_of(8)[0].tolist()
    lens, gen = logit_lens_generation(lm, prompt, k=2, max_new_tokens=6)
    n = len(gen.token_ids)
    assert lens.top_ids.shape == (lm.config.n_layers, n, 2)
    assert lens.top_ids[-1, :, 0].tolist() == gen.token_ids  # greedy: the final layer's top-1 is what was generated
    full = logit_lens(lm, prompt + gen.token_ids[:-1], k=2)
    steps = slice(len(prompt) - 1, len(prompt) - 1 + n)
    assert torch.equal(lens.top_ids, full.top_ids[:, steps])
    assert torch.allclose(lens.top_probs, full.top_probs[:, steps], atol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_metrics_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    base, mod = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)
    expected = F.kl_div(mod.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_per_position(base, mod), expected, atol=1e-6)
    assert torch.equal(kl_per_position(base, base), torch.zeros(3, 7))
    change = top_token_change(base, mod)
    top = base.argmax(-1, keepdim=True)
    assert torch.allclose(change["dlogit"], (mod.gather(-1, top) - base.gather(-1, top)).squeeze(-1))
    assert torch.allclose(
        change["dprob"], (mod.softmax(-1).gather(-1, top) - base.softmax(-1).gather(-1, top)).squeeze(-1)
    )
    assert top1_agreement(base, base) == 1.0
    assert top1_agreement(base, mod) == (base.argmax(-1) == mod.argmax(-1)).float().mean().item()


def test_effect_of_nothing_is_zero_and_of_an_ablation_is_not(tiny):
    lm = tiny("llama")
    ids = ids_of()
    none = effect(lm, ids)
    assert none.kl == [0.0] * 12 and none.agreement == 1.0 and none.dlogit == [0.0] * 12
    e = effect(lm, ids, AblateHeads("0.*"), SkipLayers(1))
    assert e.mean_kl > 0.01 and len(e.kl) == 12
    assert e.interventions == ["ablate heads 0.* (zero)", "skip layers 1"]
    assert set(e.to_dict()) == {"interventions", "summary", "positions"}
    assert "<table" in e._repr_html_()


def test_generation_diff_with_the_same_seed(tiny):
    lm = tiny("llama")
    prompt = ids_of(6)[0].tolist()
    same = generation_diff(
        lm, prompt, Steer(torch.zeros(lm.config.d_model), 0), seed=3, max_new_tokens=6, temperature=1.0
    )
    assert same.base_ids == same.mod_ids and same.first_divergence is None  # same seed, no change: same sample
    diff = generation_diff(lm, prompt, SkipLayers(0), seed=3, max_new_tokens=6, temperature=1.0)
    assert diff.base_ids == same.base_ids and diff.mod_ids != diff.base_ids
    k = diff.first_divergence
    assert diff.base_ids[:k] == diff.mod_ids[:k] and diff.base_ids[k] != diff.mod_ids[k]
    assert diff.to_dict()["first_divergence"] == k and "<table" in diff._repr_html_()


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_trace_matches_the_documented_shapes(tiny, family):
    lm = tiny(family)
    cfg = lm.config
    trace = shape_trace(lm, ids_of(7), collapse_layers=False)
    assert trace.all_ok, [r for r in trace.rows if not r.ok]
    names = [r.name for r in trace.rows if r.step == "prefill"]
    assert names[0] == "input_ids" and names[-1] == "logits"
    q = next(r for r in trace.rows if r.step == "decode" and r.name == "blocks.0.attn.q")
    assert (
        q.shape == (1, cfg.n_heads, 1, cfg.head_dim)
        and q.dims == f"B=1, n_heads={cfg.n_heads}, T=1, head_dim={cfg.head_dim}"
    )
    pattern = next(r for r in trace.rows if r.step == "decode" and r.name == "blocks.0.attn.pattern")
    assert pattern.shape == (1, cfg.n_heads, 1, 8)  # one new query, 7 cached keys + its own
    gqa = [r for r in trace.rows if "GQA" in r.name]
    assert bool(gqa) == (cfg.n_kv_heads < cfg.n_heads)
    kv = trace.kv
    assert kv["used_after_decode_bytes"] - kv["used_after_prefill_bytes"] == kv["bytes_per_token"]
    assert kv["bytes_per_token"] == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    collapsed = shape_trace(lm, ids_of(7))
    assert "blocks.{0..%d}.attn.q" % (cfg.n_layers - 1) in [r.name for r in collapsed.rows]


# ----------------------------------------------------------------------------- patching


def test_patching_sweep_finds_the_position_that_differs(tiny):
    lm = tiny("llama")
    clean = ids_of(9, seed=6)
    corrupt = clean.clone()
    corrupt[0, 4] = (clean[0, 4] + 1) % VOCAB
    a, w = lm(clean)[0, -1].topk(2).indices.tolist()  # the metric: logit(a) - logit(w)
    r = patching_sweep(lm, clean, corrupt, a, w, rows_per_pass=7)
    assert r.metric.shape == (2, 9) and abs(r.clean_metric - r.corrupt_metric) > 0.1
    # block 0's input differs only at position 4, so patching it there restores the clean run...
    assert r.restored[0, 4].item() == pytest.approx(1.0, abs=1e-4)
    # ...and anywhere else changes nothing
    assert r.restored[0, [0, 1, 2, 3, 5, 6, 7, 8]].abs().max().item() < 1e-4
    assert r.best()[:2] == (0, 4) or r.restored[r.best()[0], r.best()[1]] >= r.restored[0, 4]
    # the batched sweep equals the Patch intervention applied one run at a time
    _, cache = run_with_cache(lm, clean, "blocks.1.resid_pre")
    with intervene(lm, Patch(cache, positions=[8])):
        logits = lm(corrupt)
    assert r.metric[1, 8].item() == pytest.approx((logits[0, -1, a] - logits[0, -1, w]).item(), abs=1e-4)


def test_patching_needs_prompts_of_the_same_length(tiny):
    from lmlab.errors import LmlabError

    lm = tiny("llama")
    with pytest.raises(LmlabError, match="same number of tokens"):
        patching_sweep(lm, ids_of(5), ids_of(6))
    with pytest.raises(LmlabError, match="cannot patch 'q'"):
        patching_sweep(lm, ids_of(5), ids_of(5, seed=9), point="q")


# ----------------------------------------------------------------------------- displays


def test_notebook_reprs_and_pngs(tiny, tmp_path):
    lm = tiny("llama")
    ids = ids_of(6)
    _, cache = run_with_cache(lm, ids, "blocks.*.attn.pattern")
    pattern = cache.attention(1, head=2)
    assert torch.equal(pattern.matrix(), cache["blocks.1.attn.pattern"][0, 2])
    clean, corrupt = ids_of(6, seed=1), ids_of(6, seed=2)
    things = [
        cache,
        pattern,
        cache.attention(0),
        logit_lens(lm, ids),
        effect(lm, ids, SkipLayers(0)),
        shape_trace(lm, ids),
        patching_sweep(lm, clean, corrupt),
    ]
    for thing in things:
        page = thing._repr_html_()
        assert page.startswith("<table") and "</table>" in page, type(thing)
    for i, thing in enumerate([pattern, logit_lens(lm, ids), things[-1]]):
        thing.save_png(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(lmlab.LmlabError, match="head 4 \\(layer 1\\) is out of range"):
        cache.attention(1, head=4)


def test_unembed_is_what_the_model_does_after_its_last_block(tiny):
    lm = tiny("gemma3")
    ids = ids_of()
    _, cache = run_with_cache(lm, ids, "blocks.2.resid_post")
    assert torch.equal(unembed(lm.model, cache["blocks.2.resid_post"]), lm(ids))
