"""ModelConfig: every family is the same Transformer with different data.

A family (gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma3) is nothing but a set of values
for the fields below. Adding a model means adding data, not a class. ``ALIASES`` holds the short
names a user can type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int  # the context length the model was trained for (tokens)
    head_dim: int = 0  # 0 -> d_model // n_heads

    # normalisation
    norm: str = "rmsnorm"  # "layernorm" (with bias) | "rmsnorm"
    norm_eps: float = 1e-5
    norm_weight_offset: float = 0.0  # gemma scales by (1 + w): offset 1.0
    sandwich_norm: bool = False  # gemma: extra norms after attention and after the MLP
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (qwen3, gemma3)

    # positions
    pos: str = "rope"  # "learned" (gpt2) | "rope"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # gemma3: a second base for sliding-window layers
    rotary_dim: int = 0  # 0 -> head_dim; pythia rotates only a fraction of each head
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF configs

    # attention
    qkv_bias: bool = False
    attn_out_bias: bool = False
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim); gemma3 uses query_pre_attn_scalar**-0.5
    sliding_window: int | None = None  # tokens a query may look back (itself included)
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None -> all full
    attn_logit_softcap: float | None = None

    # MLP
    mlp: str = "gated"  # "plain": down(act(up x)) | "gated": down(act(gate x) * up x)
    act: str = "silu"  # "silu" | "gelu" (exact) | "gelu_tanh"
    mlp_bias: bool = False

    # block wiring
    parallel_residual: bool = False  # pythia: x + attn(ln1 x) + mlp(ln2 x)

    # embeddings / head
    tie_embeddings: bool = False
    embed_scale: float | None = None  # gemma multiplies embeddings by sqrt(d_model)
    final_logit_softcap: float | None = None

    # special tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.d_model // self.n_heads
        if not self.rotary_dim:
            self.rotary_dim = self.head_dim
        if self.layer_types is None:
            kind = "sliding" if self.sliding_window else "full"
            self.layer_types = [kind] * self.n_layers
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def gqa_groups(self) -> int:
        """Query heads that share one k/v head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Alias:
    """A short name a user can type, and where its weights come from."""

    name: str
    hub_id: str
    family: str
    size: str  # parameter count, as people say it
    bundled: str | None = None  # "smollm2" | "gemma3": a pip package that ships a GGUF file
    instruct: bool = False


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("gpt2", "openai-community/gpt2", "gpt2", "124M"),
        Alias("gpt2-medium", "openai-community/gpt2-medium", "gpt2", "355M"),
        Alias("gpt2-large", "openai-community/gpt2-large", "gpt2", "774M"),
        Alias("gpt2-xl", "openai-community/gpt2-xl", "gpt2", "1.5B"),
        Alias("distilgpt2", "distilbert/distilgpt2", "gpt2", "82M"),
        Alias("pythia-70m", "EleutherAI/pythia-70m", "gpt_neox", "70M"),
        Alias("pythia-160m", "EleutherAI/pythia-160m", "gpt_neox", "160M"),
        Alias("pythia-410m", "EleutherAI/pythia-410m", "gpt_neox", "410M"),
        Alias("pythia-1b", "EleutherAI/pythia-1b", "gpt_neox", "1.0B"),
        Alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "135M", "smollm2", True),
        Alias("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "360M", instruct=True),
        Alias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "qwen2", "494M"),
        Alias("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", "596M", instruct=True),
        Alias("gemma3-270m", "google/gemma-3-270m", "gemma3", "268M", "gemma3"),
        Alias("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", "1.1B", instruct=True),
    ]
}
