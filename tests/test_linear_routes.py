"""fused.linear: training's Linear products through the BLAS, oneDNN or lmlab's own kernel
(csrc/native.c's lmlab_gemm), whichever this machine runs fastest for the shape, against F.linear.

Float32. Values and gradients within 1e-5 of the reference's largest value: each route adds the
same products in another order. The route of a shape is timed once and kept in kernels.json, so a
later process (a resumed run) takes the same one.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab import fused, native
from lmlab.train.config import TrainConfig, model_config
from lmlab.train.loop import new_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN")


def _close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    assert err <= rel * (1 + want.abs().max().item()), err


def _leaf(shape, g, grad=True):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


# (forward, input grad, weight grad) routes; the native ones where the kernel is built
NATIVE = native.serves()
ROUTES = [("onednn", "onednn", "blas"), ("onednn", "blas", "blas"), ("blas", "onednn", "blas")] + (
    [("onednn", "native", "native"), ("blas", "blas", "native"), ("blas", "native", "blas")] if NATIVE else []
)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "x_shape, bias, grads",
    [
        ((4, 300, 64), True, "xwb"),  # a block's (B, T, C) input, every gradient
        ((1000, 64), False, "xw"),  # no bias (Llama)
        ((3, 700, 32), True, "x"),  # a frozen weight (LoRA's base): the input's gradient only
        ((1000, 48), True, "wb"),  # an input without a gradient
        ((60, 20, 40), True, "xwb"),  # a width the native kernel does not take (not a multiple of 16)
        ((1000, 48), True, "b"),  # a frozen weight, a trainable bias
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
    monkeypatch.setattr(fused, "route", fused.BLAS)
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
    grads = ("blas", "onednn", "native") if NATIVE else ("blas", "onednn")
    keys = {
        fused.routes_key("forward", 1000, 64, 96, False): ("blas", "onednn"),
        fused.routes_key("input grad", 1000, 96, 64, False, grads): grads,
        fused.routes_key("weight grad", 1000, 96, 64, False, grads[::2]): grads[::2],
    }
    assert len(saved) == 3
    for key, ways in keys.items():
        assert key in saved and "1024 x" in key  # rows rounded up to a power of two
        assert saved[key]["route"] in ways and all(saved[key][f"{way}_ms"] > 0 for way in ways)
    # A new process (an empty _routes) reads the file: make it say oneDNN for the first two, and count.
    for key in list(keys)[:2]:
        saved[key]["route"] = "onednn"
    (home / "kernels.json").write_text(json.dumps(saved))
    monkeypatch.setattr(fused, "_routes", {})
    calls = []
    real = fused._onednn
    monkeypatch.setattr(fused, "_onednn", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fused, "_time_ways", None)  # nothing is timed again
    fused.linear(x, w).sum().backward()
    assert len(calls) == 2


def test_the_fastest_route_is_taken_where_it_beats_the_blas_by_the_margin(monkeypatch):
    times = {"blas": 1.0, "onednn": 0.98, "native": 0.9}
    monkeypatch.setattr(fused, "best_alternating", lambda fns, rounds: [f() for f in fns])
    ways = {name: (lambda t=t: t) for name, t in times.items()}
    assert fused._time_ways(ways)["route"] == "native"
    assert fused._time_ways({k: ways[k] for k in ("blas", "onednn")})["route"] == "blas"  # within the margin
    assert fused._time_ways(ways)["native_ms"] == 900.0


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

    want_loss, want_grads = step(fused.BLAS)
    for route in ROUTES:
        seen.clear()
        loss, grads = step(route)
        # per block qkv, o, up, down; then the head
        assert len(seen) == 4 * tc.n_layers + 1, seen
        _close(loss, want_loss)
        for name in grads:
            _close(grads[name], want_grads[name])


@pytest.mark.skipif(not NATIVE, reason="the native kernel is not built here")
@pytest.mark.parametrize("rows, k, n", [(2048, 64, 96), (37, 48, 29), (300, 32, 130), (5, 16, 1), (777, 400, 13)])
def test_the_native_kernel_gives_both_gradients(rows, k, n):
    """lmlab_gemm itself (no route falls back to the BLAS here): tails of rows, of output
    features, and a single column tile."""
    g = torch.Generator().manual_seed(5)
    x, w, gy = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (rows, n)))
    dw, db = native.weight_grad(gy, x, True)
    _close(dw, gy.t() @ x)
    _close(db, gy.sum(0))
    assert native.weight_grad(gy, x, False)[1] is None
    _close(native.input_grad(gy, w), gy @ w)
    assert native.input_grad(torch.randn(rows, n + 3)[:, :n], w) is None  # not contiguous: the caller's BLAS
    assert native.weight_grad(gy, torch.randn(rows, k + 8), True) is None  # width not a multiple of 16
