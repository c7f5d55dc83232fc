"""nanoGPT checkpoints (``ckpt.pt`` written by its train.py): GPT-2 architecture, nn.Linear layout."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


class _DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get(self, name, dtype=None):
        t = self.tensors[name]
        return t if dtype is None else t.to(dtype)


def read_nanogpt(path: Path) -> tuple[ModelConfig, _DictSource]:
    """The config and tensors of a nanoGPT ckpt.pt, read with weights_only=True (no arbitrary unpickling)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a bad file raises many kinds of errors
        raise LmlabError(
            f"{path} could not be read as a weights-only nanoGPT checkpoint ({type(e).__name__}); "
            "check the file or re-save it."
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise LmlabError(
            f"{path} is not a nanoGPT checkpoint (expected the keys 'model' and 'model_args'); "
            "pass a HF folder or .gguf file instead."
        )
    args = ckpt["model_args"]
    C = args["n_embd"]
    gpt2_vocab = args["vocab_size"] >= 50257  # GPT-2's BPE (50304 when padded); else a custom vocabulary
    cfg = ModelConfig(
        family="gpt2",
        vocab_size=args["vocab_size"],
        d_model=C,
        n_layers=args["n_layer"],
        n_heads=args["n_head"],
        n_kv_heads=args["n_head"],
        d_ff=4 * C,
        max_seq_len=args["block_size"],
        norm="layernorm",
        norm_eps=1e-5,
        pos="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp="plain",
        act="gelu",
        mlp_bias=True,
        tie_embeddings=True,
        bos_token_id=50256 if gpt2_vocab else None,
        eos_token_ids=[50256] if gpt2_vocab else [],
    )
    # torch.compile'd training saves keys as "_orig_mod.transformer..."; _Names strips the prefix.
    return cfg, _DictSource(ckpt["model"])
