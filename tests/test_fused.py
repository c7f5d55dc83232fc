"""lmlab.fused (training's RMSNorm, activation, RoPE and causal attention) against model.py's PyTorch lines.

Float32. Values and gradients within 1e-5 of the reference's largest value: the kernels compute
exp with a polynomial (csrc/native.c exp16, within 2 ulp) where PyTorch calls its own, and
otherwise the same products in the same order. A training step of every family that takes them
then equals the same step without them (loss and every gradient, 1e-5).
"""

import pytest
import torch
import torch.nn.functional as F

from lmlab import fused, native
from lmlab.model import ACTIVATIONS, apply_rope, rope_cos_sin

pytestmark = pytest.mark.skipif(not native.serves(), reason=f"lmlab's native library is {native.status()}")


def _close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    assert err <= rel * (1 + want.abs().max().item()), err


def check_activations():
    """Every activation the kernel computes, gated and not, with and without a bias, on features that
    leave a tail after the 16-float vectors, and on values far into both flat ends (|x| up to ~30)."""
    g = torch.Generator().manual_seed(0)
    for act in fused.ACTS:
        for glu in (True, False):
            for with_bias in (False, True):  # the up projection's bias, added in the same pass
                F_ = 83
                h = (torch.randn(3, 5, 2 * F_ if glu else F_, generator=g) * 8).requires_grad_()
                b = (torch.randn(h.shape[-1], generator=g) * 2).requires_grad_() if with_bias else None
                hb = h + b if with_bias else h
                ref = ACTIVATIONS[act]
                want = ref(hb[..., :F_]) * hb[..., F_:] if glu else ref(hb)
                dy = torch.randn(want.shape, generator=g)
                got = fused.activation(h, act, glu, b)
                _close(got, want)
                inputs = (h, b) if with_bias else (h,)
                for a, c in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
                    _close(a, c)


def check_rope():
    """q and k turned, v passed through, and the gradient gathered into the projection's layout:
    full and partial rotary, GQA, one table for the batch and one per row."""
    g = torch.Generator().manual_seed(1)
    B, T, H, K, D = 2, 11, 6, 2, 32
    for R, per_row in ((32, True), (16, True), (32, False)):
        qkv = torch.randn(B, T, H + 2 * K, D, generator=g, requires_grad=True)
        pos = torch.arange(3, 3 + T).expand(B if per_row else 1, T)
        inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
        cos, sin = rope_cos_sin(inv, pos, torch.float32)
        t = qkv.transpose(1, 2)
        wq, wk = apply_rope(t[:, : H + K], cos, sin).split([H, K], dim=1)
        want = (wq, wk, t[:, H + K :])
        got = fused.rope_qkv(qkv, cos, sin, (H, K, K))
        for a, b in zip(got, want):
            assert a.shape == b.shape
            _close(a, b)
        dys = [torch.randn(a.shape, generator=g) for a in want]
        grads = [torch.autograd.grad(ys, qkv, dys, retain_graph=True)[0] for ys in (got, want)]
        _close(*grads)
        # an output left out of the loss has a zero gradient, as autograd's own ops give
        _close(torch.autograd.grad(got[0].sum(), qkv)[0], torch.autograd.grad(want[0].sum(), qkv)[0])


def check_rmsnorm():
    """RMSNorm's output and the gradients of x and (where it trains) w, against F.rms_norm through
    autograd; rows of 83 features leave a tail after the 16-float vectors."""
    g = torch.Generator().manual_seed(3)
    for weight_grad in (False, True):
        x = (torch.randn(4, 9, 83, generator=g) * 3).requires_grad_()
        w = (torch.randn(83, generator=g) + 1).requires_grad_(weight_grad)
        want = F.rms_norm(x, (83,), w, 1e-6)
        got = fused.rms_norm(x, w, 1e-6)
        _close(got, want)
        inputs = (x, w) if weight_grad else (x,)
        dy = torch.randn(want.shape, generator=g)
        for a, b in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
            _close(a, b)


def check_attention():
    """Causal attention straight from the qkv layout against F.scaled_dot_product_attention on the
    split heads: GQA (2 and 3 query heads per k/v head) and not, blocks that leave tails after the
    4-row and 16-key tiles, one token, head sizes 16 to 80, RoPE turned inside (apply_rope's);
    values and qkv's gradient."""
    g = torch.Generator().manual_seed(4)
    for B, T, H, K, D in ((2, 37, 4, 2, 32), (1, 1, 1, 1, 16), (3, 64, 2, 2, 80), (2, 130, 3, 1, 16)):
        qkv = (torch.randn(B, T, H + 2 * K, D, generator=g) * 2).requires_grad_()
        q, k, v = qkv.transpose(1, 2).split([H, K, K], dim=1)
        scale = D**-0.5
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=K != H)
        got = fused.attention(qkv, H, K, scale)
        assert got.shape == (B, T, H, D)
        _close(got, want.transpose(1, 2))
        dy = torch.randn(got.shape, generator=g)
        grads = [torch.autograd.grad(y, qkv, d)[0] for y, d in ((got, dy), (want, dy.transpose(1, 2)))]
        _close(*grads)
    # RoPE turned inside the kernel: full and partial rotary, one table for the batch and one per row
    for R, per_row, (B, T, H, K, D) in ((32, False, (2, 21, 4, 2, 32)), (16, True, (2, 40, 3, 3, 48))):
        qkv = torch.randn(B, T, H + 2 * K, D, generator=g, requires_grad=True)
        pos = torch.arange(5, 5 + T).expand(B if per_row else 1, T)
        cos, sin = rope_cos_sin(1.0 / (10000 ** (torch.arange(0, R, 2).float() / R)), pos, torch.float32)
        q, k, v = qkv.transpose(1, 2).split([H, K, K], dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H).transpose(1, 2)
        got = fused.attention(qkv, H, K, D**-0.5, (cos, sin))
        _close(got, want)
        dy = torch.randn(got.shape, generator=g)
        _close(*[torch.autograd.grad(y, qkv, dy)[0] for y in (got, want)])
    assert fused.attention_fits(fused.ATTENTION_MAX_T, 64) and not fused.attention_fits(fused.ATTENTION_MAX_T + 1, 64)
    assert not fused.attention_fits(64, 24)  # head sizes the 16-float tiles don't divide keep PyTorch's kernel
    assert fused.attention_fits(64, 512) and not fused.attention_fits(64, 528)


def test_rmsnorm_equals_f_rms_norm():
    check_rmsnorm()


def test_activations_equal_pytorch():
    check_activations()


def test_rope_equals_apply_rope():
    check_rope()


def test_attention_equals_sdpa():
    check_attention()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "qwen3"])
def test_a_training_step_equals_the_unfused_one(tiny, family, monkeypatch):
    """The loss and every parameter's gradient of a training forward and backward, with the fused
    steps (as training runs) and without them (model.py's lines)."""
    lm = tiny(family)
    model = lm.model.float().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls, attention_calls = [], []
    real, real_attention = fused.applies, fused.attention
    monkeypatch.setattr(fused, "applies", lambda x: calls.append(1) or real(x))
    monkeypatch.setattr(fused, "attention", lambda *a: attention_calls.append(1) or real_attention(*a))
    loss, grads = step()
    assert calls and real(torch.zeros(1, requires_grad=True)), "the fused steps were not asked"
    # gemma3 and qwen3 norm q and k per head (qk_norm), which keeps PyTorch's attention
    assert bool(attention_calls) == (family in ("llama", "gpt2")), attention_calls
    monkeypatch.setattr(fused, "applies", lambda x: False)
    want_loss, want_grads = step()
    model.eval()
    _close(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        _close(grads[name], want_grads[name])


def test_outside_training_the_pytorch_lines_run(tiny, monkeypatch):
    """Evaluation (eval mode, or no autograd) never asks for the fused steps: what inspection and
    generation see is model.py's own arithmetic."""
    model = tiny("llama").model.float()
    monkeypatch.setattr(fused, "rope_qkv", None)
    monkeypatch.setattr(fused, "activation", None)
    monkeypatch.setattr(fused, "rms_norm", None)
    monkeypatch.setattr(fused, "attention", None)
    ids = torch.arange(10)[None]
    model.eval()
    model(ids).sum().backward()  # autograd on, eval mode: attribution's case
    model.train()
    with torch.no_grad():
        model(ids)
    model.eval()
