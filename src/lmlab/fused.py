"""Training's fused steps: RMSNorm, the MLP's activation (with the up projection's bias) and RoPE
on q and k, forward and backward each in one pass over memory (``csrc/native.c``, "training's
elementwise steps"), and causal attention straight from the qkv projection's layout, RoPE turned
inside it ("training's causal attention": the unmasked half of the scores only, about twice
PyTorch's CPU kernel at 64-512 tokens). And ``linear``: each Linear product of a training step
through the fastest of the BLAS, oneDNN and lmlab's gradient kernel for its shape on this
machine (timed once, kept in kernels.json); ``kernels.FastLinear``, which
``train.loop.new_model`` and ``lmlab.load`` put in every Linear's place, calls it.

Autograd runs ``F.silu(gate) * up`` as four kernels forward and back (the SiLU, the product, their
gradients, and a concatenation of the gate's and up's gradients into the projection's output),
and RoPE on the q and k heads as a flip, two products and a sum each way, plus a concatenation
of the q, k and v gradients; ``model.RMSNormFunction`` takes two passes forward and five back.
Each of those walks the whole (tokens, features) tensor. Here the forward is one pass, and the
backward one pass that writes the input's gradient in place: SmolLM2's LoRA step (4 x 128
tokens, two threads) went from 1.44 to 1.24 s.

``model.py`` takes these in training (the module in train mode, autograd on, float32 on the
CPU, the native library built; ``linear`` needs oneDNN instead of the library); its PyTorch
lines are the reference everywhere else, and the tests hold the two to each other, values and
gradients. ``LMLAB_FUSED=0`` (or ``fused.on = False``) keeps training on the PyTorch lines, as
``benchmarks/train_vs_nanogpt.py``'s plain loop runs.
"""

from __future__ import annotations

import torch

from lmlab import native
from lmlab.host import best_alternating, cpu_model, env_flag, measured_once

ACTS = ("silu", "gelu_tanh")  # the activations the kernel computes (F.gelu's erf form is one fast kernel already)
on = env_flag("LMLAB_FUSED", True)


def applies(x: torch.Tensor) -> bool:
    """Whether a training forward over x takes the fused steps: float32 on the CPU, autograd
    recording, not inside torch.compile (which traces PyTorch's own operations), the library built."""
    return (
        on
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and native.serves()
    )


def _served(result, what: str):
    """The native call's result; None only where the library stopped serving between applies()
    and the call (torch's thread count changed under a build without OpenMP)."""
    if result is None:
        raise RuntimeError(f"lmlab's native library stopped serving {what}")
    return result


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, glu: bool, act: str, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            bias = bias.contiguous()
        out = _served(native.act_forward(h, glu, act, bias), "the fused activation")
        ctx.glu, ctx.act = glu, act
        ctx.save_for_backward(h, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, bias = ctx.saved_tensors
        dh, dbias = _served(native.act_backward(h, grad, ctx.glu, ctx.act, bias), "the fused activation's gradient")
        return dh, None, None, dbias


def activation(h: torch.Tensor, act: str, glu: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` for h = [gate | up] (..., 2F) when glu (model.MLP's gated form), else
    ``act(h)``; act is one of ``ACTS``. bias: the up projection's, added to h first: the projection
    then runs as a plain matmul, without the pass that writes its bias into every output row, and
    the bias's gradient is summed in the backward's one pass."""
    return _Activation.apply(h, glu, act, bias)


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int]):
        out = _served(native.rope_forward(qkv, cos, sin, heads[0] + heads[1]), "the fused RoPE")
        ctx.save_for_backward(cos, sin)
        return tuple(out.transpose(1, 2).split(heads, dim=1))

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dx = _served(native.rope_backward((gq, gk, gv), cos, sin), "the fused RoPE's gradient")
        return dx, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int]):
    """q, k, v ((B, H, T, D), (B, K, T, D), (B, K, T, D)) from a qkv projection (B, T, H + 2K, D),
    q and k turned by RoPE (``model.apply_rope``) with cos, sin (B or 1, 1, T, R) from
    ``model.rope_cos_sin``; heads = (H, K, K)."""
    return _RopeQKV.apply(qkv, cos, sin, tuple(heads))


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int, n_kv_heads: int, scale: float, cos, sin) -> torch.Tensor:
        qkv = qkv.contiguous()
        rope = None if cos is None else (cos, sin)
        y, lse = _served(native.attn_forward(qkv, n_heads, n_kv_heads, scale, rope), "the fused attention")
        ctx.save_for_backward(qkv, y, lse, cos, sin)
        ctx.heads, ctx.scale = (n_heads, n_kv_heads), scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, y, lse, cos, sin = ctx.saved_tensors
        rope = None if cos is None else (cos, sin)
        dx = native.attn_backward(qkv, y, lse, grad, *ctx.heads, ctx.scale, rope)
        return _served(dx, "the fused attention's gradient"), None, None, None, None, None


# The longest block the fused attention takes. It holds one head's (T, T) probabilities per
# thread; at 1024 tokens those leave the cache and PyTorch's kernel, which starts skipping masked
# key blocks there, is faster (2 x 1024 tokens, 8 heads of 64, forward and backward, two threads:
# 49 ms against 57; at 512 tokens 43 against 21).
ATTENTION_MAX_T = 512


def attention_fits(T: int, head_dim: int) -> bool:
    """Whether ``attention`` takes a block of T tokens with heads of head_dim features (a multiple
    of 16, at most 512: ATT_MAX_D in csrc/native.c)."""
    return T <= ATTENTION_MAX_T and head_dim % 16 == 0 and head_dim <= 512


def attention(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, scale: float, rope=None) -> torch.Tensor:
    """Causal attention (``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=...)``) straight from qkv (B, T, H + 2K, D): y (B, T, H, D), the output
    projection's layout. rope = (cos, sin) from ``model.rope_cos_sin``, or None: q and k are
    turned by it as the kernel reads them (``model.apply_rope``), so no pass writes a turned copy
    of qkv. The backward writes qkv's gradient in qkv's layout. Forward and backward each compute
    the unmasked half of the scores only (``csrc/native.c``)."""
    cos, sin = rope if rope is not None else (None, None)
    return _CausalAttention.apply(qkv, n_heads, n_kv_heads, scale, cos, sin)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()  # the q/k norms' heads are a view; the backward reads the same copy
        out, r = _served(native.rmsnorm_forward(x, w, eps), "the fused RMSNorm")
        ctx.save_for_backward(x, w, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, r = ctx.saved_tensors
        dx, dw = _served(
            native.rmsnorm_backward(x, w, r, grad, ctx.needs_input_grad[1]), "the fused RMSNorm's gradient"
        )
        return (dx if ctx.needs_input_grad[0] else None), dw, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``model.RMSNormFunction`` (x r w, r = rsqrt(mean(x^2) + eps)) in one pass each way; x, w float32."""
    return _RMSNorm.apply(x, w, eps)


# ----------------------------------------------------------------------------- training's matmuls
#
# A Linear layer costs three products in a training step: the forward x W^T + b, the input's
# gradient g W and the weight's g^T x (with the bias's, g's column sums). F.linear and autograd
# send all three to the BLAS (MKL), and the forward with a bias to addmm, which first copies the
# bias into every output row. Two other routes exist: oneDNN's matmul, which the inference path
# already uses on prepacked weights (lmlab.kernels), takes the plain weight too and adds the bias
# as it stores; and lmlab's own kernel (csrc/native.c, lmlab_gemm), which takes both gradients'
# layouts as they are and sums the bias's gradient while the block is in the cache. Which one is
# fastest depends on the CPU and the shape (MKL takes a generic path on AMD CPUs). On an AMD EPYC
# (Zen 4), two threads, 2048 x 384 rows times a 384 -> 1536 weight: the forward 150-160 GFLOP/s
# through addmm, 198-211 through oneDNN; the weight's gradient 180-190 through MKL, 205-210
# through lmlab's kernel. So each product is timed each way on its first use, on this machine,
# for its shape, and the fastest one is kept (kernels.json), so every later run decides the same
# way. oneDNN is not a route for the weight's gradient: it would take both operands transposed,
# and was 10-40% slower there.

ROUTES_FILE = "kernels.json"
SMALL_PRODUCT = 1 << 22  # multiply-adds below which F.linear is kept untimed: either way it is cheap
MARGIN = 0.97  # another route is taken only where it took under 97% of the BLAS's time
ROUNDS = 7  # timed rounds of each route: the best of 3 picked the BLAS for some 10M shapes in a busy minute
BLAS = ("blas", "blas", "blas")
route: tuple[str, str, str] | None = None  # (forward, input grad, weight grad) routes, forced (tests); None: measured
_routes: dict[tuple, tuple[str, str, str]] = {}  # this process's decisions: shape -> routes as `route`


def _onednn(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ w.T + bias through oneDNN; w may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


def routes_key(product: str, rows: int, k: int, n: int, bias: bool, ways=("blas", "onednn")) -> str:
    """kernels.json's key of one product's route: the machine, torch, threads, the shape with its
    row count rounded up to a power of two, the routes compared, and the native kernel's build."""
    return (
        f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"train {product} {_bucket(rows)} x {k} -> {n}{' + bias' if bias else ''}"
        + ("" if tuple(ways) == ("blas", "onednn") else f" | {' / '.join(ways)}")
        + (f" | {native.build()}" if "native" in ways else "")  # a changed kernel is timed again
    )


def _bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def _routes_of(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, str, str]:
    """The routes of x2 (M, K) @ w.T + bias, its input's gradient (M, N) @ w and its weight's
    (N, M) @ (M, K): "blas", "onednn" or "native". The first use of a shape on this machine times
    each route of each product: the forward on these tensors, the gradients on a random one."""
    if route is not None:
        return route
    shape = (_bucket(x2.shape[0]), *w.shape, bias is not None, torch.get_num_threads())
    found = _routes.get(shape)
    if found is None:
        M, (N, K) = x2.shape[0], w.shape
        g = torch.randn(M, N, dtype=w.dtype, generator=torch.Generator().manual_seed(0))  # not torch's own stream
        x = x2.contiguous()
        has_native = native.input_grad(g[:1], w) is not None  # the kernel is built and takes this width
        products = {
            ("forward", M, K, N, bias is not None): {
                "blas": lambda: torch.nn.functional.linear(x2, w, bias),
                "onednn": lambda: _onednn(x2, w, bias),
            },
            ("input grad", M, N, K, False): {
                "blas": lambda: torch.mm(g, w),
                "onednn": lambda: _onednn(g, w.t(), None),
                **({"native": lambda: native.input_grad(g, w)} if has_native else {}),
            },
            ("weight grad", M, N, K, bias is not None): {
                "blas": lambda: (torch.mm(g.t(), x), g.sum(0) if bias is not None else None),
                **({"native": lambda: native.weight_grad(g, x, bias is not None)} if has_native else {}),
            },
        }
        found = _routes[shape] = tuple(
            measured_once(ROUTES_FILE, routes_key(*key, ways=ways), lambda: _time_ways(ways))["route"]
            for key, ways in products.items()
        )
    return found


def _time_ways(ways: dict) -> dict:
    """The best of ROUNDS alternating rounds of each route, after one untimed call each (oneDNN builds
    its kernel on the first), and the one to take: the fastest, where it beats the BLAS by MARGIN."""
    with torch.no_grad():
        best = dict(zip(ways, best_alternating(list(ways.values()), ROUNDS)))
    pick = min(best, key=best.get)
    if best[pick] >= MARGIN * best["blas"]:
        pick = "blas"
    return {**{f"{name}_ms": round(t * 1e3, 4) for name, t in best.items()}, "route": pick}


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, routes: tuple[str, str, str]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        y = _onednn(x2, weight, bias) if routes[0] == "onednn" else torch.nn.functional.linear(x2, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.routes = bias is not None, routes
        # not a view (a view made inside a Function may not be changed in place, as LoRA does)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        _, dx_route, dw_route = ctx.routes
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = native.input_grad(g, weight) if dx_route == "native" else None  # None: g is not contiguous
            if dx is None:
                dx = _onednn(g, weight.t(), None) if dx_route == "onednn" else torch.mm(g, weight)
            dx = dx.view(x.shape)
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            got = native.weight_grad(g, x2, need_db) if dw_route == "native" else None
            if got is None:
                dw = torch.mm(g.t(), x2)
            else:
                dw, db = got
        if need_db and db is None:
            db = g.sum(0)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; in training (float32 on the CPU, autograd recording, no
    autocast, not compiling), each product through the fastest of the BLAS, oneDNN and lmlab's kernel
    for its shape on this machine (see above)."""
    if (
        on
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and (bias is None or bias.dtype == torch.float32)
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        and x.numel() * weight.shape[0] >= SMALL_PRODUCT
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
    ):
        routes = _routes_of(x.reshape(-1, x.shape[-1]), weight, bias)
        if routes != BLAS:  # else autograd's own F.linear: no Python in its backward
            return _Linear.apply(x, weight, bias, routes)
    return torch.nn.functional.linear(x, weight, bias)
