"""A fine-tuned or LoRA-merged model as a HF folder that transformers loads.

Every family lmlab loads from HF folders is written back: GPT-2 (as ``lmlab.train.export``
writes it), GPT-NeoX, Llama, Mistral, Qwen2, Qwen3 and Gemma 3. ``hf_config`` and
``hf_tensors`` are the inverses of ``lmlab.loading.hf.config_from_hf`` and ``lmlab_tensors``:
q/k/v and gate/up are split back into their own tensors, NeoX's q/k/v rows interleaved per
head again, Gemma's four norms named as Gemma names them. Before anything is written, the
config is read back through ``config_from_hf``; a model whose config would not come back the
same (a Llama with a sliding window, biases a family has no field for) is refused in one
sentence rather than written wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmlab.errors import LmlabError, write_failure

# Fields the HF config.json does not carry, and that do not change the logits.
_IGNORED = {"bos_token_id", "eos_token_ids", "pad_token_id", "max_seq_len"}
EXPORTABLE = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma3")
_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_ARCH = {
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


def _rope(theta: float, scaling: dict | None) -> dict:
    """transformers 5's rope_parameters for one attention kind."""
    rp = {"rope_type": "default", **{k: v for k, v in (scaling or {}).items() if k != "type"}}
    rp["rope_theta"] = float(theta)
    return rp


def _layer_types(cfg) -> list[str]:
    return ["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types]


def _scalar(x: float):
    """A float that came from an integer (Gemma's query_pre_attn_scalar) written as that integer."""
    r = round(x)
    return int(r) if abs(x - r) < 1e-6 * max(1.0, abs(x)) else x


def hf_config(cfg) -> dict:
    """config.json for transformers, for any family in EXPORTABLE."""
    if cfg.family == "gpt2":
        from lmlab.train.export import hf_config as gpt2_config

        return gpt2_config(cfg)
    if cfg.family not in _ARCH:
        raise LmlabError(f"lmlab cannot write a {cfg.family} model as a HF folder; use one of {', '.join(EXPORTABLE)}.")
    model_type, arch = _ARCH[cfg.family]
    eos = cfg.eos_token_ids or []
    d = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
        "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
    }
    if cfg.family == "gpt_neox":
        d.update(
            layer_norm_eps=cfg.norm_eps,
            hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[cfg.act],
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=cfg.qkv_bias,
            rope_parameters={
                **_rope(cfg.rope_theta, cfg.rope_scaling),
                "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
            },
        )
        return d
    d.update(
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope(cfg.rope_theta, cfg.rope_scaling),
    )
    if cfg.family in ("llama", "mistral"):
        d.update(hidden_act=_ACT[cfg.act], attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.family == "mistral":
            d["sliding_window"] = cfg.sliding_window
    elif cfg.family in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        d.update(hidden_act=_ACT[cfg.act], use_sliding_window=bool(window), sliding_window=window)
        d["layer_types"] = _layer_types(cfg)
        d["max_window_layers"] = cfg.layer_types.index("sliding") if "sliding" in cfg.layer_types else cfg.n_layers
        if cfg.family == "qwen3":
            d["attention_bias"] = cfg.qkv_bias
    else:  # gemma3
        d.update(
            hidden_activation=_ACT[cfg.act],
            query_pre_attn_scalar=_scalar(cfg.attn_scale**-2) if cfg.attn_scale else cfg.head_dim,
            sliding_window=cfg.sliding_window,
            layer_types=_layer_types(cfg),
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            attention_bias=cfg.qkv_bias,
            rope_parameters={
                "full_attention": _rope(cfg.rope_theta, cfg.rope_scaling),
                "sliding_attention": _rope(cfg.rope_local_theta or cfg.rope_theta, None),
            },
        )
    return d


def hf_tensors(model, cfg) -> dict[str, torch.Tensor]:
    """HF tensor name -> tensor (float32, contiguous): the inverse of ``loading.hf.lmlab_tensors``."""
    if cfg.family == "gpt2":
        from lmlab.train.export import hf_tensors as gpt2_tensors

        return gpt2_tensors(model, cfg)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    H, K, D, C, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff

    def put(theirs: str, ours: str, bias: bool = False) -> None:
        out[theirs + ".weight"] = sd[ours + ".weight"]
        if bias:
            out[theirs + ".bias"] = sd[ours + ".bias"]

    if cfg.family == "gpt_neox":
        out["gpt_neox.embed_in.weight"] = sd["tok_embed.weight"]
        for i in range(cfg.n_layers):
            p, q = f"gpt_neox.layers.{i}.", f"blocks.{i}."
            put(p + "input_layernorm", q + "attn_norm", bias=True)
            put(p + "post_attention_layernorm", q + "mlp_norm", bias=True)
            # lmlab groups [all q | all k | all v]; NeoX interleaves per head: (head, [q|k|v], D)
            w = sd[q + "attn.qkv.weight"].view(3, H, D, C).transpose(0, 1).reshape(3 * H * D, C)
            out[p + "attention.query_key_value.weight"] = w.contiguous()
            if cfg.qkv_bias:
                b = sd[q + "attn.qkv.bias"].view(3, H, D).transpose(0, 1).reshape(-1)
                out[p + "attention.query_key_value.bias"] = b.contiguous()
            put(p + "attention.dense", q + "attn.o", bias=cfg.attn_out_bias)
            put(p + "mlp.dense_h_to_4h", q + "mlp.up", bias=True)
            put(p + "mlp.dense_4h_to_h", q + "mlp.down", bias=True)
        put("gpt_neox.final_layer_norm", "final_norm", bias=True)
        if not cfg.tie_embeddings:
            out["embed_out.weight"] = sd["lm_head.weight"]
        return out

    gemma = cfg.family == "gemma3"
    out["model.embed_tokens.weight"] = sd["tok_embed.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        put(p + "input_layernorm", q + "attn_norm")
        if gemma:
            put(p + "post_attention_layernorm", q + "post_attn_norm")
            put(p + "pre_feedforward_layernorm", q + "mlp_norm")
            put(p + "post_feedforward_layernorm", q + "post_mlp_norm")
        else:
            put(p + "post_attention_layernorm", q + "mlp_norm")
        for x, t in zip("qkv", sd[q + "attn.qkv.weight"].split([H * D, K * D, K * D])):
            out[a + f"{x}_proj.weight"] = t.contiguous()
        if cfg.qkv_bias:
            for x, t in zip("qkv", sd[q + "attn.qkv.bias"].split([H * D, K * D, K * D])):
                out[a + f"{x}_proj.bias"] = t.contiguous()
        put(a + "o_proj", q + "attn.o", bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            put(a + "q_norm", q + "attn.q_norm")
            put(a + "k_norm", q + "attn.k_norm")
        m = p + "mlp."
        gate, up = sd[q + "mlp.up.weight"].split([F, F])
        out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate.contiguous(), up.contiguous()
        if cfg.mlp_bias:
            gate_b, up_b = sd[q + "mlp.up.bias"].split([F, F])
            out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = gate_b.contiguous(), up_b.contiguous()
        put(m + "down_proj", q + "mlp.down", bias=cfg.mlp_bias)
    put("model.norm", "final_norm")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_exportable(cfg) -> None:
    """Refuse, in one sentence, a model whose config the HF folder cannot hold exactly."""
    from lmlab.loading.hf import config_from_hf

    why = None
    if cfg.family not in EXPORTABLE:
        why = f"it is a {cfg.family} model"
    elif cfg.family == "qwen3" and cfg.qkv_bias != cfg.attn_out_bias:
        why = "its q/k/v have biases and its output projection none, which Qwen3's one attention_bias cannot say"
    else:
        back = config_from_hf(hf_config(cfg)).to_dict()
        diff = [k for k, v in cfg.to_dict().items() if k not in _IGNORED and not _same(v, back.get(k))]
        if diff:
            why = f"its {diff[0]} ({cfg.to_dict()[diff[0]]!r}) has no place in the folder lmlab writes"
    if why:
        raise LmlabError(
            f"lmlab writes merged HF folders for {', '.join(EXPORTABLE)} models whose config transformers can "
            f"hold, and {why}; keep the adapter unmerged and load it with lmlab.load(MODEL, adapter=DIR)."
        )


def _tokenizer_files(lm) -> tuple[object, dict]:
    """(a writer of tokenizer.json / tokenizer_config.json, the config with the chat template)."""
    from lmlab.train.tokenizing import TrainTokenizer

    tok = lm.tokenizer
    eos = tok.eos_ids[0] if tok.eos_ids else None
    writer = TrainTokenizer(tok.tokenizers_backend(), "model", lm.name, eos_id=eos, bos_id=tok.bos_id)
    cfg = json.loads(writer.hf_files(lm.config.max_seq_len)["tokenizer_config.json"])
    cfg["add_bos_token"] = bool(tok.add_bos)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return writer, cfg


def save_merged(lm, folder) -> Path:
    """Write ``lm``'s model (its weights as they are now: no adapter left on it) as a HF folder.
    A full disk leaves no half-written file behind."""
    from lmlab.finetune.lora import has_lora

    if has_lora(lm.model):
        raise LmlabError("the model still carries an unmerged adapter; merge it first (lmlab lora merge).")
    check_exportable(lm.config)
    if lm.tokenizer is None:
        raise LmlabError(f"{lm.name} has no tokenizer to write beside the weights; use a model folder with one.")
    folder = Path(folder)
    writer, tok_cfg = _tokenizer_files(lm)
    try:
        write_hf_folder(lm.model, lm.config, writer, folder, extra={"tokenizer_config.json": tok_cfg})
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


def write_hf_folder(model, cfg, tokenizer, folder: Path, extra: dict | None = None) -> Path:
    """The HF folder of ``model`` in its family's own names (``lmlab.train.export.write_folder``:
    every file through a temporary name and a rename)."""
    from lmlab.train.export import write_folder

    return write_folder(folder, hf_tensors(model, cfg), hf_config(cfg), cfg, tokenizer, extra)
