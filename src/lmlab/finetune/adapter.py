"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names each tensor by the HF module it adapts, under its wrapper's prefix:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r), float tensors. lmlab's parts map one to one onto those modules (``lora.layout``), so
saving renames (and, for GPT-NeoX's interleaved q/k/v, reorders B's rows), and loading does the
reverse, checking every shape against the base model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from lmlab.errors import LmlabError, write_failure
from lmlab.finetune.lora import LoRALinear, LoRASpec, layout, lora_modules, wrap

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_config(model, spec: LoRASpec, base_name: str | None) -> dict:
    """adapter_config.json for the adapters on ``model`` (PEFT's LoraConfig fields)."""
    lay = layout(model.cfg)
    mods = lora_modules(model)
    targets = sorted({p.hf.rpartition(".")[2] for m in mods.values() for p in m.parts})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": targets,
        "fan_in_fan_out": lay.fan_in_fan_out,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_tensors(model) -> dict[str, torch.Tensor]:
    """PEFT's key -> tensor (float32, contiguous) for every part of every LoRALinear of ``model``."""
    lay = layout(model.cfg)
    out = {}
    for name, m in lora_modules(model).items():
        layer = int(name.split(".")[1])
        for p in m.parts:
            key = f"{PREFIX}{lay.hf_layer.format(i=layer)}.{p.hf}"
            b = m.lora_B[p.short].detach().float()
            order = lay.hf_row_order.get(p.short)
            if order is not None:
                b = b[order]
            out[key + ".lora_A.weight"] = m.lora_A[p.short].detach().float().contiguous()
            out[key + ".lora_B.weight"] = b.contiguous()
    return out


def save_adapter(model, spec: LoRASpec, folder, base_name: str | None = None) -> Path:
    """Write the adapter as PEFT writes it. Each file goes through a temporary name and a rename:
    a full disk leaves the folder as it was, with no half-written file."""
    from safetensors.torch import save

    folder = Path(folder)
    if not lora_modules(model):
        raise LmlabError("this model has no LoRA adapter to save; fine-tune it with --lora first.")
    files = {
        WEIGHTS: save(peft_tensors(model), metadata={"format": "pt"}),
        CONFIG: json.dumps(peft_config(model, spec, base_name), indent=2).encode(),
    }
    write_files(folder, files)
    return folder


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write each file atomically (temporary name, fsync, rename); on an OSError remove the
    temporary files and say what happened in one sentence."""
    tmps = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            tmp = folder / (name + ".tmp")
            tmps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name in files:
            os.replace(folder / (name + ".tmp"), folder / name)
    except OSError as e:
        for t in tmps:
            try:
                t.unlink()
            except OSError:
                pass
        what = write_failure(e)
        raise LmlabError(
            f"could not write the adapter to {folder} ({what}); nothing half-written was left there: "
            "free space or choose another folder."
        ) from None


# ----------------------------------------------------------------------------- loading

_KEY = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def check_adapter_folder(folder) -> Path:
    """The adapter folder as an absolute path, or one sentence when it is not there (checked
    before a model loads, so a typo costs no load)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise LmlabError(
            f"adapter folder {folder} does not exist; pass the folder that --save-adapter (or PEFT's "
            "save_pretrained) wrote."
        )
    if not folder.is_dir():
        raise LmlabError(f"--adapter {folder} is a file; pass the adapter's folder (it holds {CONFIG}).")
    if not (folder / CONFIG).is_file():
        raise LmlabError(
            f"{folder} has no {CONFIG}; pass a LoRA adapter folder (as --save-adapter or PEFT's save_pretrained write)."
        )
    return folder.resolve()


def read_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT-format adapter folder."""
    from safetensors.torch import load_file

    folder = check_adapter_folder(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise LmlabError(
            f"{folder} has no {CONFIG}; pass a LoRA adapter folder (as --save-adapter or PEFT's save_pretrained write)."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{cfg_path} is not valid JSON ({e}); save the adapter again.") from None
    weights = folder / WEIGHTS
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
            raise LmlabError(f"{weights} could not be read ({e}); save the adapter again.") from None
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LmlabError(f"{folder} has no {WEIGHTS}; save the adapter again.")
    return config, tensors


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name it ends (regex-wise)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def apply_adapter(model, folder) -> LoRASpec:
    """Wrap ``model``'s Linears with the adapter in ``folder`` (lmlab's or PEFT's), unmerged.

    Every tensor must name a module lmlab can adapt, in a layer the model has, with the shapes
    the model's weights imply; otherwise one sentence names the first mismatch."""
    config, tensors = read_adapter(folder)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LmlabError(f"{folder} is a {config.get('peft_type')} adapter; lmlab applies LoRA adapters only.")
    if config.get("use_dora"):
        raise LmlabError(f"{folder} is a DoRA adapter; lmlab applies plain LoRA adapters only.")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise LmlabError(
            f"{folder} trains biases too (bias={config.get('bias')!r}); lmlab applies bias-free LoRA only."
        )
    cfg = model.cfg
    lay = layout(cfg)
    by_hf = {p.hf: p for p in lay.parts}
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        part = by_hf.get(m.group(2)) if m else None
        if part is None:
            raise LmlabError(
                f"{folder}: tensor {key!r} adapts a module lmlab cannot apply LoRA to in a {cfg.family} model "
                f"(it can: {', '.join(p.hf for p in lay.parts)}); use an adapter of those modules."
            )
        layer = int(m.group(1))
        if layer >= cfg.n_layers:
            raise LmlabError(
                f"{folder} was made for another base model: {key!r} is for layer {layer} but this model has "
                f"{cfg.n_layers} layers; load it on the base it was trained on."
            )
        found.setdefault((layer, part.short), {})[m.group(3)] = t
    if not found:
        raise LmlabError(f"{folder} holds no LoRA tensors; save the adapter again.")

    alpha, r_default = float(config.get("lora_alpha", 8)), int(config.get("r", 8))
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    parts_by_short = {p.short: p for p in lay.parts}
    rank = {p.short: i for i, p in enumerate(lay.parts)}
    by_module: dict[tuple[int, str], list] = {}
    for (layer, short), ab in sorted(found.items(), key=lambda kv: (kv[0][0], rank[kv[0][1]])):
        part = parts_by_short[short]
        hf_name = f"{lay.hf_layer.format(i=layer)}.{part.hf}"
        if set(ab) != {"A", "B"}:
            raise LmlabError(f"{folder}: {hf_name} has lora_{next(iter(ab))} but not its pair; save the adapter again.")
        base = model.get_submodule(f"blocks.{layer}.{part.module}")
        in_features = base.in_features
        rows = part.stop - part.start
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or tuple(a.shape) != (r, in_features) or b.dim() != 2 or tuple(b.shape) != (rows, r):
            raise LmlabError(
                f"{folder} was made for another base model: {hf_name} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but this model's {hf_name} needs ({r}, {in_features}) and ({rows}, {r}); "
                "load it on the base it was trained on."
            )
        a_alpha = float(_pattern_value(config.get("alpha_pattern"), hf_name, alpha))
        scale = a_alpha / (r**0.5) if rslora else a_alpha / r
        order = lay.hf_row_order.get(short)
        if order is not None:
            b = b[torch.argsort(order)]  # HF's row order back to lmlab's
        by_module.setdefault((layer, part.module), []).append((part, r, scale, a, b))
    for (layer, module), items in by_module.items():
        parts = [it[0] for it in items]
        wrapped: LoRALinear = wrap(
            model,
            layer,
            module,
            parts,
            {p.short: r for p, r, *_ in items},
            {p.short: s for p, _, s, *_ in items},
            dropout,
        )
        with torch.no_grad():
            for part, _, _, a, b in items:
                wrapped.lora_A[part.short].copy_(a.float())
                wrapped.lora_B[part.short].copy_(b.float())
    targets = sorted({p.hf.rpartition(".")[2] for items in by_module.values() for p, *_ in items})
    return LoRASpec(r=r_default, alpha=alpha, dropout=dropout, targets=tuple(targets), rslora=rslora)


def load_adapter(lm, folder) -> LoRASpec:
    """Apply the adapter in ``folder`` to a loaded LM, unmerged, and keep its decoding on model.py
    (the native decoding step reads the base weights directly and would skip the adapter)."""
    for p in lm.model.parameters():
        p.requires_grad_(False)
    spec = apply_adapter(lm.model, folder)
    lm.native_decode = False
    lm.adapter = str(folder)
    return spec
