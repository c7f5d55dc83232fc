"""Write a quantized model as a GGUF file (``lmlab quantize MODEL --to q4 -o OUT.gguf``).

The blocks written are exactly the ones lmlab ran: q8 as GGUF's Q8_0, q4 as Q4_1 (groups of 32,
float16 scales). Tensor names, metadata and the q/k row order follow llama.cpp's converter
(``convert_hf_to_gguf.py``) for the llama-layout families it shares with lmlab's loader (llama,
mistral, qwen2, qwen3): llama's q and k rows are interleaved into rotary pairs again, and the
tokenizer goes in as byte-level BPE (tokens and merges) where the model has one.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.quant import QuantLinear, QuantPart, to_gguf_blocks, untile_part

ARCH_OF_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FILE_TYPES = {"q8": 7, "q4": 3}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0, _MOSTLY_Q4_1


def _interleave_rotary(blocks: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate_half row order -> llama.cpp's interleaved pairs, per head (whole rows move)."""
    rows = blocks.shape[0]
    return blocks.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)


def write_gguf(lm, path, kind: str) -> int:
    """Write ``lm`` (loaded with ``quant=kind``) to ``path``; returns the bytes written."""
    import gguf

    cfg = lm.config
    arch = ARCH_OF_FAMILY.get(cfg.family)
    if arch is None:
        raise LmlabError(
            f"lmlab quantize writes {', '.join(sorted(ARCH_OF_FAMILY))} models to GGUF, not {cfg.family}; "
            f"run it quantized at load instead (--quant {kind})."
        )
    model = lm.model
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(lm.name))
    w.add_file_type(FILE_TYPES[kind])
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.sliding_window and arch == "llama":
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    _add_tokenizer(w, lm)

    def quant(name: str, part: QuantPart, permute_heads: int = 0):
        blocks, type_name = to_gguf_blocks(part)
        if permute_heads:
            blocks = _interleave_rotary(blocks, permute_heads)
        w.add_tensor(name, np.ascontiguousarray(blocks), raw_dtype=getattr(gguf.GGMLQuantizationType, type_name))

    def plain(name: str, t: torch.Tensor):
        w.add_tensor(name, t.detach().float().contiguous().numpy())

    def only_part(lin) -> QuantPart:
        if not isinstance(lin, QuantLinear) or len(lin.qweight.parts) != 1:
            raise LmlabError("lmlab quantize needs a model loaded with --quant q8 or q4; please report this as a bug.")
        return lin.qweight.parts[0]

    quant("token_embd.weight", model.tok_embed.qweight.parts[0])
    H, K, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    for i, blk in enumerate(model.blocks):
        p = f"blk.{i}."
        plain(p + "attn_norm.weight", blk.attn_norm.weight)
        qkv = only_part(blk.attn.qkv)
        llama = arch == "llama"
        quant(p + "attn_q.weight", untile_part(qkv, 0, H * D), H if llama else 0)
        quant(p + "attn_k.weight", untile_part(qkv, H * D, (H + K) * D), K if llama else 0)
        quant(p + "attn_v.weight", untile_part(qkv, (H + K) * D, (H + 2 * K) * D))
        if blk.attn.qkv.bias is not None:
            b = blk.attn.qkv.bias
            plain(p + "attn_q.bias", b[: H * D])
            plain(p + "attn_k.bias", b[H * D : (H + K) * D])
            plain(p + "attn_v.bias", b[(H + K) * D :])
        quant(p + "attn_output.weight", only_part(blk.attn.o))
        if cfg.qk_norm:
            plain(p + "attn_q_norm.weight", blk.attn.q_norm.weight)
            plain(p + "attn_k_norm.weight", blk.attn.k_norm.weight)
        plain(p + "ffn_norm.weight", blk.mlp_norm.weight)
        up = only_part(blk.mlp.up)
        quant(p + "ffn_gate.weight", untile_part(up, 0, F))
        quant(p + "ffn_up.weight", untile_part(up, F, 2 * F))
        quant(p + "ffn_down.weight", only_part(blk.mlp.down))
    plain("output_norm.weight", model.final_norm.weight)
    if not cfg.tie_embeddings:
        quant("output.weight", only_part(model.lm_head))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.stat().st_size if hasattr(path, "stat") else 0


def _add_tokenizer(w, lm) -> None:
    """Byte-level BPE (tokens, merges, specials) from the model's tokenizer; numbered placeholder
    tokens where it has none (the ids still run; text needs a tokenizer)."""
    tok = lm.tokenizer
    vocab = lm.config.vocab_size
    tokens, merges, types = None, [], None
    if tok is not None and tok.kind == "byte_level":
        data = json.loads(tok.backend.to_str())
        model = data.get("model", {})
        if model.get("type") == "BPE":
            by_id = {i: t for t, i in model["vocab"].items()}
            by_id.update({a["id"]: a["content"] for a in data.get("added_tokens", [])})
            tokens = [by_id.get(i, f"<unused{i}>") for i in range(vocab)]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
            types = [3 if i in special else 1 for i in range(vocab)]  # CONTROL, NORMAL
    if tokens is None:  # placeholders, with one merge so the file's BPE is complete ("a" + "b" -> "ab")
        tokens, types = ["a", "b", "ab"] + [f"<t{i}>" for i in range(3, vocab)], [1] * vocab
        merges = ["a b"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)  # lmlab and llama.cpp want the key even when empty
    if tok is not None:
        if tok.bos_id is not None:
            w.add_bos_token_id(tok.bos_id)
            w.add_add_bos_token(tok.add_bos)
        if tok.eos_ids:
            w.add_eos_token_id(tok.eos_ids[0])
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)


__all__ = ["write_gguf", "ARCH_OF_FAMILY"]
