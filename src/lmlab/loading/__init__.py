"""Load a model by name or path: ``lmlab.load("smollm2-135m")``."""

from __future__ import annotations

import time

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.loading.hf import build_model, config_from_hf, folder_source, lmlab_tensors, read_config_json
from lmlab.loading.resolve import Resolved, resolve

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise LmlabError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16.") from None


def parse_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device {device!r} was asked for but this machine has no CUDA GPU; use --device cpu.")
    return dev


def load(
    name_or_path,
    dtype="float32",
    device="cpu",
    *,
    overrides: dict | None = None,
    n_layers: int | None = None,
    prepack: bool | None = None,
):
    """Load a model and its tokenizer; returns an ``lmlab.LM``.

    overrides: ModelConfig fields to change at load time (e.g. rope_theta, max_seq_len).
    n_layers: keep only the first n blocks (the rest are never read into memory).
    prepack: on the CPU, keep a copy of the weights in oneDNN's layout for faster prefill
        matmuls (``lmlab.kernels``). None (the default) packs when that is at least 10% faster
        on this machine (measured once), the copy fits in free memory and ``LMLAB_PREPACK`` is
        not 0.
    """
    from lmlab.lm import LM

    t0 = time.perf_counter()
    dtype, device = parse_dtype(dtype), parse_device(device)
    res = resolve(name_or_path)
    if res.kind == "gguf":
        from lmlab.loading.gguf import GGUFSource

        source = GGUFSource(res.path)
        from lmlab.tokenizer import Tokenizer

        cfg = config_from_hf(source.hf_config())
        tokenizer = Tokenizer.from_gguf(source)
    elif res.kind == "nanogpt":
        from lmlab.loading.nanogpt import read_nanogpt

        cfg, source = read_nanogpt(res.path)
        tokenizer = _nanogpt_tokenizer(res)
    else:
        cfg = config_from_hf(read_config_json(res.path))
        source = folder_source(res.path)
        tokenizer = None
        if (res.path / "tokenizer.json").is_file():
            from lmlab.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_dir(res.path)
    cfg = _apply_overrides(cfg, overrides, n_layers)
    tensors = lmlab_tensors(cfg, source, dtype, transpose_conv1d=res.kind != "nanogpt")
    model = build_model(cfg, tensors, dtype, device)
    from lmlab import kernels

    kernels.speed_up(model)
    packed_bytes = _prepack(model, dtype, device, prepack)
    if device.type == "cpu":
        from lmlab import native

        native.available()  # build the native code now (once per machine, ~2 s): load time, not the first token's
    lm = LM(model, tokenizer, name=str(name_or_path), resolved=res, dtype=dtype, load_seconds=time.perf_counter() - t0)
    lm.packed_bytes = packed_bytes
    if res.kind == "gguf":
        lm.source_tensor_types = source.tensor_types()  # quant type of each tensor on disk
    return lm


def _prepack(model, dtype: torch.dtype, device: torch.device, prepack: bool | None) -> int:
    """Pack the weights for oneDNN where asked (or, by default, where it pays and fits)."""
    from lmlab import kernels

    if prepack is False or not kernels.prepack_supported(dtype, device):
        return 0
    if prepack is None:
        if not kernels.prepack_enabled_by_env():
            return 0
        import psutil

        if kernels.linear_weight_bytes(model) + (1 << 30) > psutil.virtual_memory().available:
            return 0  # a second copy would not fit with room to spare: keep the plain route
        if not kernels.prepack_pays(dtype):
            return 0  # not faster enough on this machine to be worth a second copy of the weights
    return kernels.prepack(model)


def _apply_overrides(cfg: ModelConfig, overrides: dict | None, n_layers: int | None) -> ModelConfig:
    changes = dict(overrides or {})
    if n_layers is not None:
        if not 1 <= n_layers <= cfg.n_layers:
            raise LmlabError(
                f"n_layers={n_layers} is out of range; this model has {cfg.n_layers} layers, keep 1..{cfg.n_layers}."
            )
        changes["n_layers"] = n_layers
        changes["layer_types"] = cfg.layer_types[:n_layers]
    unknown = [k for k in changes if not hasattr(cfg, k)]
    if unknown:
        raise LmlabError(f"unknown config field {unknown[0]!r}; `lmlab info MODEL` lists the fields.")
    return cfg.replace(**changes) if changes else cfg


def _nanogpt_tokenizer(res: Resolved):
    """nanoGPT models use GPT-2's BPE: take it from the gpt2 folder if it is cached."""
    from lmlab.tokenizer import Tokenizer

    try:
        return Tokenizer.from_hf_dir(resolve("gpt2").path)
    except LmlabError:
        return None


__all__ = ["load", "parse_dtype", "parse_device", "DTYPES", "Resolved"]
