"""Tiny random HF checkpoints, one per family, made inside the tests (no downloads).

Every parameter is randomised (biases and norm weights included, which HF initialises to
0 and 1), so a weight placed wrongly by the loader changes the logits.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

VOCAB = 160


def hf_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=128)
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **common,
        )
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **common,
        )
    if family == "llama3":  # llama with llama3 rope scaling, tied embeddings
        return tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            **common,
        )
    if family == "mistral":
        return tf.MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
            **common,
        )
    if family == "qwen2":
        return tf.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **common,
        )
    if family == "qwen3":
        return tf.Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            **common,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **common,
        )
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]


def make_tiny(family: str, folder, seed: int = 0, **config_overrides):
    """Build, randomise and save a tiny HF model; returns the transformers model (fp32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family)
    for k, v in config_overrides.items():
        setattr(cfg, k, v)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    # No EOS during parity generation: HF would stop (or, with min_new_tokens, ban EOS) and
    # the comparison would test the stopping rule rather than the model.
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return model


def char_vocab() -> list[str]:
    """VOCAB single characters: printable ASCII, then Greek and Cyrillic letters."""
    chars = (
        [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0x391, 0x3A9)] + [chr(c) for c in range(0x410, 0x450)]
    )
    return chars[:VOCAB]


def save_char_tokenizer(folder, bos: int | None = None) -> None:
    """A one-character-per-token tokenizer.json for a tiny model, so text-level features can be tested."""
    import json

    from tokenizers import Tokenizer, decoders, models

    vocab = {c: i for i, c in enumerate(char_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json") if hasattr(folder, "joinpath") else f"{folder}/tokenizer.json")
    cfg = {
        "add_bos_token": bos is not None,
        "bos_token": char_vocab()[bos] if bos is not None else None,
        "eos_token": None,
    }
    with open(f"{folder}/tokenizer_config.json", "w") as f:
        json.dump(cfg, f)


# ----------------------------------------------------------------------------- comparing greedy runs
#
# Two computations of the same logits (cached or recomputed, batched or alone, another kernel,
# another CPU: MKL, oneDNN and the native step round differently on Intel and on AMD) agree only
# to float rounding. Measured on these tiny models: at most 1e-5 apart in float32 (3e-6 between
# cached and uncached decoding, 9e-6 against transformers). bfloat16 logits sit on a grid with
# steps of 0.03 to 0.06 for logits of 4 to 16, so two paths that round differently land a step or
# two apart (7e-3 between cached and uncached log-probs of gemma3 here), and top logits often
# tie exactly.
# Where the top two logits of a step are closer than that, either token is a right greedy pick,
# and which one a path takes depends on the CPU; so greedy runs are compared token for token
# except at such a near-tie, where each path may take either of the tied tokens.
FP32_TIE = 1e-4  # float32: 10x the largest rounding difference measured
BF16_TIE = 0.125  # bfloat16: two bf16 steps for logits below 16 (these models' stay below 15)


def near_ties(alternatives, tol: float) -> list[set[int]]:
    """Per step, the ids within ``tol`` (in logit) of the top one, from a run's ``alternatives``
    (per step, ``(id, piece, prob)`` of its top k >= 2 tokens, as generate(alternatives=k) gives)."""
    import math

    out = []
    for alts in alternatives:
        assert len(alts) >= 2, "near_ties needs generate(..., alternatives=k) with k >= 2"
        top = math.log(alts[0][2])
        out.append({i for i, _, p in alts if p > 0 and top - math.log(p) <= tol})
    return out


def assert_same_greedy(want: list[int], got: list[int], ties: list[set[int]], what: str = "") -> bool:
    """Two greedy runs of one prompt by two computation paths pick the same tokens.

    ``ties[i]``: the ids of step i of ``want`` within the tolerance of its top logit (near_ties).
    Every step must match, except a step where ``want``'s top logits nearly tie: there ``got``
    may take another of the tied tokens, and as the runs then go on from different prefixes,
    nothing after it is compared. Returns True when the runs are equal (the caller may then
    compare what follows from the tokens: text, finish reason), False after such a tie.
    """
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            assert len(ties[i]) > 1 and {a, b} <= ties[i], (
                f"{what}: step {i} took {b} where the reference took {a}, and they do not nearly tie "
                f"(tokens within the tolerance of the top logit there: {sorted(ties[i])})"
            )
            return False
    assert len(want) == len(got), f"{what}: {len(want)} tokens against {len(got)}"
    return True
