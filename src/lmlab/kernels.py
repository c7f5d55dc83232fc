"""Matmuls on the CPU: the native kernel for decoding, and weights prepacked for oneDNN.

``lmlab.load`` calls ``speed_up(model)``: every ``nn.Linear`` of the model becomes a
``FastLinear`` (the same module and parameters; only ``forward`` differs), whose ``linear``
picks the fastest route to ``x @ W.T + b``, and a half-precision model on the CPU attends in
float32. ``model.py`` itself stays the plain reference. A model built to train
(``train.loop.new_model``) gets the same FastLinear layers; under autograd their products go to
``fused.linear`` (the fastest of the BLAS, oneDNN and lmlab's gradient kernel for the shape,
timed once per machine).

``fast_linear`` is the route ``linear`` tries first. Up to four rows of input (a decoding
step run through model.py, e.g. with hooks) go to ``lmlab.native``, which streams the plain
row-major weight; a decoding step with no hook skips this module altogether and runs whole in
``lmlab.native.decode_step``. More rows (prefill, big batches) go to oneDNN on a prepacked weight:

``F.linear`` on the CPU hands a plain row-major weight to the BLAS on every call. For the few
rows of decoding that is far below what the memory allows, most of all on AMD CPUs, where the
BLAS takes a generic path. oneDNN reads a weight that was reordered once, ahead of time, into the
blocked layout its kernels stream; the product is the same x @ W.T + b.

SmolLM2-135M's 121 weight matmuls of one step, 2 threads (``benchmarks/linear_routes.py``):

    rows   dtype     AMD EPYC (Zen 4)        Xeon (Sapphire Rapids)
                     F.linear  prepacked     F.linear  prepacked  native
       1   float32     52 ms     28 ms        22.5 ms   29.2 ms   22.6 ms
       4   float32       -         -          42.5 ms   30.7 ms   26.8 ms
       8   float32     66 ms     27 ms        55.3 ms   35.0 ms   34.2 ms
     116   float32    230 ms    163 ms       127.7 ms  122.5 ms      -
       1   bfloat16    33 ms     20 ms        22.7 ms   17.0 ms   12.0 ms
       8   bfloat16    40 ms     16 ms        24.5 ms   17.0 ms   19.2 ms

The packed copy lives beside the parameter (the parameter stays what hooks, state_dict and
training see), so it costs a second copy of the weights in memory. So ``lmlab.load`` packs only
where it pays: ``prepack_pays`` times a prefill-sized matmul both ways once per machine, dtype
and thread count (cached in ``$LMLAB_HOME/kernels.json``) and packs when oneDNN is at least
10% faster (the EPYC above: yes; the Xeon: 4%, no). ``lmlab.load(..., prepack=True/False)`` or
``LMLAB_PREPACK=0`` decides instead. A weight changed in place (its version
counter moves) or replaced is packed again on its next use, so the copy is never stale.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from lmlab import fused, native
from lmlab.host import best_alternating, cpu_model, env_flag, give_back_freed_memory, huge_pages, measured_once

# oneDNN picks its blocked layout for an expected row count; these hints gave the fastest
# layout across 1, 8 and 116 rows in the measurements above.
ROW_HINT = {torch.float32: 8, torch.bfloat16: 1}


def prepack_supported(dtype: torch.dtype, device) -> bool:
    """Whether oneDNN can run prepacked matmuls for this dtype on this device."""
    if torch.device(device).type != "cpu" or dtype not in ROW_HINT:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # emulated bf16 would be slower than the BLAS path
    return True


def prepack_enabled_by_env() -> bool:
    return env_flag("LMLAB_PREPACK", True)


PAYS_FILE = "kernels.json"
PAYS_MIN_SPEEDUP = 1.10  # a second copy of the weights is worth at least this much faster prefill
PAYS_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K): one block of SmolLM2-135M
PAYS_ROWS = 128  # a prefill's rows


def prepack_pays(dtype: torch.dtype) -> bool:
    """Whether oneDNN on packed weights beats ``F.linear`` by PAYS_MIN_SPEEDUP on this machine.

    Measured once per CPU, torch version, dtype and thread count (~0.5 s), cached in
    ``$LMLAB_HOME/kernels.json``.
    """
    key = (  # "rounds alternating": entries timed one route after the other are measured again
        f"{cpu_model()} | {platform.machine()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {dtype} | rounds alternating"
    )

    def measure() -> dict:
        plain, packed = _time_routes(dtype)
        return {"f_linear_ms": plain * 1e3, "prepacked_ms": packed * 1e3, "speedup": plain / packed}

    return measured_once(PAYS_FILE, key, measure)["speedup"] >= PAYS_MIN_SPEEDUP


def _time_routes(dtype: torch.dtype) -> tuple[float, float]:
    """Seconds for PAYS_SHAPES' matmuls at PAYS_ROWS rows: (F.linear, prepacked), the best of 7
    rounds each, the two alternating: a busy moment then slows both, not one route (timed one
    after the other, a noisy second made F.linear look 2x slower at two threads than at one, and
    float32 weights were packed: a second copy of SmolLM2's 538 MB for a 10% that was not there)."""
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False) for n, k in PAYS_SHAPES]
    xs = [torch.randn(PAYS_ROWS, k, generator=g).to(dtype) for _, k in PAYS_SHAPES]
    packs = [PackedWeight(m.weight) for m in layers]
    routes = (
        lambda: [F.linear(x, m.weight) for x, m in zip(xs, layers)],
        lambda: [torch.ops.mkldnn._linear_pointwise(x, p.packed, None, "none", [], "") for x, p in zip(xs, packs)],
    )
    with torch.inference_mode():
        plain, packed = best_alternating(routes, 7)
    return plain, packed


class PackedWeight:
    """A Linear's weight in oneDNN's layout, valid while the parameter is unchanged."""

    __slots__ = ("source", "version", "packed")

    def __init__(self, weight: torch.Tensor):
        self.source = weight
        self.version = _version(weight)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROW_HINT[weight.dtype])

    def current(self, weight: torch.Tensor) -> bool:
        return weight is self.source and _version(weight) == self.version


def _version(t: torch.Tensor) -> int | None:
    """The in-place edit counter; tensors made under inference_mode have none (never edited outside it)."""
    return None if t.is_inference() else t._version


def fast_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor | None:
    """``x @ W.T + b`` through the fastest CPU route that applies, or None for ``F.linear``'s.

    Applies on the CPU, outside autograd, with the input in the weight's dtype. Up to
    ``native.MAX_ROWS`` rows take the native kernel (``lmlab.native``); more rows take the
    packed weight, where there is one.
    """
    w = layer.weight
    if x.dtype != w.dtype or x.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        return None
    if x.numel() <= native.MAX_ROWS * x.shape[-1]:
        y = native.linear(x, w, layer.bias)
        if y is not None:
            return y
    return packed_linear(x, layer)


def packed_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor | None:
    """``x @ W.T + b`` through the layer's packed weight, or None where it has none.

    The caller (``fast_linear``) has checked device, dtype and autograd. An out-of-date copy is
    packed again first.
    """
    p: PackedWeight | None = layer.__dict__.get("packed")
    if p is None:
        return None
    w = layer.weight
    if not p.current(w):
        p = layer.__dict__["packed"] = PackedWeight(w)
    return torch.ops.mkldnn._linear_pointwise(x, p.packed, layer.bias, "none", [], "")


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``, i.e. x @ W.T + b, through the fastest route that applies.

    On the CPU, outside autograd, ``fast_linear``: a few rows (up to four) go to lmlab's native
    mat-vec kernel, more rows to oneDNN on a prepacked weight. Without those, bf16 with few rows
    is a mat-vec W @ x (one row) or W @ x.T transposed back (up to 64 rows), which read the
    weights faster than the general bf16 matmul. Everything else is ``fused.linear``: in
    training, each product through the fastest of the BLAS, oneDNN and lmlab's gradient kernel
    for its shape; else F.linear.
    """
    y = fast_linear(x, layer)
    if y is not None:
        return y
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= 64:
        x2 = x.reshape(rows, x.shape[-1])
        y = torch.mv(layer.weight, x2[0])[None] if rows == 1 else (layer.weight @ x2.T).T.contiguous()
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], -1)
    return fused.linear(x, layer.weight, layer.bias)  # in training, the fastest route for the shape


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``linear``: same parameters, state_dict and hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


def speed_up(model: nn.Module) -> None:
    """Swap the fast routes into a loaded model: FastLinear for each nn.Linear, and float32
    attention for a half-precision model on the CPU.

    The CPU's half-precision attention kernels are 3-6x slower than float32 ones at decode sizes
    (``engine.cache.kv_dtype`` keeps the cache in float32 for the same reason).
    """
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear  # the module keeps its parameters; only forward changes
        elif hasattr(type(m), "compute_dtype"):  # model.Attention (model.py imports this module)
            w = m.qkv.weight
            half_on_cpu = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
            m.compute_dtype = torch.float32 if half_on_cpu else None


ALIGN = 64  # bytes: each tensor in a block starts on a cache line, as torch's own allocations do


def in_one_block(tensors: list, replace, trim_every: int) -> None:
    """Copy ``tensors`` into one new allocation, in their order, each on a cache line, asked to be
    transparent huge pages before anything touches it (``host.huge_pages``).

    Decoding streams its weights once per token; as loaded they are hundreds of tensors from the
    heap and from mmaps, on 4 KiB pages: a TLB miss and a prefetcher restart every 4 KiB. The random
    1.1B Llama's Q4_0 weights: 34.8 tok/s as loaded, 40.7 in one block on 4 KiB pages, 44.6 in one
    block on huge pages (2-core Xeon, one process).

    ``replace(old, new)`` puts each copy where its tensor was and drops every reference to the old
    memory; the list's entry is dropped here. So each tensor is freed before the next is copied,
    the heap's freed pages go back every ``trim_every`` bytes, and the peak grows by about one
    tensor, not by a second copy of the weights.
    """
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    if not sizes:
        return
    block = torch.empty(sum(sizes), dtype=torch.uint8)
    huge_pages(block)
    at, since_trim = 0, 0
    with torch.no_grad():
        for i, size in enumerate(sizes):
            old, tensors[i] = tensors[i], None
            n = old.numel() * old.element_size()
            replace(old, block[at : at + n].view(old.dtype).view(old.shape).copy_(old))
            del old
            at, since_trim = at + size, since_trim + size
            if since_trim >= trim_every:
                give_back_freed_memory()
                since_trim = 0
    give_back_freed_memory()


def weights_in_one_block(model: nn.Module) -> None:
    """Move the parameters a decoding step reads (every block's, then the final norm's and the
    head's) into one block on huge pages, in that order (``in_one_block``; a quantized load does
    the same for its matrices: ``quant.build._in_one_block``). SmolLM2-135M, 2 threads, same
    process: float32 49.0 -> 51.8 tok/s, bfloat16 94.5 -> 107.0. CPU only.
    """
    params, seen = [], set()
    for p in [p for b in model.blocks for p in b.parameters()] + [model.final_norm.weight, model.lm_head.weight]:
        if id(p) not in seen and p.device.type == "cpu":
            seen.add(id(p))
            params.append(p)
    in_one_block(params, lambda p, new: setattr(p, "data", new), trim_every=64 << 20)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear's weight in ``model``: what ``prepack`` adds."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def prepack(model: nn.Module) -> int:
    """Pack every Linear's weight of ``model`` (CPU, float32/bfloat16); returns the bytes added.

    A check on one layer guards against a oneDNN build that disagrees with ``F.linear``: then
    nothing is packed and the model keeps the plain route.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return 0
    w = linears[0].weight
    if not prepack_supported(w.dtype, w.device):
        return 0
    try:
        first = PackedWeight(w)
        x = torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, first.packed, None, "none", [], "")
            want = F.linear(x.float(), w.float())
        tol = 1e-3 if w.dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), want, atol=tol * (1 + want.abs().max().item()), rtol=0):
            return 0
    except RuntimeError:
        return 0
    for m in linears:
        m.__dict__["packed"] = first if m.weight is w else PackedWeight(m.weight)
    return linear_weight_bytes(model)


def unpack(model: nn.Module) -> None:
    """Drop every packed copy: matmuls go back to ``F.linear`` and the memory is freed."""
    for m in model.modules():
        m.__dict__.pop("packed", None)
