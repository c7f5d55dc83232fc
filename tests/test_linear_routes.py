"""fused.linear: training's Linear products through the BLAS or oneDNN, whichever this machine runs
faster for the shape, against F.linear.

Float32. Values and gradients within 1e-5 of the reference's largest value: oneDNN adds the same
products in another order. The route of a shape is timed once and kept in kernels.json, so a
later process (a resumed run) takes the same one.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab import fused
from lmlab.train.config import TrainConfig, model_config
from lmlab.train.loop import new_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN")


def _close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    assert err <= rel * (1 + want.abs().max().item()), err


def _leaf(shape, g, grad=True):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


ROUTES = [(True, True), (True, False), (False, True)]  # (forward, input grad) on oneDNN


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "x_shape, bias, grads",
    [
        ((4, 300, 64), True, "xwb"),  # a block's (B, T, C) input, every gradient
        ((1000, 64), False, "xw"),  # no bias (Llama)
        ((3, 700, 32), True, "x"),  # a frozen weight (LoRA's base): the input's gradient only
        ((1000, 48), True, "wb"),  # an input without a gradient
    ],
)
def test_linear_equals_f_linear(route, x_shape, bias, grads, monkeypatch):
    monkeypatch.setattr(fused, "route", route)
    g = torch.Generator().manual_seed(0)
    x = _leaf(x_shape, g, "x" in grads)
    w = _leaf((96, x_shape[-1]), g, "w" in grads)
    b = _leaf((96,), g, "b" in grads) if bias else None
    y = fused.linear(x, w, b)
    assert y.grad_fn.name() == "_LinearBackward"
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w) + ((b,) if bias else ())]
    want = F.linear(*ref)
    want.backward(dy)
    _close(y, want)
    for got, r in zip((x, w, b), ref):
        assert (got.grad is None) == (r.grad is None)
        if r.grad is not None:
            _close(got.grad, r.grad)


@pytest.mark.parametrize("route", ROUTES)
def test_the_output_can_be_changed_in_place(route, monkeypatch):
    """LoRA adds its update into the base's output in place (``y.addmm_``): the output is a
    tensor of its own, not a view made inside the Function."""
    monkeypatch.setattr(fused, "route", route)
    g = torch.Generator().manual_seed(1)
    x, w = _leaf((600, 64), g), _leaf((96, 64), g, False)
    a, bm = _leaf((600, 4), g), _leaf((4, 96), g)
    y = fused.linear(x, w)
    assert y._base is None
    y.addmm_(a, bm)
    y.square().sum().backward()
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, bm))
    (F.linear(x2, w.detach()) + a2 @ b2).square().sum().backward()
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (bm.grad, b2.grad)):
        _close(got, want)


def test_small_products_evaluation_and_the_blas_keep_f_linear(monkeypatch):
    """F.linear itself (autograd's own backward, no Python in it) where oneDNN takes no product."""
    g = torch.Generator().manual_seed(2)
    x, w = _leaf((8, 32), g), _leaf((16, 32), g)
    assert fused.linear(x, w).grad_fn.name() != "_LinearBackward"  # below SMALL_PRODUCT
    x = _leaf((1000, 64), g)
    w = _leaf((96, 64), g)
    with torch.no_grad():
        assert fused.linear(x, w).grad_fn is None
    assert fused.linear(x.detach(), w.detach()).grad_fn is None
    monkeypatch.setattr(fused, "route", (False, False))
    assert fused.linear(x, w).grad_fn.name() == "MmBackward0"


def test_a_shape_is_timed_once_and_every_later_process_decides_the_same(home, monkeypatch):
    monkeypatch.setattr(fused, "route", None)
    monkeypatch.setattr(fused, "_routes", {})
    g = torch.Generator().manual_seed(3)
    x, w = _leaf((1000, 64), g), _leaf((96, 64), g)
    rng = torch.get_rng_state()
    fused.linear(x, w).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)  # timing draws from no stream a run's results depend on
    saved = json.loads((home / "kernels.json").read_text())
    keys = [fused.routes_key("forward", 1000, 64, 96, False), fused.routes_key("input grad", 1000, 96, 64, False)]
    for key in keys:
        assert key in saved and "1024 x" in key  # rows rounded up to a power of two
        assert saved[key]["route"] in ("onednn", "blas") and saved[key]["blas_ms"] > 0 < saved[key]["onednn_ms"]
    # A new process (an empty _routes) reads the file: make it say oneDNN for both, and count.
    for key in keys:
        saved[key]["route"] = "onednn"
    (home / "kernels.json").write_text(json.dumps(saved))
    monkeypatch.setattr(fused, "_routes", {})
    calls = []
    real = fused._onednn
    monkeypatch.setattr(fused, "_onednn", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fused, "_time_both", None)  # nothing is timed again
    fused.linear(x, w).sum().backward()
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_new_model_trains_through_it(arch, monkeypatch):
    """Every Linear of a model built for training (``new_model``) takes fused.linear, the up
    projection's bias-less product (GPT-2's fused activation) included, and a step through oneDNN
    gives the loss and gradients of one through the BLAS."""
    # every product at least SMALL_PRODUCT multiply-adds
    tc = TrainConfig(arch=arch, n_layers=2, d_model=128, n_heads=4, block_size=64, batch_size=8)
    torch.manual_seed(0)
    model = new_model(model_config(tc, 96), torch.device("cpu"))
    ids = torch.randint(0, 96, (8, 65), generator=torch.Generator().manual_seed(4))
    seen = []
    real = fused._Linear.apply
    monkeypatch.setattr(fused._Linear, "apply", lambda *a: seen.append(tuple(a[1].shape)) or real(*a))

    def step(route):
        monkeypatch.setattr(fused, "route", route)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step((True, True))
    # per block qkv, o, up, down; then the head
    assert len(seen) == 4 * tc.n_layers + 1, seen
    want_loss, want_grads = step((False, False))
    _close(loss, want_loss)
    for name in grads:
        _close(grads[name], want_grads[name])
