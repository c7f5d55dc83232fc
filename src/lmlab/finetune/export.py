"""A fine-tuned or LoRA-merged model as a HF folder, written by ``lmlab.train.export``.

That writer knows the GPT-2 and Llama layouts (SmolLM2 is a Llama); a model whose config it
cannot express exactly (another family, RoPE scaling, biases) is refused in one sentence rather
than written wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import LmlabError, write_failure

# Fields the HF config.json of lmlab.train.export does not carry, and that do not change the logits.
_IGNORED = {"bos_token_id", "eos_token_ids", "pad_token_id", "max_seq_len"}


def check_exportable(cfg) -> None:
    from lmlab.loading.hf import config_from_hf
    from lmlab.train.export import hf_config

    why = None
    if cfg.family not in ("gpt2", "llama"):
        why = f"it is a {cfg.family} model"
    else:
        back = config_from_hf(hf_config(cfg)).to_dict()
        diff = [k for k, v in cfg.to_dict().items() if k not in _IGNORED and back.get(k) != v]
        if diff:
            why = f"its {diff[0]} ({cfg.to_dict()[diff[0]]!r}) has no place in the folder lmlab writes"
    if why:
        raise LmlabError(
            f"lmlab writes merged HF folders for GPT-2- and Llama-shaped models only, and {why}; "
            "keep the adapter unmerged and load it with lmlab.load(MODEL, adapter=DIR)."
        )


def _tokenizer_files(lm) -> tuple[object, dict]:
    """(a writer of tokenizer.json / tokenizer_config.json, the config with the chat template)."""
    from lmlab.train.tokenizing import TrainTokenizer

    tok = lm.tokenizer
    eos = tok.eos_ids[0] if tok.eos_ids else None
    writer = TrainTokenizer(tok.backend, "model", lm.name, eos_id=eos, bos_id=tok.bos_id)
    cfg = json.loads(writer.hf_files(lm.config.max_seq_len)["tokenizer_config.json"])
    cfg["add_bos_token"] = bool(tok.add_bos)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return writer, cfg


def save_merged(lm, folder) -> Path:
    """Write ``lm``'s model (its weights as they are now: no adapter left on it) as a HF folder.
    A full disk leaves no half-written file behind."""
    from lmlab.finetune.lora import has_lora
    from lmlab.train.export import save_hf_folder

    if has_lora(lm.model):
        raise LmlabError("the model still carries an unmerged adapter; merge it first (lmlab lora merge).")
    check_exportable(lm.config)
    if lm.tokenizer is None:
        raise LmlabError(f"{lm.name} has no tokenizer to write beside the weights; use a model folder with one.")
    folder = Path(folder)
    writer, tok_cfg = _tokenizer_files(lm)
    try:
        save_hf_folder(lm.model, lm.config, writer, folder, extra={"tokenizer_config.json": tok_cfg})
    except OSError as e:
        for t in folder.glob("*.tmp"):
            try:
                t.unlink()
            except OSError:
                pass
        what = write_failure(e)
        raise LmlabError(
            f"could not write the model to {folder} ({what}); no half-written file was left: free space or "
            "choose another folder."
        ) from None
    return folder


def merge_adapter(model_name: str, adapter, out, dtype: str = "float32") -> dict:
    """``lmlab lora merge``: load the base, apply the adapter, fold it in, write a HF folder."""
    from lmlab.finetune.adapter import load_adapter
    from lmlab.finetune.lora import merge_lora
    from lmlab.loading import load

    lm = load(model_name, dtype=dtype)
    check_exportable(lm.config)  # before any work
    load_adapter(lm, adapter)
    n = merge_lora(lm.model)
    lm.native_decode = True
    save_merged(lm, out)
    return {"model": model_name, "adapter": str(adapter), "out": str(out), "merged_modules": n}
