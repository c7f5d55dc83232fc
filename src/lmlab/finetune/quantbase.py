"""LoRA over a quantized base (QLoRA-style): the base's matrices stay in their blocks, frozen.

A quantized Linear (``lmlab.quant.QuantLinear``) never trains, but the gradient must pass
through it to the adapters of the layers below. Left to itself, autograd would keep a whole
dequantized float copy of every matrix for the backward pass, which is the memory quantization
was there to save. ``QuantMatmul`` instead recomputes what it needs, one tile of W's rows at a
time, in both directions:

    forward   y = x @ W.T + b       tile by tile: y[:, r0:r1] = x @ W[r0:r1].T
    backward  dx = dy @ W           dx = sum over tiles of dy[:, r0:r1] @ W[r0:r1]

W[r0:r1] is dequantized to float32 by the quant package's own dequantizer, so the result is
what the dequantized float model computes (up to the order of float additions). Nothing of W
is saved between the two passes. W gets no gradient (it is frozen), so neither does b.

The adapter itself is float32 and learns against the quantized weights. It applies to the float
base as well (the shapes are the same); there it meets weights that differ from the ones it was
trained against by the quantization error: QLoRA's bargain, a cheap base to train on for an
adapter that is used anywhere.
"""

from __future__ import annotations

import torch

from lmlab.quant import QuantLinear, QuantWeight

# Values of W dequantized at a time (2 MB of float32, as the quant package's prefill does). Measured
# on SmolLM2 (5 LoRA steps of 8 short rows): larger tiles were no faster beyond the run-to-run noise,
# and the process grew more while training (+500 MiB with 8 MB tiles, +330 MiB with 2 MB ones).
TILE_VALUES = 1 << 19


def _tiles(qw: QuantWeight):
    """(r0, r1, W[r0:r1] as float32) over W's rows, TILE_VALUES values at a time."""
    N, K = qw.shape
    step = max(16, TILE_VALUES // max(K, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        yield r0, r1, qw.rows(r0, r1)


class QuantMatmul(torch.autograd.Function):
    """``x @ W.T + b`` for a quantized W, with dx = dy @ W computed tile by tile in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = qw.shape
        x2 = x.reshape(-1, K).float()  # (rows, K)
        y = torch.empty(x2.shape[0], N)
        for r0, r1, w in _tiles(qw):
            torch.matmul(x2, w.T, out=y[:, r0:r1])
        if bias is not None:
            y += bias.float()
        ctx.qw, ctx.x_shape, ctx.x_dtype = qw, x.shape, x.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qw = ctx.qw
        N, K = qw.shape
        dy2 = dy.reshape(-1, N).float()  # (rows, N)
        dx = torch.zeros(dy2.shape[0], K)
        for r0, r1, w in _tiles(qw):
            dx.addmm_(dy2[:, r0:r1], w)  # (rows, r1 - r0) @ (r1 - r0, K)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), None, None


class TrainableQuantLinear(QuantLinear):
    """A QuantLinear whose backward pass goes through ``QuantMatmul`` (no float copy of W kept).
    With no gradient to pass (inference, held-out losses, sampling) it is the QuantLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return QuantMatmul.apply(x, self.qweight, self.bias)
        return super().forward(x)


def make_trainable(model: torch.nn.Module) -> int:
    """Let gradients pass through every quantized Linear of ``model`` (the adapters' own Linears
    are float); returns how many there are. The modules stay QuantLinears (same buffers, same
    inference path); only their backward changes."""
    n = 0
    for m in model.modules():
        if type(m) is QuantLinear:
            m.__class__ = TrainableQuantLinear
            n += 1
    return n
