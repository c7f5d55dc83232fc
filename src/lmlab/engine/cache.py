"""The KV cache: preallocated once per generation, written in place at ``length``."""

from __future__ import annotations

import torch

from lmlab.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch, shape (L, B, K, max_len, D) each.

    The model calls ``update(layer, k, v)`` once per layer with the new tokens' keys and
    values (B, K, T, D) and gets back views of everything cached so far (B, K, S, D); after
    the last layer it calls ``advance(T)``. Nothing is reallocated while generating.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} slots")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences stop costing compute)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache (both k and v, all slots)."""
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_used(self) -> int:
        """Bytes holding tokens so far."""
        return self.nbytes * self.length // self.max_len


def kv_dtype(model_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype the cache holds: the model's, but float32 for a half-precision model on the CPU.

    There the model attends in float32 (``Attention.forward``): the CPU's bf16 attention kernels
    are 3-6x slower than float32 ones at decode sizes (114 vs 18 us per layer for 9 heads over
    180 keys on a 2-core AVX512-BF16 EPYC), and the cache is a small part of what a step reads.
    """
    if torch.device(device).type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return model_dtype


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes the cache grows by per token: 2 (k, v) x layers x kv heads x head_dim x dtype size."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size() * batch
