"""The trained model as a HF model folder: config.json, model.safetensors, tokenizer files.

The key map is the inverse of ``lmlab.loading.hf.lmlab_tensors`` for the two shapes lmlab
trains: GPT-2 (Conv1D weights stored (in, out), so transposed) and Llama (q/k/v and gate/up
split back into their own tensors). Embeddings are tied, so only the input embedding is
written. ``lmlab.load`` and transformers read the folder with the same logits (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmlab.config import ModelConfig


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers (GPT2LMHeadModel or LlamaForCausalLM)."""
    special = {"bos_token_id": cfg.bos_token_id, "eos_token_id": (cfg.eos_token_ids or [None])[0]}
    if cfg.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}[cfg.act],
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            **special,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        **special,
    }


def hf_tensors(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor name -> tensor (float32, contiguous) for a trained gpt2- or llama-shaped Transformer."""
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = sd["tok_embed.weight"]
        out["transformer.wpe.weight"] = sd["pos_embed.weight"]
        for i in range(cfg.n_layers):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for theirs, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[p + theirs + ".weight"] = sd[q + ours + ".weight"]
                out[p + theirs + ".bias"] = sd[q + ours + ".bias"]
            for theirs, ours in (
                ("attn.c_attn", "attn.qkv"),
                ("attn.c_proj", "attn.o"),
                ("mlp.c_fc", "mlp.up"),
                ("mlp.c_proj", "mlp.down"),
            ):
                out[p + theirs + ".weight"] = sd[q + ours + ".weight"].t().contiguous()  # Conv1D: (in, out)
                out[p + theirs + ".bias"] = sd[q + ours + ".bias"]
        out["transformer.ln_f.weight"] = sd["final_norm.weight"]
        out["transformer.ln_f.bias"] = sd["final_norm.bias"]
        return out
    H, K, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    out["model.embed_tokens.weight"] = sd["tok_embed.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "mlp_norm.weight"]
        wq, wk, wv = sd[q + "attn.qkv.weight"].split([H * D, K * D, K * D])
        out[p + "self_attn.q_proj.weight"] = wq.contiguous()
        out[p + "self_attn.k_proj.weight"] = wk.contiguous()
        out[p + "self_attn.v_proj.weight"] = wv.contiguous()
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.o.weight"]
        gate, up = sd[q + "mlp.up.weight"].split([F, F])
        out[p + "mlp.gate_proj.weight"] = gate.contiguous()
        out[p + "mlp.up_proj.weight"] = up.contiguous()
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down.weight"]
    out["model.norm.weight"] = sd["final_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def save_hf_folder(model, cfg: ModelConfig, tokenizer, folder: Path, extra: dict | None = None) -> Path:
    """Write the trained model's HF folder (see ``write_folder``)."""
    return write_folder(folder, hf_tensors(model, cfg), hf_config(cfg), cfg, tokenizer, extra)


def write_folder(
    folder: Path, tensors: dict, config: dict, cfg: ModelConfig, tokenizer, extra: dict | None = None
) -> Path:
    """model.safetensors, config.json, generation_config.json and the tokenizer's files, each
    through a temporary name and a rename, so a reader never sees half a file. ``extra``: more
    JSON files to write (name -> dict)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    files = {"config.json": json.dumps(config, indent=2)}
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": (cfg.eos_token_ids or [None])[0]}
    files["generation_config.json"] = json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2)
    files.update(tokenizer.hf_files(cfg.max_seq_len))
    for name, value in (extra or {}).items():
        files[name] = json.dumps(value, indent=2)
    for name, text in files.items():
        t = folder / (name + ".tmp")
        t.write_text(text, encoding="utf-8")
        os.replace(t, folder / name)
    return folder
