"""HF transformers checkpoints: config.json -> ModelConfig, HF tensor names -> lmlab's.

Every family's import is an explicit key map (``lmlab_tensors``): for each lmlab parameter,
which HF tensors make it and how (transpose GPT-2's Conv1D, stack q/k/v, split NeoX's
interleaved query_key_value). Shapes are asserted, so a mismatch fails at load, loudly.

Weights are read with plain file reads (``SafetensorsSource``), one tensor at a time, straight
into the requested dtype: loading never holds two copies of the model.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from lmlab.config import FAMILIES, ModelConfig
from lmlab.errors import LmlabError

# ----------------------------------------------------------------------------- config.json

MODEL_TYPES = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}

ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LmlabError(
            f"{folder} has no config.json; "
            "point lmlab at a HF model folder (config.json + *.safetensors), a .gguf file or a nanoGPT ckpt.pt."
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{path} is not valid JSON ({e}); re-download the model.") from None


def _rope_params(d: dict, layer_type: str | None = None) -> dict:
    """The RoPE settings in either config style: old (rope_theta, rope_scaling) or new (rope_parameters)."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and layer_type and layer_type in rp:
        rp = rp[layer_type]
    if isinstance(rp, dict) and ("rope_theta" in rp or "rope_type" in rp):
        return rp
    out = dict(d.get("rope_scaling") or {})
    out.setdefault("rope_type", out.get("type", "default"))
    if "rope_theta" in d:
        out["rope_theta"] = d["rope_theta"]
    return out


def _scaling(rp: dict) -> dict | None:
    return None if rp.get("rope_type", "default") == "default" else rp


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def config_from_hf(d: dict) -> ModelConfig:
    """Translate a transformers config.json dict into a ModelConfig."""
    if "text_config" in d and d.get("model_type") == "gemma3":
        d = {**d["text_config"], "model_type": "gemma3_text"}
    mt = d.get("model_type")
    family = MODEL_TYPES.get(mt)
    if family is None:
        raise LmlabError(f"model type {mt!r} is not supported; lmlab runs these families: {', '.join(FAMILIES)}.")
    common = dict(
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_list(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )

    if family == "gpt2":
        C = d["n_embd"]
        return ModelConfig(
            family="gpt2",
            vocab_size=d["vocab_size"],
            d_model=C,
            n_layers=d["n_layer"],
            n_heads=d["n_head"],
            n_kv_heads=d["n_head"],
            d_ff=d.get("n_inner") or 4 * C,
            max_seq_len=d.get("n_positions", 1024),
            norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            pos="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp="plain",
            act=ACT_NAMES[d.get("activation_function", "gelu_new")],
            mlp_bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True),
            **common,
        )

    if family == "gpt_neox":
        H = d["num_attention_heads"]
        D = d["hidden_size"] // H
        rp = _rope_params(d)
        pct = d.get("rotary_pct", rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
        return ModelConfig(
            family="gpt_neox",
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=H,
            n_kv_heads=H,
            d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            norm="layernorm",
            norm_eps=d.get("layer_norm_eps", 1e-5),
            rope_theta=float(d.get("rotary_emb_base", rp.get("rope_theta", 10000.0))),
            rotary_dim=int(D * pct),
            rope_scaling=_scaling(rp),
            qkv_bias=d.get("attention_bias", True),
            attn_out_bias=d.get("attention_bias", True),
            mlp="plain",
            act=ACT_NAMES[d.get("hidden_act", "gelu")],
            mlp_bias=True,
            parallel_residual=d.get("use_parallel_residual", True),
            tie_embeddings=d.get("tie_word_embeddings", False),
            **common,
        )

    H = d["num_attention_heads"]
    base = dict(
        family=family,
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H,
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        head_dim=d.get("head_dim") or d["hidden_size"] // H,
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="gated",
        tie_embeddings=d.get("tie_word_embeddings", family == "gemma3"),
        **common,
    )
    rp = _rope_params(d, "full_attention")
    base.update(rope_theta=float(rp.get("rope_theta", 10000.0)), rope_scaling=_scaling(rp))
    act = ACT_NAMES[d.get("hidden_act") or d.get("hidden_activation") or "silu"]
    layer_types = d.get("layer_types")
    if layer_types:
        layer_types = ["sliding" if t == "sliding_attention" else "full" for t in layer_types]

    if family in ("llama", "mistral"):
        bias = d.get("attention_bias", False)
        window = d.get("sliding_window") if family == "mistral" else None
        return ModelConfig(
            **base,
            act=act,
            qkv_bias=bias,
            attn_out_bias=bias,
            mlp_bias=d.get("mlp_bias", False),
            sliding_window=window,
            layer_types=layer_types if window else None,
        )
    if family in ("qwen2", "qwen3"):
        window = d.get("sliding_window") if d.get("use_sliding_window") else None
        if window and not layer_types:
            first = d.get("max_window_layers", 0)
            layer_types = ["sliding" if i >= first else "full" for i in range(d["num_hidden_layers"])]
        return ModelConfig(
            **base,
            act=act,
            qkv_bias=family == "qwen2" or d.get("attention_bias", False),
            qk_norm=family == "qwen3",
            sliding_window=window,
            layer_types=layer_types if window else None,
        )
    # gemma3
    if not layer_types:
        pattern = d.get("sliding_window_pattern", 6)
        layer_types = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(d["num_hidden_layers"])]
    rp_all = d.get("rope_parameters")
    if isinstance(rp_all, dict) and isinstance(rp_all.get("sliding_attention"), dict):
        local_theta = rp_all["sliding_attention"].get("rope_theta", 10000.0)
    else:  # old-style config: local layers use plain RoPE with their own base
        local_theta = d.get("rope_local_base_freq", 10000.0)
    return ModelConfig(
        **base,
        act=act,
        norm_weight_offset=1.0,
        sandwich_norm=True,
        qk_norm=True,
        rope_local_theta=float(local_theta),
        attn_scale=d.get("query_pre_attn_scalar", base["head_dim"]) ** -0.5,
        sliding_window=d.get("sliding_window", 512),
        layer_types=layer_types,
        attn_logit_softcap=d.get("attn_logit_softcapping"),
        final_logit_softcap=d.get("final_logit_softcapping"),
        embed_scale=math.sqrt(d["hidden_size"]),
    )


# ----------------------------------------------------------------------------- tensor sources

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsSource:
    """Tensors of one or more .safetensors files, read on demand with plain file reads.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    data_offsets) and the raw data. Reading into a fresh tensor (rather than mmap) keeps the
    file's pages out of the process's resident memory.
    """

    def __init__(self, files: list[Path]):
        self.index: dict[str, tuple[Path, int, str, list[int], int]] = {}
        for f in files:
            self._read_header(Path(f))

    def _read_header(self, path: Path):
        size = path.stat().st_size
        bad = f"{path} is not a valid safetensors file"
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise LmlabError(f"{bad} (it is {size} bytes long); re-download it.")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise LmlabError(
                    f"{bad} (its header claims {n} bytes); the file is corrupt or truncated, re-download it."
                )
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LmlabError(f"{bad} (its header is not JSON); the file is corrupt, re-download it.") from None
        data_start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise LmlabError(
                    f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}; "
                    "re-download it."
                )
            if info["dtype"] not in _ST_DTYPES:
                raise LmlabError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}, which lmlab cannot read; "
                    "convert the model to F32/F16/BF16."
                )
            self.index[name] = (path, data_start + begin, info["dtype"], info["shape"], end - begin)

    def keys(self) -> list[str]:
        return list(self.index)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, offset, st_dtype, shape, nbytes = self.index[name]
        t = torch.empty(shape, dtype=_ST_DTYPES[st_dtype])
        with open(path, "rb") as fh:
            fh.seek(offset)
            got = fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else bytearray())
        if got != nbytes:
            raise LmlabError(f"{path} is truncated while reading {name!r}; re-download it.")
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


class TorchBinSource:
    """pytorch_model.bin, loaded with weights_only=True (never unpickles arbitrary objects)."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
                raise LmlabError(
                    f"{f} could not be read as a weights-only PyTorch checkpoint ({type(e).__name__}); "
                    "re-download it or use safetensors."
                ) from None
            self.tensors.update(sd)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if dtype is None else t.to(dtype)


def folder_source(folder: Path):
    """The tensor source for a HF model folder: sharded or single safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LmlabError(
                f"{folder} is missing shard {missing[0]} named in model.safetensors.index.json; re-download the model."
            )
        return SafetensorsSource([folder / s for s in shards])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return SafetensorsSource(files)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return TorchBinSource(bins)
    raise LmlabError(
        f"{folder} has no *.safetensors or pytorch_model.bin weights; download the model's weight files into it."
    )


# ----------------------------------------------------------------------------- key maps


class _Names:
    """Find HF tensors whatever prefix the checkpoint used (model., transformer., gpt_neox., none)."""

    PREFIXES = (
        "",
        "model.",
        "transformer.",
        "gpt_neox.",
        "model.language_model.",
        "language_model.model.",
        "_orig_mod.transformer.",
        "_orig_mod.",
    )

    def __init__(self, source):
        self.source = source
        self.keys = set(source.keys())

    def find(self, name: str) -> str | None:
        for p in self.PREFIXES:
            if p + name in self.keys:
                return p + name
        return None

    def has(self, name: str) -> bool:
        return self.find(name) is not None

    def get(self, name: str, dtype) -> torch.Tensor:
        key = self.find(name)
        if key is None:
            raise LmlabError(
                f"the checkpoint has no tensor {name!r}; it does not match its config.json, re-download the model."
            )
        return self.source.get(key, dtype)


def lmlab_tensors(cfg: ModelConfig, source, dtype: torch.dtype, *, transpose_conv1d: bool = True):
    """Yield (lmlab name, tensor) for every parameter of Transformer(cfg), built from HF names.

    transpose_conv1d: GPT-2 HF checkpoints store Linear weights as (in, out) Conv1D; nanoGPT's
    own checkpoints use nn.Linear (out, in) and pass False.
    """
    n = _Names(source)
    get = lambda name: n.get(name, dtype)  # noqa: E731
    fam = cfg.family
    if fam == "gpt2":
        lin = (lambda name: get(name).t().contiguous()) if transpose_conv1d else get
        yield "tok_embed.weight", get("wte.weight")
        yield "pos_embed.weight", get("wpe.weight")
        for i in range(cfg.n_layers):
            p, q = f"h.{i}.", f"blocks.{i}."
            yield from _norm(n, q + "attn_norm", p + "ln_1", dtype)
            yield q + "attn.qkv.weight", lin(p + "attn.c_attn.weight")
            yield q + "attn.o.weight", lin(p + "attn.c_proj.weight")
            yield q + "mlp.up.weight", lin(p + "mlp.c_fc.weight")
            yield q + "mlp.down.weight", lin(p + "mlp.c_proj.weight")
            yield from _norm(n, q + "mlp_norm", p + "ln_2", dtype)
            for ours, theirs in [
                ("attn.qkv", "attn.c_attn"),
                ("attn.o", "attn.c_proj"),
                ("mlp.up", "mlp.c_fc"),
                ("mlp.down", "mlp.c_proj"),
            ]:
                yield q + ours + ".bias", _bias(n, p + theirs + ".bias", dtype)
        yield from _norm(n, "final_norm", "ln_f", dtype)
        if not cfg.tie_embeddings:
            yield "lm_head.weight", get("lm_head.weight")
        return

    if fam == "gpt_neox":
        H, D, C = cfg.n_heads, cfg.head_dim, cfg.d_model
        yield "tok_embed.weight", get("embed_in.weight")
        for i in range(cfg.n_layers):
            p, q = f"layers.{i}.", f"blocks.{i}."
            yield from _norm(n, q + "attn_norm", p + "input_layernorm", dtype)
            yield from _norm(n, q + "mlp_norm", p + "post_attention_layernorm", dtype)
            # NeoX interleaves per head: rows are (head, [q|k|v], D). Regroup to [all q | all k | all v].
            w = get(p + "attention.query_key_value.weight").view(H, 3, D, C).transpose(0, 1).reshape(3 * H * D, C)
            yield q + "attn.qkv.weight", w
            if cfg.qkv_bias:
                yield (
                    q + "attn.qkv.bias",
                    get(p + "attention.query_key_value.bias").view(H, 3, D).transpose(0, 1).reshape(-1),
                )
            yield q + "attn.o.weight", get(p + "attention.dense.weight")
            if cfg.attn_out_bias:
                yield q + "attn.o.bias", get(p + "attention.dense.bias")
            yield q + "mlp.up.weight", get(p + "mlp.dense_h_to_4h.weight")
            yield q + "mlp.up.bias", get(p + "mlp.dense_h_to_4h.bias")
            yield q + "mlp.down.weight", get(p + "mlp.dense_4h_to_h.weight")
            yield q + "mlp.down.bias", get(p + "mlp.dense_4h_to_h.bias")
        yield from _norm(n, "final_norm", "final_layer_norm", dtype)
        if not cfg.tie_embeddings:
            yield "lm_head.weight", get("embed_out.weight")
        return

    # llama, mistral, qwen2, qwen3, gemma3: the "model.layers.{i}.self_attn.q_proj" layout
    yield "tok_embed.weight", get("embed_tokens.weight")
    gemma = fam == "gemma3"
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        yield q + "attn_norm.weight", get(p + "input_layernorm.weight")
        if gemma:
            yield q + "post_attn_norm.weight", get(p + "post_attention_layernorm.weight")
            yield q + "mlp_norm.weight", get(p + "pre_feedforward_layernorm.weight")
            yield q + "post_mlp_norm.weight", get(p + "post_feedforward_layernorm.weight")
        else:
            yield q + "mlp_norm.weight", get(p + "post_attention_layernorm.weight")
        yield q + "attn.qkv.weight", torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            yield q + "attn.qkv.bias", torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"])
        yield q + "attn.o.weight", get(a + "o_proj.weight")
        if cfg.attn_out_bias:
            yield q + "attn.o.bias", get(a + "o_proj.bias")
        if cfg.qk_norm:
            yield q + "attn.q_norm.weight", get(a + "q_norm.weight")
            yield q + "attn.k_norm.weight", get(a + "k_norm.weight")
        m = p + "mlp."
        yield q + "mlp.up.weight", torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")])
        if cfg.mlp_bias:
            yield q + "mlp.up.bias", torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")])
        yield q + "mlp.down.weight", get(m + "down_proj.weight")
        if cfg.mlp_bias:
            yield q + "mlp.down.bias", get(m + "down_proj.bias")
    yield "final_norm.weight", get("norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", get("lm_head.weight")


def _norm(n: _Names, ours: str, theirs: str, dtype):
    yield ours + ".weight", n.get(theirs + ".weight", dtype)
    yield ours + ".bias", _bias(n, theirs + ".bias", dtype, like=n.get(theirs + ".weight", dtype))


def _bias(n: _Names, name: str, dtype, like=None):
    """A bias, or zeros where the checkpoint has none (nanoGPT with bias=False)."""
    if n.has(name):
        return n.get(name, dtype)
    if like is None:
        raise LmlabError(f"the checkpoint has no tensor {name!r}; it does not match its config, re-download the model.")
    return torch.zeros_like(like)


def build_model(cfg: ModelConfig, tensors, dtype: torch.dtype, device="cpu"):
    """A Transformer whose parameters are exactly the given tensors (no random init, no copy)."""
    from lmlab.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name, t in tensors:
        if name not in expected:
            raise LmlabError(
                f"internal key map produced an unknown parameter {name!r}; please report this as an lmlab bug."
            )
        if tuple(t.shape) != tuple(expected[name]):
            raise LmlabError(
                f"weight {name} has shape {tuple(t.shape)} but the config implies {tuple(expected[name])}; "
                "the weights do not match config.json."
            )
        state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("tok_embed.weight"))
    missing = [k for k in expected if k not in state]
    if missing:
        raise LmlabError(
            f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); it does not match its config."
        )
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_embed.weight
    model._rope_cache = {}
    return model.eval()
