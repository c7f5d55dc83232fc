"""What a training run is: ``TrainConfig`` (every knob, as data), the presets, and the model it builds.

A preset is a set of TrainConfig values. ``--size 1M..50M`` picks a model of about that many
non-embedding parameters (12·L·C², the same for the gpt2 and llama shapes); ``nanogpt-baby``
is nanoGPT's README CPU config (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps,
lr 1e-3 to 1e-4, warmup 100, beta2 0.99, char-level). Values given on the command line or in
a ``--config FILE.toml`` replace the preset's.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError, suggest

ARCHS = ("gpt2", "llama")
# The longest block each architecture takes: GPT-2's learned position table has 1024 rows;
# the llama shape (RoPE) is held to the longest context of the models lmlab trains from scratch.
ARCH_MAX_BLOCK = {"gpt2": 1024, "llama": 8192}


@dataclass
class TrainConfig:
    # model
    arch: str = "gpt2"  # "gpt2" (LayerNorm, learned positions, GELU, biases) | "llama" (RMSNorm, RoPE, SwiGLU)
    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    block_size: int = 256  # tokens of context per training row
    # data
    data: str | None = None  # a text file or folder; None: the Python standard library's source
    tokenizer: str = "char"  # char | bytes | bpe:N | a model name or folder whose tokenizer to use
    # optimiser
    batch_size: int = 16  # rows per micro-step, over all processes together
    grad_accum: int = 1  # micro-steps per optimiser step
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100  # steps of linear warmup, then cosine decay to min_lr at `steps`
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only: not on norms, biases
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # running
    seed: int = 1337
    dtype: str = "auto"  # auto (bf16 autocast where the hardware has bf16 matmul) | float32 | bfloat16
    device: str = "cpu"
    compile: bool | None = None  # torch.compile the loss; None: on a GPU only (slower on the CPU here, README "Train")
    workers: int = 0  # CPU threads that each train a share of every batch's rows (lmlab.train.split); 0: auto, 1: off
    eval_every: int = 250  # steps between train/val loss estimates (and checkpoints unless save_every)
    eval_iters: int = 20  # batches per loss estimate
    log_every: int = 10  # steps between points of the recorded train-loss curve
    sample_every: int = 500  # steps between printed samples (0 = only at the end)
    sample_tokens: int = 200
    save_every: int = 0  # steps between checkpoints (0 = at every eval)
    out: str = "out"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimiser step, over all processes: batch x block x accumulation."""
        return self.batch_size * self.block_size * self.grad_accum

    def check(self) -> None:
        """Refuse values that cannot train, each with one sentence."""
        if self.arch not in ARCHS:
            raise LmlabError(f"unknown --arch {self.arch!r}; use one of {', '.join(ARCHS)}.")
        limit = ARCH_MAX_BLOCK[self.arch]
        if self.block_size > limit:
            raise LmlabError(
                f"--block-size {self.block_size} is above the {self.arch} architecture's limit of {limit} positions; "
                f"use --block-size {limit} or less" + (", or --arch llama." if self.arch == "gpt2" else ".")
            )
        positive = dict(
            block_size=self.block_size,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            steps=self.steps,
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            eval_iters=self.eval_iters,
            eval_every=self.eval_every,
        )
        for name, v in positive.items():
            if v <= 0:
                raise LmlabError(f"{name} must be a positive integer, got {v}; use e.g. --{name.replace('_', '-')} 1.")
        if self.d_model % self.n_heads:
            raise LmlabError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}; change one of them.")
        if self.workers < 0:
            raise LmlabError(f"--workers must be 0 (choose), 1 (one thread over all rows) or more, got {self.workers}.")
        if self.workers > 1 and self.batch_size % self.workers:
            raise LmlabError(
                f"--workers {self.workers} does not split --batch-size {self.batch_size} evenly; use a divisor of "
                f"{self.batch_size}, 1 for one thread over all rows, or 0 to choose."
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise LmlabError(f"unknown --dtype {self.dtype!r}; use auto, float32 or bfloat16.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise LmlabError(
                f"the learning rates must satisfy 0 <= min_lr <= lr, lr > 0; got lr {self.lr}, min_lr {self.min_lr}."
            )


# name -> (n_layers, d_model, n_heads, block_size, batch_size, lr): about 12·L·C² non-embedding parameters
SIZES = {
    "1M": (4, 128, 4, 128, 16, 2e-3),
    "5M": (6, 256, 4, 256, 16, 1e-3),
    "10M": (6, 384, 6, 256, 16, 1e-3),
    "25M": (8, 512, 8, 256, 16, 6e-4),
    "50M": (10, 640, 10, 512, 16, 6e-4),
}

PRESETS = {
    # nanoGPT README, "baby GPT" on a CPU: train.py config/train_shakespeare_char.py --device=cpu --compile=False
    # --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    # --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    "nanogpt-baby": dict(
        arch="gpt2",
        n_layers=4,
        d_model=128,
        n_heads=4,
        block_size=64,
        batch_size=12,
        steps=2000,
        lr=1e-3,
        min_lr=1e-4,
        warmup=100,
        beta2=0.99,
        weight_decay=0.1,
        eval_every=250,
        eval_iters=20,
        tokenizer="char",
    ),
}


def size_values(size: str) -> dict:
    key = size.upper()
    if key not in SIZES:
        raise LmlabError(f"unknown --size {size!r}; use one of {', '.join(SIZES)}.{suggest(key, SIZES)}")
    n_layers, d_model, n_heads, block, batch, lr = SIZES[key]
    return dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, block_size=block, batch_size=batch, lr=lr, min_lr=lr / 10
    )


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise LmlabError(f"unknown --preset {name!r}; use one of {', '.join(PRESETS)}.{suggest(name, PRESETS)}")
    return dict(PRESETS[name])


def toml_values(path: Path) -> dict:
    """TrainConfig fields from a TOML file (top level, or a [train] table); unknown keys are refused."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LmlabError(f"could not read --config {path} ({e.strerror}); pass an existing .toml file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"--config {path} is not valid TOML ({e}); fix the file.") from None
    data = data.get("train", data)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in data if k.replace("-", "_") not in names]
    if unknown:
        raise LmlabError(
            f"--config {path} has an unknown key {unknown[0]!r}.{suggest(unknown[0], names)} "
            "Use TrainConfig's field names."
        )
    values = {k.replace("-", "_"): v for k, v in data.items()}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        accepted, kind = _TOML_TYPES.get(types[key], ((object,), ""))
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise LmlabError(f"--config {path}: {key} must be {kind}, not {value!r}; fix the file.")
    return {k: float(v) if types[k] == "float" else v for k, v in values.items()}


# What a TOML value of each TrainConfig field's type may be (the annotations are strings here).
_TOML_TYPES = {
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "str | None": ((str,), "a string"),
    "bool | None": ((bool,), "true or false"),
}


def model_config(
    tc: TrainConfig, vocab_size: int, *, bos: int | None = None, eos: list[int] | None = None
) -> ModelConfig:
    """The ModelConfig of the model ``tc`` trains: GPT-2's or Llama's shape, embeddings tied."""
    C, L, H = tc.d_model, tc.n_layers, tc.n_heads
    special = dict(bos_token_id=bos, eos_token_ids=list(eos or []))
    if tc.arch == "gpt2":
        return ModelConfig(
            family="gpt2",
            vocab_size=vocab_size,
            d_model=C,
            n_layers=L,
            n_heads=H,
            n_kv_heads=H,
            d_ff=4 * C,
            max_seq_len=tc.block_size,
            norm="layernorm",
            norm_eps=1e-5,
            pos="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp="plain",
            act="gelu_tanh",
            mlp_bias=True,
            tie_embeddings=True,
            **special,
        )
    d_ff = 32 * round(8 * C / 3 / 32)  # SwiGLU: 3·C·F ≈ 8·C², GPT-2's MLP parameter count
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        d_model=C,
        n_layers=L,
        n_heads=H,
        n_kv_heads=H,
        d_ff=d_ff,
        max_seq_len=tc.block_size,
        norm="rmsnorm",
        norm_eps=1e-5,
        pos="rope",
        rope_theta=10000.0,
        mlp="gated",
        act="silu",
        tie_embeddings=True,
        **special,
    )
