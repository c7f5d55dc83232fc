"""linear_cross_entropy: the fused unembedding + cross-entropy equals the two written apart.

Float32, tolerances relative to the reference's largest value: 1e-5 for the loss, 1e-5 for the
gradients (the sums are the same, in a different order).
"""

import pytest
import torch
import torch.nn.functional as F

import lmlab.train.loss as loss_mod
from lmlab.train.loss import linear_cross_entropy


def _reference(h, W, b, t, cap):
    z = F.linear(h, W, b)
    if cap:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, t, reduction="sum", ignore_index=-100)


def _grads(fn, *tensors):
    for x in tensors:
        x.grad = None
    out = fn()
    (out * 0.5).backward()  # a grad_output other than 1 reaches every gradient
    return out.detach(), [None if x.grad is None else x.grad.clone() for x in tensors]


def _close(a, b, rel=1e-5):
    assert (a - b).abs().max().item() <= rel * (1 + b.abs().max().item())


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("rows", [4, 256])  # several chunks, and one
def test_equals_unfused_loss_and_gradients(monkeypatch, cap, rows):
    monkeypatch.setattr(loss_mod, "MIN_ROWS", rows)
    monkeypatch.setattr(loss_mod, "CHUNK_VALUES", 1)
    g = torch.Generator().manual_seed(0)
    N, C, V = 37, 24, 301
    h = torch.randn(N, C, generator=g, requires_grad=True)
    W = (0.3 * torch.randn(V, C, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(V, (N,), generator=g)
    t[::5] = -100  # positions without a target add nothing
    ref, ref_g = _grads(lambda: _reference(h, W, b, t, cap), h, W, b)
    got, got_g = _grads(lambda: linear_cross_entropy(h, W, t, b, cap), h, W, b)
    _close(got, ref)
    for a, r in zip(got_g, ref_g):
        _close(a, r)


def test_frozen_weight_gets_no_gradient_and_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    W = 0.2 * torch.randn(500, 32, generator=g)  # frozen, as a LoRA base's tied embedding
    t = torch.randint(500, (64,), generator=g)
    ref, (ref_h,) = _grads(lambda: _reference(h, W, None, t, None), h)
    got, (got_h,) = _grads(lambda: linear_cross_entropy(h, W, t), h)
    _close(got, ref)
    _close(got_h, ref_h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, (half_h,) = _grads(lambda: linear_cross_entropy(h, W, t), h)
    assert half.dtype == torch.float32 and half_h.dtype == torch.float32
    _close(half, ref, rel=2e-2)  # bf16 logits: about 3 significant digits
    _close(half_h, ref_h, rel=5e-2)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_finetune_masked_loss_equals_the_logits_path(tmp_path, family):
    """The fine-tuning loss through the fused head equals cross-entropy on the model's own logits,
    and so do the gradients of the trained (LoRA) parameters."""
    import lmlab
    from lmlab.finetune.lora import LoRASpec, add_lora
    from lmlab.finetune.run import masked_loss
    from tiny import make_tiny

    make_tiny(family, tmp_path / "m")
    model = lmlab.load(str(tmp_path / "m"), dtype="float32", prepack=False).model
    add_lora(model, LoRASpec(r=4, alpha=8, targets=("all",)))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # B is zero at init: make the adapter matter
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.cfg.vocab_size, (3, 12), generator=g)
    mask = torch.rand(3, 12, generator=g) > 0.3
    trained = [p for p in model.parameters() if p.requires_grad]

    got, n = masked_loss(model, ids, mask)
    got_g = torch.autograd.grad(got, trained)
    logits = model(ids[:, :-1])  # (B, T-1, V)
    keep = mask[:, 1:]
    ref = F.cross_entropy(logits[keep].float(), ids[:, 1:][keep], reduction="sum")
    ref_g = torch.autograd.grad(ref, trained)
    assert n == int(keep.sum())
    _close(got.detach(), ref.detach())
    for a, r in zip(got_g, ref_g):
        _close(a, r, rel=1e-4)


FAULTS_SCRIPT = """
import resource, torch
from lmlab.host import keep_freed_memory

def step():
    a = torch.ones(2**25)
    b = torch.ones(2**25) + a
    del a
    return float((b * 2)[0])

def faults():
    for _ in range(3):  # the heap grows to the step's size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults()
with keep_freed_memory():
    inside = faults()
print(inside, outside)
"""


def test_keep_freed_memory_reuses_large_blocks():
    """A step that allocates and frees 128 MiB tensors: inside keep_freed_memory its pages are
    reused (at most a stray block faults in once); outside, glibc maps fresh pages each time
    (~100,000 faults a step). glibc only. In a fresh interpreter: what glibc does outside depends on
    the heap that earlier tests in the same process left (a freed block in the middle of the heap
    is reused without faults)."""
    import subprocess
    import sys

    from lmlab.host import _glibc

    if _glibc() is None:
        pytest.skip("glibc's malloc only")
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    inside, outside = map(int, out.stdout.split())
    assert inside * 4 < outside, (inside, outside)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_function_equals_f_rms_norm(weight_grad):
    """model.RMSNormFunction (training's RMSNorm) against autograd through F.rms_norm: the output
    and the gradients of x and w within 1e-5 of the largest value; and gradcheck in float64."""
    from lmlab.model import RMSNormFunction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 96, generator=g, requires_grad=True)
    w = (torch.randn(96, generator=g) + 1).requires_grad_(weight_grad)
    dy = torch.randn(2, 7, 96, generator=g)
    want = F.rms_norm(x, (96,), w, 1e-6)
    got = RMSNormFunction.apply(x, w, 1e-6)
    _close(got, want)
    inputs = (x, w) if weight_grad else (x,)
    for a, b in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        _close(a, b)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_(weight_grad)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (xd, wd))
