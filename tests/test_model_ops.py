"""The fast routes (lmlab.kernels, lmlab.native) compute the same thing as the plain formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.kernels import linear
from lmlab.model import Norm, apply_rope, rope_cos_sin, rope_inv_freq


@pytest.mark.parametrize("rows", [1, 3, 8, 64, 65, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16_routes_equal_the_matmul(rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(1, rows, 96).to(torch.bfloat16)
    got = linear(x, layer)
    assert got.shape == (1, rows, 160) and got.dtype == torch.bfloat16 and got.is_contiguous()
    want = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    # both accumulate in float32; they differ by the final bf16 rounding (and of the bias add)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_linear_fp32_is_exactly_f_linear():
    layer = nn.Linear(32, 48)
    x = torch.randn(2, 5, 32)
    assert torch.equal(linear(x, layer), F.linear(x, layer.weight, layer.bias))


def test_rope_equals_the_rotate_half_formula():
    torch.manual_seed(0)
    D = 16
    x = torch.randn(2, 3, 7, D)
    pos = torch.arange(7).expand(2, 7)
    cos, sin = rope_cos_sin(rope_inv_freq(D, 10000.0, None), pos, torch.float32)
    freqs = pos[:, :, None].float() * rope_inv_freq(D, 10000.0, None)[None, None]
    emb = torch.cat([freqs, freqs], -1)[:, None]
    rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    torch.testing.assert_close(apply_rope(x, cos, sin), x * emb.cos() + rotated * emb.sin())
    # partial rotary: the features past rotary_dim pass through unchanged
    cos8, sin8 = rope_cos_sin(rope_inv_freq(8, 10000.0, None), pos, torch.float32)
    out = apply_rope(x, cos8, sin8)
    assert torch.equal(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8], apply_rope(x[..., :8].contiguous(), cos8, sin8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_equals_the_formula_in_float32(dtype, offset):
    torch.manual_seed(0)
    norm = Norm(64, "rmsnorm", 1e-6, offset)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    x = torch.randn(3, 5, 64).to(dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = (normed * (offset + norm.weight.float())).to(dtype) if offset else norm.weight * normed.to(dtype)
    torch.testing.assert_close(
        norm(x), want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2
    )


# ----------------------------------------------------------------------------- prepacked weights

from lmlab import kernels  # noqa: E402

needs_onednn = pytest.mark.skipif(
    not kernels.prepack_supported(torch.float32, "cpu"), reason="no oneDNN in this torch build"
)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_prepacked_linear_equals_f_linear(dtype, rows):
    if not kernels.prepack_supported(dtype, "cpu"):
        pytest.skip(f"oneDNN has no fast {dtype} here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160), nn.Linear(160, 96, bias=False)).to(dtype)
    assert kernels.prepack(model) == (96 * 160 + 160 * 96) * model[0].weight.element_size()
    x = torch.randn(2, rows, 96).to(dtype)
    with torch.inference_mode():
        got = linear(x, model[0])
        assert kernels.packed_linear(x, model[0]) is not None  # the packed route was taken
    want = F.linear(x.float(), model[0].weight.float(), model[0].bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (2, rows, 160) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@needs_onednn
def test_prepacked_weight_follows_in_place_edits_and_replacement():
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    kernels.prepack(layer)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        before = linear(x, layer)
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place edit moves the version counter
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, layer), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(linear(x, layer), before)
    layer.weight = nn.Parameter(torch.zeros(48, 32))  # a replaced parameter
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, layer), layer.bias.expand(4, 48))


@needs_onednn
def test_prepacked_layer_still_trains():
    layer = nn.Linear(16, 8)
    kernels.prepack(layer)
    x = torch.randn(3, 16)
    assert kernels.fast_linear(x, layer) is None  # autograd needs the plain route
    linear(x, layer).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_prepack_can_be_turned_off(tiny, monkeypatch):
    import lmlab

    lm = tiny("llama")
    folder = lm.resolved.path
    assert lmlab.load(folder, prepack=False).packed_bytes == 0
    monkeypatch.setenv("LMLAB_PREPACK", "0")
    off = lmlab.load(folder)
    assert off.packed_bytes == 0 and all("packed" not in m.__dict__ for m in off.model.modules())
    monkeypatch.delenv("LMLAB_PREPACK")
    monkeypatch.setattr(kernels, "prepack_pays", lambda dtype: False)  # this machine measured no gain
    assert lmlab.load(folder).packed_bytes == 0
    monkeypatch.setattr(kernels, "prepack_pays", lambda dtype: True)
    if kernels.prepack_supported(torch.float32, "cpu"):
        on = lmlab.load(folder)
        assert on.packed_bytes == sum(m.weight.numel() * 4 for m in on.model.modules() if isinstance(m, nn.Linear))
        ids = torch.tensor([[1, 5, 9, 33]])
        torch.testing.assert_close(on(ids), off(ids), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_whether_prepacking_pays_is_measured_once_per_machine(home, monkeypatch):
    plain, packed = kernels._time_routes(torch.float32)  # the real measurement: seconds, both routes
    assert 0 < plain < 5 and 0 < packed < 5
    calls = []
    monkeypatch.setattr(kernels, "_time_routes", lambda dtype: calls.append(dtype) or (1.0, 0.8))
    assert kernels.prepack_pays(torch.float32) is True  # 1.25x faster: worth a second copy
    assert kernels.prepack_pays(torch.float32) is True and calls == [torch.float32]  # cached
    assert (home / kernels.PAYS_FILE).is_file()
    monkeypatch.setattr(kernels, "_time_routes", lambda dtype: (1.0, 0.95))
    assert kernels.prepack_pays(torch.bfloat16) is False  # 5% is not worth it


# ----------------------------------------------------------------------------- the native kernel

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lmlab import native  # noqa: E402


def _cpu_has_vectors() -> bool:
    import platform

    if platform.machine() in ("arm64", "aarch64"):
        return True  # NEON
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags or " avx512f" in flags


def test_native_kernel_is_built_where_it_can_be():
    import shutil

    if not (_cpu_has_vectors() and (shutil.which("cc") or shutil.which("gcc"))):
        pytest.skip("no AVX2/AVX-512/NEON or no C compiler: lmlab runs without the native kernel here")
    assert native.available(), native.status()
    assert native.status().startswith("on")


needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel {native.status()}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(1, 1), (15, 17), (16, 16), (33, 31), (576, 160), (100, 1000)])
def test_native_linear_equals_f_linear(dtype, rows, K, N):
    torch.manual_seed(K * N + rows)
    x, w, b = torch.randn(rows, K).to(dtype), torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
    for bias in (None, b):
        got = native.linear(x, w, bias)
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert got.shape == (rows, N) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * K**0.5)
        else:  # fp32 sums, rounded to bf16 once: within one bf16 step of the exact result
            torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-4 * K**0.5)


@needs_native
def test_native_linear_declines_what_it_does_not_cover():
    w = torch.randn(8, 16)
    assert native.linear(torch.randn(native.MAX_ROWS + 1, 16), w, None) is None  # more rows than MAX_ROWS
    assert native.linear(torch.randn(1, 16).half(), w.half(), None) is None  # fp16
    assert native.linear(torch.randn(1, 16), w.bfloat16(), None) is None  # mixed dtypes
    assert native.linear(torch.randn(16, 1).T, w, None) is not None  # a (1, 16) view is contiguous
    assert native.linear(torch.randn(1, 32)[:, ::2], w, None) is None  # strided
    assert native.linear(torch.randn(1, 16), w.T.contiguous().T, None) is None  # a transposed weight


@needs_native
def test_decoding_rows_take_the_native_route_and_see_edits(monkeypatch):
    from lmlab import kernels

    layer = nn.Linear(64, 48)
    calls = []
    real = native.linear
    monkeypatch.setattr(native, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.inference_mode():
        x1, x_many = torch.randn(1, 1, 64), torch.randn(1, native.MAX_ROWS + 1, 64)
        torch.testing.assert_close(linear(x1, layer), F.linear(x1, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        linear(x_many, layer)
    assert calls == [(1, 1, 64)]  # more rows went elsewhere
    with torch.no_grad():
        layer.weight.mul_(-1)  # read where it lies: an edit is seen at once
    with torch.inference_mode():
        torch.testing.assert_close(linear(x1, layer), F.linear(x1, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 64, requires_grad=True)
    frozen = nn.Linear(64, 48).requires_grad_(False)
    assert kernels.fast_linear(x, frozen) is None  # a gradient to the input needs autograd's route
    linear(x, frozen).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "env,why", [({"LMLAB_NATIVE": "0"}, "off (LMLAB_NATIVE=0)"), ({"CC": "false"}, "off: the build failed")]
)
def test_without_the_native_kernel_lmlab_still_computes(tmp_path, env, why):
    code = (
        "import torch, torch.nn.functional as F; from lmlab import native; from lmlab.kernels import linear\n"
        "layer = torch.nn.Linear(16, 8); x = torch.randn(1, 16)\n"
        "with torch.inference_mode(): assert torch.allclose(linear(x, layer), F.linear(x, layer.weight, layer.bias), "
        "atol=1e-6)\n"
        "print(native.status())"
    )
    import os

    full = {**os.environ, "LMLAB_HOME": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(why)
