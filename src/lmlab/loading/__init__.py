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
    dtype=None,
    device="cpu",
    *,
    quant: str | None = None,
    overrides: dict | None = None,
    n_layers: int | None = None,
    prepack: bool | None = None,
    adapter=None,
):
    """Load a model and its tokenizer; returns an ``lmlab.LM``.

    dtype: the weights' and activations' dtype (float32 when not given). For a GGUF file, a dtype
        given explicitly dequantizes its weights into that dtype.
    quant: keep the weights quantized (``lmlab.quant``): "native" runs a GGUF file's own blocks
        (the default for a GGUF file on the CPU when no dtype is given and the native code is
        built); "q8" / "q4" quantize a float model at load, per block of 32 values; "none" never
        quantizes. Activations stay float32, so hooks see float tensors.

    overrides: ModelConfig fields to change at load time (e.g. rope_theta, max_seq_len).
    n_layers: keep only the first n blocks (the rest are never read into memory).
    prepack: on the CPU, keep a copy of the weights in oneDNN's layout for faster prefill
        matmuls (``lmlab.kernels``). None (the default) packs when that is at least 10% faster
        on this machine (measured once), the copy fits in free memory and ``LMLAB_PREPACK`` is
        not 0.
    adapter: a LoRA adapter folder (lmlab's ``--save-adapter`` or PEFT's ``save_pretrained``),
        applied unmerged (``lmlab.finetune.adapter``): hooks see its effect, and decoding runs
        through model.py, since the native step reads the base weights only.
    """
    from lmlab.lm import LM

    t0 = time.perf_counter()
    explicit_dtype = dtype is not None
    dtype, device = parse_dtype(dtype), parse_device(device)
    res = resolve(name_or_path)
    quant = _choose_quant(quant, res, explicit_dtype, dtype, device)
    if res.kind == "gguf":
        from lmlab.loading.gguf import GGUFSource

        source = GGUFSource(res.path)
        from lmlab.tokenizer import Tokenizer

        cfg = config_from_hf(source.hf_config())
        tokenizer = Tokenizer.from_gguf(source)
        source.release_arrays()  # the tokenizer holds what it needs; the weights come next
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
    if quant:
        from lmlab.quant.build import build, float_tensors_quantized, gguf_tensors

        if quant == "native":
            model = build(cfg, gguf_tensors(cfg, source))
        else:
            tensors = lmlab_tensors(cfg, source, torch.float32, transpose_conv1d=res.kind != "nanogpt")
            model = build(cfg, float_tensors_quantized(cfg, tensors, quant))
    else:
        tensors = lmlab_tensors(cfg, source, dtype, transpose_conv1d=res.kind != "nanogpt")
        model = build_model(cfg, tensors, dtype, device)
    from lmlab import kernels

    if not quant and device.type == "cpu":
        kernels.weights_in_one_block(model)

    kernels.speed_up(model)
    packed_bytes = 0 if quant else _prepack(model, dtype, device, prepack)
    if device.type == "cpu":
        from lmlab import native

        native.available()  # build the native code now (once per machine, ~2 s): load time, not the first token's
    lm = LM(model, tokenizer, name=str(name_or_path), resolved=res, dtype=dtype, load_seconds=time.perf_counter() - t0)
    lm.packed_bytes = packed_bytes
    lm.quant = quant or "none"
    if res.kind == "gguf":
        lm.source_tensor_types = source.tensor_types()  # quant type of each tensor on disk
    if adapter is not None:
        from lmlab.finetune.adapter import load_adapter

        load_adapter(lm, adapter)
    return lm


def _choose_quant(quant, res: Resolved, explicit_dtype: bool, dtype: torch.dtype, device: torch.device) -> str | None:
    """The quantization a load runs (None: float weights), or an LmlabError for a combination
    that cannot run."""
    from lmlab.quant import QUANTS

    name = str(res.path)
    if quant in (None, "", "auto"):
        if res.kind != "gguf" or explicit_dtype or device.type != "cpu":
            return None
        from lmlab import native
        from lmlab.host import env_flag

        if not env_flag("LMLAB_QUANT", True) or not native.available():
            return None  # no native kernels here: dequantize, as before
        return "native"
    quant = str(quant).lower()
    if quant == "none":
        return None
    if quant not in QUANTS:
        raise LmlabError(f"unknown quantization {quant!r}; use {', '.join(QUANTS)} or none.")
    if device.type != "cpu":
        raise LmlabError(f"quantized weights run on the CPU only; use --device cpu, or drop --quant {quant}.")
    if explicit_dtype and dtype != torch.float32:
        raise LmlabError(
            f"--quant {quant} computes in float32 between its quantized matmuls; drop --dtype "
            f"{str(dtype).removeprefix('torch.')} (or drop --quant to run that dtype)."
        )
    if quant == "native" and res.kind != "gguf":
        raise LmlabError(
            f"--quant native runs a GGUF file's own blocks, and {name} is not a GGUF file; "
            "use --quant q8 or q4 to quantize it at load."
        )
    if quant in ("q8", "q4") and res.kind == "gguf":
        raise LmlabError(
            f"{name} is already quantized (a GGUF file); run it as it is with --quant native, "
            f"or dequantize it with --dtype float32 before --quant {quant} would apply."
        )
    return quant


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
