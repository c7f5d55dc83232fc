"""The unembedding and the cross-entropy in one pass, a few rows at a time.

A language model's loss is ``cross_entropy(h @ W.T, targets)``. Written that way, autograd keeps
the whole (N, V) logits for the backward pass, and the softmax, its backward and the zeros of
the gradient each walk over them again: for SmolLM2 (V = 49,152) and 512 tokens, four passes
over 100 MB. ``linear_cross_entropy`` computes the same loss a chunk of rows at a time and, in
the same pass, the gradient it will need: for each chunk, the logits, their log-softmax, the
loss, then ``p - onehot`` (p the softmax) multiplied back into the chunk's gradient for ``h``
(and for ``W`` when it is trained). Only that (N, C) gradient is kept; the backward pass scales
it. The matmuls are the ones the backward pass would have done, moved forward; what goes is the
traffic over the logits and the memory for them.

Gemma 2's final soft-capping (``cap · tanh(z / cap)``) is folded in with its derivative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk: logits of about 32 MiB in float32, and never fewer than 128 rows. Each chunk
# reads the whole (V, C) weight twice, so fewer rows make the matmuls read-bound; more rows make
# the softmax walk logits that no longer stay in the cache. Measured on SmolLM2's head (508 rows,
# the loss and its gradient): two threads 214 ms at 170 rows a chunk, 250 at 341, 243 all at
# once, 300 unfused; one thread 437, 437, 453 and 538; 42 rows were 1.4x slower than unfused.
CHUNK_VALUES = 2**23
MIN_ROWS = 128


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, ignore_index):
        N, V = h.shape[0], weight.shape[0]
        rows = min(N, max(MIN_ROWS, CHUNK_VALUES // max(V, 1)))
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight
        if torch.is_autocast_enabled(h.device.type):  # cast once, not once per matmul per chunk
            w = weight.to(torch.get_autocast_dtype(h.device.type))
        for s in range(0, N, rows):
            hc, tc = h[s : s + rows], targets[s : s + rows]
            z = F.linear(hc.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).float()  # (n, V)
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            valid = tc != ignore_index
            safe = torch.where(valid, tc, 0)
            logp = torch.log_softmax(z, dim=-1)  # (n, V), one kernel
            del z
            total -= (logp.gather(1, safe[:, None])[:, 0] * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logp.exp_()  # the softmax, in place
            g[torch.arange(len(tc), device=g.device), safe] -= 1.0
            if not bool(valid.all()):
                g.mul_(valid[:, None])
            if softcap:
                g.mul_(1.0 - t * t)  # d(cap · tanh(x / cap)) / dx
            if need_h:
                if g.dtype == w.dtype == h.dtype:
                    torch.mm(g, w, out=grad_h[s : s + rows])  # straight into its rows
                else:
                    grad_h[s : s + rows] = (g.to(w.dtype) @ w).to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t(), hc.float())
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The summed cross-entropy of ``softcap(h @ weight.T + bias)`` against ``targets``: what
    ``F.cross_entropy(logits, targets, reduction="sum", ignore_index=...)`` gives, without keeping
    the logits. h: (N, C); weight: (V, C); targets: (N,) ids (``ignore_index`` where none).
    Returns a float32 scalar; gradients flow to h, weight and bias where they require them."""
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"h must be (N, C) and targets (N,), got {tuple(h.shape)} and {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(h, weight, bias, targets, softcap or None, ignore_index)
