"""GGUFSource: dequantization, HF names/layout/semantics, config, errors, and peak memory.

The reference is transformers' own GGUF loader (``load_gguf_checkpoint``, what
``from_pretrained(..., gguf_file=...)`` runs; from_pretrained itself refuses to run here without
``accelerate``), which dequantizes with ``gguf.quants`` (numpy) and undoes llama.cpp's q/k
permutation and Gemma's ``1 + w`` norms. Independent checks: hand-computed blocks, scalar
transcriptions of ggml's C dequantizers, and tiny GGUF files written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from bundled import gemma3_gguf_path, smollm2_gguf_path
from lmlab.errors import LmlabError
from lmlab.loading.gguf import GGUFSource, dequantize

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

BUNDLED = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}


# ----------------------------------------------------------------------------- transformers parity


@pytest.fixture(scope="module", params=list(BUNDLED))
def tf_reference(request):
    """(path, GGUFSource, transformers' parsed config dict, transformers' float32 state dict)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = BUNDLED[request.param]()
    source = GGUFSource(path)
    mine = source.hf_config()
    # The meta model only supplies HF parameter names to transformers' GGUF -> HF name map.
    cfg = transformers.AutoConfig.for_model(mine["model_type"], **{k: v for k, v in mine.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    yield path, source, parsed["config"], parsed["tensors"]
    parsed.clear()


def test_every_tensor_matches_transformers(tf_reference):
    _, source, _, ref = tf_reference
    assert set(source.keys()) == set(ref), set(source.keys()) ^ set(ref)
    for name in list(ref):
        theirs = ref[name]
        ours = source.get(name, torch.float32)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, name
        if not torch.equal(ours, theirs):  # in practice bit-identical; else allow float32 rounding
            diff = (ours - theirs.float()).abs().max().item()
            assert diff <= 1e-6, f"{name} ({source.tensor_types()[name]}): max |diff| {diff}"
        del ref[name]  # keep one copy of the model, not two


def test_hf_config_matches_transformers(tf_reference):
    import transformers

    _, source, theirs, _ = tf_reference
    mine = source.hf_config()
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "pad_token_id",
        "rope_theta",
        "sliding_window",
    ):
        if key in theirs:
            assert mine[key] == theirs[key], key
    assert mine["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)
    eos = mine["eos_token_id"] if isinstance(mine["eos_token_id"], list) else [mine["eos_token_id"]]
    assert eos[0] == theirs["eos_token_id"]
    # Fields the file does not store come from transformers' config class defaults.
    full = transformers.AutoConfig.for_model(
        theirs["model_type"], **{k: v for k, v in theirs.items() if k != "model_type"}
    )
    if mine["model_type"] == "gemma3_text":
        assert mine["layer_types"] == full.layer_types
        assert mine["query_pre_attn_scalar"] == full.query_pre_attn_scalar == 256
        assert mine["hidden_activation"] == full.hidden_activation == "gelu_pytorch_tanh"
        assert mine["rope_local_base_freq"] == full.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert eos == [1, 106]  # <eos> and <end_of_turn>, as HF's generation_config.json lists them
        assert mine["rms_norm_eps"] == 1e-6 and mine["rope_theta"] == 1e6 and mine["sliding_window"] == 512
    else:  # SmolLM2-135M-Instruct's config.json, as published
        assert (mine["hidden_size"], mine["num_hidden_layers"], mine["num_key_value_heads"]) == (576, 30, 3)
        assert mine["rms_norm_eps"] == 1e-5 and mine["rope_theta"] == 100000.0 and mine["tie_word_embeddings"] is True
        assert mine["hidden_act"] == "silu" and mine["rope_scaling"] is None


def test_bundled_file_facts():
    s = GGUFSource(smollm2_gguf_path())
    types = s.tensor_types()
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.norm.weight"] == "F32" and "lm_head.weight" not in types
    assert s.quantization == "Q4_1" and 90e6 < s.weight_bytes_on_disk() < os.path.getsize(s.path)
    assert s.get("model.layers.0.input_layernorm.weight", torch.bfloat16).dtype == torch.bfloat16
    assert "tokenizer.ggml.tokens" not in s.metadata and len(s.array("tokenizer.ggml.tokens")) == 49152
    json.dumps(s.metadata)  # plain Python values only


def test_lmlab_config_from_gguf():
    from lmlab.loading.hf import config_from_hf

    cfg = config_from_hf(GGUFSource(gemma3_gguf_path()).hf_config())
    assert cfg.family == "gemma3" and cfg.layer_types.count("full") == 3 and cfg.rope_local_theta == 10000.0
    assert cfg.attn_scale == pytest.approx(256**-0.5) and cfg.norm_weight_offset == 1.0 and cfg.tie_embeddings


# ----------------------------------------------------------------------------- dequantizers

# Where each block format keeps its float16 scales (random bytes there would be inf/nan).
_F16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
}


def _random_blocks(qtype, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        raw[:, off : off + 2] = rng.normal(0, 0.02, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", list(_F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_numpy(qtype):
    raw = _random_blocks(qtype, 64)
    ours = dequantize(torch.from_numpy(raw.reshape(4, -1)), qtype.name).reshape(-1)
    theirs = gguf.quants.dequantize(raw.reshape(4, -1), qtype).reshape(-1)
    assert ours.shape == theirs.shape
    assert np.abs(ours.numpy() - theirs).max() <= 1e-6


def test_dequantize_hand_checked_blocks():
    # Q4_0: d = 0.5, byte j holds j (low nibble, element j) and 15 - j (high nibble, element 16 + j).
    j = np.arange(16, dtype=np.uint8)
    block = np.concatenate([np.array([0.5], np.float16).view(np.uint8), j | ((15 - j) << 4)])
    want = [(v - 8) * 0.5 for v in range(16)] + [(15 - v - 8) * 0.5 for v in range(16)]
    assert dequantize(torch.from_numpy(block[None]), "Q4_0")[0].tolist() == want
    # Q8_0: d = 0.25, quants -16..15.
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([0.25], np.float16).view(np.uint8), q.view(np.uint8)])
    assert dequantize(torch.from_numpy(block[None]), "Q8_0")[0].tolist() == [v * 0.25 for v in range(-16, 16)]
    # Q4_1: d = 2, m = -1: value = 2 * q - 1.
    block = np.concatenate([np.array([2.0, -1.0], np.float16).view(np.uint8), j | (j << 4)])
    assert dequantize(torch.from_numpy(block[None]), "Q4_1")[0].tolist() == [2.0 * v - 1 for v in range(16)] * 2


def _scalar_q4_k(b: bytes) -> list[float]:
    """ggml's dequantize_row_q4_K for one block, transcribed loop for loop."""
    d, dmin = np.frombuffer(b[0:4], np.float16).astype(np.float32)
    scales, qs = b[4:16], b[16:144]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    y, q, is_ = [], 0, 0
    for _ in range(0, 256, 64):
        sc, m = scale_min(is_)
        d1, m1 = d * np.float32(sc), dmin * np.float32(m)
        sc, m = scale_min(is_ + 1)
        d2, m2 = d * np.float32(sc), dmin * np.float32(m)
        y += [d1 * np.float32(qs[q + i] & 0xF) - m1 for i in range(32)]
        y += [d2 * np.float32(qs[q + i] >> 4) - m2 for i in range(32)]
        q += 32
        is_ += 2
    return [float(v) for v in y]


def _scalar_q6_k(b: bytes) -> list[float]:
    """ggml's dequantize_row_q6_K for one block, transcribed loop for loop."""
    ql, qh = b[0:128], b[128:192]
    sc = np.frombuffer(b[192:208], np.int8)
    d = np.frombuffer(b[208:210], np.float16).astype(np.float32)[0]
    y = [0.0] * 256
    for n in (0, 128):
        o_ql, o_qh, o_sc = n // 2, n // 4, n // 16
        for i in range(32):
            is_ = i // 16
            q1 = ((ql[o_ql + i] & 0xF) | (((qh[o_qh + i] >> 0) & 3) << 4)) - 32
            q2 = ((ql[o_ql + i + 32] & 0xF) | (((qh[o_qh + i] >> 2) & 3) << 4)) - 32
            q3 = ((ql[o_ql + i] >> 4) | (((qh[o_qh + i] >> 4) & 3) << 4)) - 32
            q4 = ((ql[o_ql + i + 32] >> 4) | (((qh[o_qh + i] >> 6) & 3) << 4)) - 32
            for k, qv in enumerate((q1, q2, q3, q4)):
                y[n + i + 32 * k] = float(d * np.float32(sc[o_sc + is_ + 2 * k]) * np.float32(qv))
    return y


@pytest.mark.parametrize("qtype,scalar", [(Q.Q4_K, _scalar_q4_k), (Q.Q6_K, _scalar_q6_k)], ids=["Q4_K", "Q6_K"])
def test_k_quants_match_ggml_scalar_code(qtype, scalar):
    raw = _random_blocks(qtype, 3, seed=1)
    ours = dequantize(torch.from_numpy(raw), qtype.name)
    for i in range(3):
        assert np.allclose(ours[i].numpy(), scalar(raw[i].tobytes()), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- tiny GGUF files


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate_half rows -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, arch: str, *, qtype=Q.Q8_0, extra_meta=None, rope_freqs=None, name="tiny"):
    """A 1-layer model; returns {hf name: (float32 weights as HF means them, ggml type)}."""
    rng = np.random.default_rng(0)
    C, H, KV, D, F, V = 64, 4, 2, 16, 128, 96
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_layer_norm_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(D)
    for k, v in (extra_meta or {}).items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_string(k, v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(V)])
    expect = {}

    def add(gname, hf, arr, ggml_type, hf_value=None):
        arr = arr.astype(np.float32)
        if ggml_type == Q.F32:
            data, stored = arr, arr
        elif ggml_type == Q.F16:
            data = arr.astype(np.float16)
            stored = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(arr, ggml_type)
            stored = gguf.quants.dequantize(data, ggml_type)
        w.add_tensor(gname, data, raw_dtype=ggml_type)
        expect[hf] = (hf_value(stored) if hf_value else stored, ggml_type.name)

    if arch == "gpt2":
        add("token_embd.weight", "transformer.wte.weight", rng.normal(size=(V, C)), qtype)
        add("position_embd.weight", "transformer.wpe.weight", rng.normal(size=(128, C)), Q.F16)
        add(
            "blk.0.attn_qkv.weight",
            "transformer.h.0.attn.c_attn.weight",
            rng.normal(size=(3 * C, C)),
            qtype,
            lambda s: s.T,
        )
        add("blk.0.attn_qkv.bias", "transformer.h.0.attn.c_attn.bias", rng.normal(size=(3 * C,)), Q.F32)
        add("blk.0.ffn_up.weight", "transformer.h.0.mlp.c_fc.weight", rng.normal(size=(F, C)), Q.F16, lambda s: s.T)
        add("blk.0.attn_norm.weight", "transformer.h.0.ln_1.weight", rng.normal(size=(C,)), Q.F32)
        add("output.weight", "lm_head.weight", rng.normal(size=(V, C)), qtype)
    else:
        q_heads = {"attn_q": H, "attn_k": KV}
        add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(V, C)), qtype)
        for leaf, hf, rows, t in [
            ("attn_q", "self_attn.q_proj", H * D, Q.F16),
            ("attn_k", "self_attn.k_proj", KV * D, qtype),
            ("attn_v", "self_attn.v_proj", KV * D, Q.F16),
            ("ffn_gate", "mlp.gate_proj", F, qtype),
        ]:
            hf_w = rng.normal(size=(rows, C)).astype(np.float32)
            if arch == "llama" and leaf in q_heads:  # written as llama.cpp writes it; expect HF's rows back
                add(
                    f"blk.0.{leaf}.weight",
                    f"model.layers.0.{hf}.weight",
                    _permute(hf_w, q_heads[leaf]),
                    t,
                    lambda s, n=q_heads[leaf]: _unpermute(s, n),
                )
            else:
                add(f"blk.0.{leaf}.weight", f"model.layers.0.{hf}.weight", hf_w, t)
        norm_value = (lambda s: s - 1.0) if arch == "gemma3" else None  # gemma files store 1 + w
        add(
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            1 + 0.1 * rng.normal(size=(C,)),
            Q.F32,
            norm_value,
        )
        add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=(C,)), Q.F32, norm_value)
        if arch == "gemma3":
            add(
                "blk.0.ffn_norm.weight",
                "model.layers.0.pre_feedforward_layernorm.weight",
                rng.normal(size=(C,)),
                Q.F32,
                norm_value,
            )
            add(
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
                rng.normal(size=(C,)),
                Q.F32,
                norm_value,
            )
            add(
                "blk.0.attn_q_norm.weight",
                "model.layers.0.self_attn.q_norm.weight",
                rng.normal(size=(D,)),
                Q.F32,
                norm_value,
            )
        else:
            add("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight", rng.normal(size=(C,)), Q.F32)
            add("output.weight", "lm_head.weight", rng.normal(size=(V, C)), Q.F16)
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16, Q.BF16, Q.Q4_1, Q.Q5_0], ids=lambda t: t.name)
def test_tiny_gguf_round_trip(tmp_path, arch, qtype):
    path = tmp_path / f"{arch}.gguf"
    expect = _write_tiny(path, arch, qtype=qtype)
    s = GGUFSource(path)
    assert set(s.keys()) == set(expect)
    for name, (value, type_name) in expect.items():
        assert s.tensor_types()[name] == type_name
        got = s.get(name, torch.float32)
        assert got.shape == value.shape, name
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(value))), name
        assert torch.equal(s.get(name, torch.bfloat16), got.to(torch.bfloat16)), name
    cfg = s.hf_config()
    if arch == "gpt2":
        assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["tie_word_embeddings"]) == (64, 4, 1, False)
    else:
        assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
            64,
            4,
            2,
            16,
        )
        assert cfg["tie_word_embeddings"] is (arch == "gemma3") and cfg["vocab_size"] == 96


def test_mistral_named_llama_file_and_llama3_rope(tmp_path):
    # Llama 3.1's rope factors as llama.cpp's converter writes them into rope_freqs.
    head_dim, theta, factor, low, high, old = 128, 500000.0, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "l3.gguf"
    _write_tiny(path, "llama", rope_freqs=np.array(factors), extra_meta={"llama.rope.dimension_count": head_dim})
    cfg = GGUFSource(path).hf_config()
    # key_length (16) wins over rope.dimension_count for head_dim; the fit only needs the factors
    assert cfg["rope_scaling"] is not None and cfg["rope_scaling"]["rope_type"] == "llama3"
    path2 = tmp_path / "m.gguf"
    _write_tiny(path2, "llama", name="Mistral 7B Instruct")
    assert GGUFSource(path2).hf_config()["model_type"] == "mistral"
    from lmlab.loading.gguf import _llama3_scaling

    got = _llama3_scaling(torch.tensor(factors, dtype=torch.float64), head_dim, theta)
    assert got == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# ----------------------------------------------------------------------------- bad files


def _copy_prefix(src: str, dst, nbytes: int):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(nbytes))


def test_truncated_inside_header(tmp_path):
    bad = tmp_path / "head.gguf"
    _copy_prefix(smollm2_gguf_path(), bad, 1 << 20)  # the header (vocabulary + merges) is ~1.8 MB
    with pytest.raises(
        LmlabError, match=r"is not a valid GGUF file \(it ends at byte 1048576, inside its header\); re-download it\."
    ):
        GGUFSource(bad)


def test_truncated_tensor_data(tmp_path):
    src = smollm2_gguf_path()
    bad = tmp_path / "half.gguf"
    _copy_prefix(src, bad, os.path.getsize(src) // 2)
    with pytest.raises(
        LmlabError,
        match=r"is truncated: tensor 'blk\.\d+\.\w+\.weight' ends at byte \d+ but the file has \d+; re-download it\.",
    ):
        GGUFSource(bad)


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),
        b"",
        b"GGUF" + b"\xff" * 60,
        b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7 + b"\xff" * 40,
    ],
    ids=["garbage", "empty", "bad-version", "bad-kv"],
)
def test_garbage_is_not_gguf(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(LmlabError, match=r"is not a valid GGUF file \(.+\); re-download it\.") as e:
        GGUFSource(bad)
    assert "\n" not in str(e.value)


def _patch_type(path, tensor: str, type_id: int):
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct_u64(len(name)) + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def struct_u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def test_unknown_and_unsupported_quant_types(tmp_path):
    path = tmp_path / "t.gguf"
    _write_tiny(path, "llama")
    _patch_type(path, "blk.0.ffn_gate.weight", 200)
    with pytest.raises(
        LmlabError,
        match=(
            r"tensor 'blk\.0\.ffn_gate\.weight' has ggml type id 200, which lmlab does not know; "
            r"supported types: F32, F16, BF16, .*Q6_K"
        ),
    ):
        GGUFSource(path)
    _write_tiny(path, "llama")
    _patch_type(path, "blk.0.ffn_gate.weight", 9)  # Q8_1: ggml's internal activation type
    with pytest.raises(
        LmlabError, match=r"is quantized as Q8_1, which lmlab cannot dequantize; supported types: .*Q4_K.*re-quantize"
    ):
        GGUFSource(path)


def test_unsupported_architecture_and_missing_tensor(tmp_path):
    path = tmp_path / "f.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        LmlabError,
        match=(
            r"holds a 'falcon' model, which lmlab cannot load from GGUF; "
            r"supported architectures: gemma3, gpt2, llama, qwen2, qwen3\."
        ),
    ):
        GGUFSource(path)
    with pytest.raises(LmlabError, match="does not exist"):
        GGUFSource(tmp_path / "nope.gguf")
    with pytest.raises(LmlabError, match="has no tensor 'model.layers.99"):
        GGUFSource(smollm2_gguf_path()).get("model.layers.99.mlp.up_proj.weight", torch.float32)


# ----------------------------------------------------------------------------- memory


_MEASURE = r"""
import json, os, resource, sys, time
import torch
from lmlab.loading.gguf import GGUFSource

def status(key):  # kB -> bytes
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
t0 = time.perf_counter()
source = GGUFSource(sys.argv[1])
weights = {name: source.get(name, torch.bfloat16) for name in source.keys()}
seconds = time.perf_counter() - t0
# VmHWM is this process image's peak RSS. ru_maxrss would be the same, except that Linux carries the
# parent's peak through fork+exec into it, and the parent (pytest, holding transformers' models) is big.
peak = status("VmHWM")
print(json.dumps({"delta": peak - base, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes": sum(t.numel() * t.element_size() for t in weights.values()), "seconds": seconds}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_peak_memory_loading_bf16():
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, smollm2_gguf_path()], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["bytes"] == 134515008 * 2
    assert m["delta"] <= 1.5 * m["bytes"], m


@pytest.mark.parametrize("name", list(BUNDLED))
def test_logits_match_transformers_loading_the_same_gguf(name):
    """The whole model, not just its tensors: transformers loads the same file by itself."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    import lmlab

    path = BUNDLED[name]()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    lm = lmlab.load(path)
    ids = torch.tensor([lm.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        theirs = hf(ids).logits
    del hf
    ours = lm(ids)
    assert (ours - theirs).abs().max().item() < 1e-3  # measured: about 3e-5 for both models
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_released_arrays_are_not_read_again():
    """After release_arrays (lmlab.load calls it once the tokenizer is built) the big metadata
    arrays are gone; the EOS ids, computed from them, stay; a late reader is told, not given None."""
    src = GGUFSource(smollm2_gguf_path())
    eos = src.eos_token_ids()
    assert src.array("tokenizer.ggml.tokens") is not None
    src.release_arrays()
    assert src.eos_token_ids() == eos
    with pytest.raises(RuntimeError, match="release_arrays"):
        src.array("tokenizer.ggml.tokens")
