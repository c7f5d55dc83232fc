"""The merge methods, one tensor at a time: what each does to the same-named tensor of every model.

The arithmetic follows mergekit's (so the same inputs give the same merged model, tested):

- **linear**: sum_i w_i * x_i, divided by sum_i w_i when ``normalize`` (the default).
- **slerp**: interpolate along the great circle between two tensors. The tensors are normalised
  only to find the angle between them; the result mixes the raw tensors. When they are nearly
  parallel (|cos| > 0.9995) the angle is unreliable and it falls back to linear interpolation.
- **task arithmetic family** (task_arithmetic, ties, dare_ties, dare_linear): each model's task
  vector is ``delta_i = x_i - base``.
  1. sparsify each delta: TIES keeps its ``density`` fraction of largest magnitudes; DARE keeps
     each entry with probability ``density`` (drops with 1 - density). With ``rescale`` the kept
     entries are scaled so the delta's L1 norm is what it was.
  2. weight: ``delta_i *= w_i``.
  3. TIES sign election (ties, dare_ties): per entry the sign of sum_i w_i delta_i wins, and only
     the deltas with that sign are kept.
  4. sum the (kept) deltas; with ``normalize`` divide by the sum of the weights that contributed
     (for TIES, per entry: only the agreeing ones).
  5. scale by ``lambda`` and add to the base.

Arithmetic runs in float32 (float64 when the inputs are float64), except the task-arithmetic
family, which like mergekit works in the inputs' own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLERP_DOT_THRESHOLD = 0.9995  # |cos angle| above this: the tensors are nearly parallel, lerp instead
NORM_EPS = 1e-8  # a tensor with a smaller L2 norm is treated as norm 1 when finding the angle
RESCALE_EPS = 1e-7  # an L1 norm below this is not rescaled (nothing meaningful to match)


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i (/ sum_i w_i when normalize); same shape and dtype as ``tensors[0]``."""
    dtype = _math_dtype(tensors[0])
    w = torch.tensor(weights, dtype=dtype)
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for x, wi in zip(tensors, w):
        out.addcmul_(x.to(dtype), wi)
    if normalize:
        out.div_(w.sum())
    return out.to(tensors[0].dtype)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), the whole tensor as one vector."""
    dtype = _math_dtype(a)
    x, y = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    if x.numel() == 0:
        return a.clone()
    tt = torch.tensor(t, dtype=dtype)
    na, nb = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    na = na if na > NORM_EPS else torch.ones((), dtype=dtype)
    nb = nb if nb > NORM_EPS else torch.ones((), dtype=dtype)
    cos = (torch.dot(x, y) / na / nb).clamp(-1, 1)  # one pass over memory; the norms only give the angle
    if cos.abs() > SLERP_DOT_THRESHOLD:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(cos)
        ca, cb = torch.sin((1 - tt) * theta) / torch.sin(theta), torch.sin(tt * theta) / torch.sin(theta)
    return (y * cb).add_(x * ca).to(a.dtype).reshape(a.shape)


# ----------------------------------------------------------------------------- task arithmetic


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def keep_largest(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trimming: keep the ``density`` fraction of entries with the largest |value| (at least one)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    # a full sort rather than topk: among equal magnitudes (common in bf16) it picks the same entries as mergekit
    top = torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[top] = 1
    return _rescaled(delta, mask.reshape(delta.shape), rescale)


def drop_random(delta: torch.Tensor, density: float, rescale: bool = True, generator=None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drop with 1 - density)."""
    if density >= 1:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32  # CPU bernoulli has no float16
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=work), generator=generator)
    return _rescaled(delta.to(work), mask, rescale).to(delta.dtype)


@dataclass(frozen=True)
class TaskArithmetic:
    """One member of the task-arithmetic family: how it sparsifies, whether it elects signs, its defaults."""

    sparsify: str | None  # None | "magnitude" (TIES) | "random" (DARE)
    sign_election: bool
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter


def task_arithmetic(
    base: torch.Tensor,
    others: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    how: TaskArithmetic,
    *,
    normalize: bool,
    rescale: bool,
    lam: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """base + lam * combine(w_i * sparsify(x_i - base)); see the module docstring for the steps."""
    if not others:
        return base
    deltas = torch.empty((len(others), *base.shape), dtype=base.dtype)
    for i, (x, density) in enumerate(zip(others, densities)):
        d = x - base
        if how.sparsify == "magnitude":
            d = keep_largest(d, density, rescale)
        elif how.sparsify == "random":
            d = drop_random(d, density, rescale, generator)
        deltas[i] = d
    w = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if how.sign_election:
        elected = torch.where(deltas.sum(dim=0) >= 0, 1, -1).to(deltas.dtype)
        agree = deltas.sign() == elected  # a zero (trimmed) entry agrees with neither sign
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


FAMILY = {
    "task_arithmetic": TaskArithmetic(None, False, normalize=False, rescale=False),
    "ties": TaskArithmetic("magnitude", True, normalize=True, rescale=False),
    "dare_ties": TaskArithmetic("random", True, normalize=False, rescale=True),
    "dare_linear": TaskArithmetic("random", False, normalize=False, rescale=True),
}
