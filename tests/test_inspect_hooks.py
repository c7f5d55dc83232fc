"""Hook points: names, validation, the hooks context manager, and that hooks change nothing unless asked.

Exactness: hooks that return their input (or None) leave the forward pass bit-identical
(torch.equal). A hook on attn.scores / attn.pattern switches that layer from fused SDPA to the
eager computation, which equals SDPA to float rounding, not bit for bit; so "identity hooks at
every point" is compared bit for bit with the eager path, and the eager path with SDPA to
float rounding: within 1e-5 of the logits' scale (atol = 1e-5 x the largest |logit|, rtol =
1e-5). The rounding of a logit comes from the numbers it is computed from, not from its own
size, so a logit near 0 carries the absolute error of its neighbours: Gemma's extra norms take
the largest difference to 1.1e-5 with logits up to 9, which a plain atol of 1e-5 (plus 1e-5 x
|logit|) allowed by only 1.5x on this Intel Xeon; other CPUs' kernels round differently. Measured
here: at most 0.1 of the tolerance (Gemma), 0.07 for the other families.
"""

from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inspect.hooks import hook_names, markdown_table, parse_heads, parse_layers, resolve_names
from lmlab.model import HOOK_POINTS
from tiny import VOCAB

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen3", "gemma3"]


def ids_of(n=20, b=2, seed=1):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- names


def test_docs_hooks_md_is_generated_from_hook_points():
    doc = Path(__file__).parent.parent / "docs" / "hooks.md"
    assert doc.read_text() == markdown_table(), "run: python -m lmlab.inspect.hooks --markdown > docs/hooks.md"
    for template in HOOK_POINTS:
        assert f"`{template}`" in doc.read_text()


def test_hook_names_expand_every_template(tiny):
    gpt2, llama = tiny("gpt2"), tiny("llama")
    per_block = sum(t.startswith("blocks.") for t in HOOK_POINTS)
    assert len(hook_names(llama.config)) == 1 + per_block * llama.config.n_layers + 2
    assert "pos_embed" in hook_names(gpt2.config) and "pos_embed" not in hook_names(llama.config)
    assert llama.hook_names() == hook_names(llama.config)
    assert hook_names(llama.config)[:3] == ["embed", "blocks.0.resid_pre", "blocks.0.attn.q"]


def test_patterns_select_names(tiny):
    cfg = tiny("llama").config  # 2 layers
    assert resolve_names(cfg, "blocks.*.attn.pattern") == ["blocks.0.attn.pattern", "blocks.1.attn.pattern"]
    assert resolve_names(cfg, "blocks.1.attn.*") == [
        f"blocks.1.attn.{n}" for n in ("q", "k", "v", "scores", "pattern", "head_out")
    ]
    assert resolve_names(cfg, ["logits", "*resid_post"]) == ["blocks.0.resid_post", "blocks.1.resid_post", "logits"]
    assert len(resolve_names(cfg, "blocks.0.*")) == sum(t.startswith("blocks.") for t in HOOK_POINTS)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blocks.0.attn.patern", "unknown hook name 'blocks.0.attn.patern'. Did you mean: blocks.0.attn.pattern"),
        ("blocks.9.resid_pre", "layer 9 is out of range; this model has 2 layers, numbered 0..1."),
        ("blocks.5.*", "layer 5 is out of range"),
        ("blocks.*.attn.nothing*", "the pattern 'blocks.*.attn.nothing*' matches no hook name"),
        ("pos_embed", "has no 'pos_embed' hook"),
    ],
)
def test_bad_hook_names_say_what_to_do(tiny, spec, message):
    with pytest.raises(LmlabError) as e:
        resolve_names(tiny("llama").config, spec)
    text = str(e.value)
    assert message in text
    assert "\n" not in text and text.endswith((".", "?")) and len(text) < 250


@pytest.mark.parametrize(
    "parse, spec, message",
    [
        (parse_heads, "0.7", "head 7 (layer 0) is out of range; this model has 4 heads per layer, numbered 0..3."),
        (parse_heads, "3.1", "layer 3 is out of range"),
        (parse_heads, "a.b", "cannot read the head 'a.b'"),
        (parse_layers, "2", "layer 2 is out of range"),
        (parse_layers, "x", "cannot read the layer 'x'"),
    ],
)
def test_bad_heads_and_layers(tiny, parse, spec, message):
    with pytest.raises(LmlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse(tiny("llama").config, spec)


def test_head_and_layer_specs(tiny):
    cfg = tiny("llama").config
    assert parse_heads(cfg, "1.2,0.*") == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2)]
    assert parse_heads(cfg, "1") == [(1, h) for h in range(4)]
    assert parse_layers(cfg, "0-1") == [0, 1] and parse_layers(cfg, "*") == [0, 1] and parse_layers(cfg, 1) == [1]


# ----------------------------------------------------------------------------- the context manager


def test_hooks_context_registers_and_always_removes(tiny):
    lm = tiny("llama")
    seen = []
    with lm.hooks(
        {"blocks.*.resid_post": lambda x, name: seen.append((name, tuple(x.shape)))}, embed=lambda x, n: None
    ):
        lm(ids_of(6, 1))
        assert set(lm.model.hooks) == {"blocks.0.resid_post", "blocks.1.resid_post", "embed"}
    assert lm.model.hooks == {}
    assert seen == [("blocks.0.resid_post", (1, 6, 64)), ("blocks.1.resid_post", (1, 6, 64))]
    with pytest.raises(RuntimeError):
        with lm.hooks({"logits": lambda x, n: None}):
            raise RuntimeError("boom")
    assert lm.model.hooks == {}  # removed on the way out of an exception too


def test_a_hook_that_returns_a_tensor_replaces_the_activation(tiny):
    lm = tiny("llama")
    with lm.hooks({"logits": lambda x, n: torch.zeros_like(x)}):
        assert lm(ids_of(5, 1)).abs().max() == 0
    assert lm(ids_of(5, 1)).abs().max() > 0


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_hooks_at_every_point_are_bit_identical(tiny, family):
    lm = tiny(family)
    ids = ids_of()
    plain = lm(ids)
    names = hook_names(lm.config)
    fused = [n for n in names if not n.endswith(("attn.scores", "attn.pattern"))]
    identity = lambda x, name: x  # noqa: E731
    look = lambda x, name: None  # noqa: E731
    with lm.hooks([(n, identity) for n in fused] + [(n, look) for n in fused]):
        assert torch.equal(lm(ids), plain)  # SDPA path, every other point hooked
    with lm.hooks({"blocks.*.attn.pattern": look}):
        eager = lm(ids)  # the eager path, nothing changed
    with lm.hooks([(n, identity) for n in names]):
        assert torch.equal(lm(ids), eager)  # every point, scores and pattern included


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_pattern_equals_sdpa_and_is_a_distribution(tiny, family):
    lm = tiny(family)
    ids = ids_of(n=20)
    sdpa = lm(ids)
    logits, cache = lm.run_with_cache(ids, names="blocks.*.attn.pattern")
    assert torch.allclose(logits, sdpa, rtol=1e-5, atol=1e-5 * sdpa.abs().max().item()), (logits - sdpa).abs().max()
    T = ids.shape[1]
    causal = torch.ones(T, T).tril().bool()
    for i in range(lm.config.n_layers):
        p = cache[f"blocks.{i}.attn.pattern"]  # (B, H, T, S)
        assert p.shape == (2, lm.config.n_heads, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        allowed = causal
        if lm.config.layer_types[i] == "sliding":
            q, k = torch.arange(T)[:, None], torch.arange(T)[None]
            allowed = causal & (q - k < lm.config.sliding_window)
        assert (p[..., ~allowed] == 0).all(), f"layer {i}: masked keys must get exactly 0"
        assert (p[..., allowed] > 0).all()
