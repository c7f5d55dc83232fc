"""`lmlab merge`: the merging identities, parity with mergekit, the folder transformers loads, bad input.

Every model here is a tiny random llama saved as a HF folder (tests/tiny.py) with a
one-character-per-token tokenizer. Tolerances: float32 merges are compared to 1e-6 (a few units
of float32 rounding for these weights, |w| < 1); bfloat16 ones to one bfloat16 step (rtol 2^-7);
logits to 1e-5 (fp32).
"""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmlab.errors import LmlabError
from lmlab.merge import merge, spec_from_options, spec_from_yaml
from lmlab.merge.methods import slerp
from tiny import char_vocab, make_tiny, save_char_tokenizer

FP32 = dict(rtol=1e-6, atol=1e-6)
BF16 = dict(rtol=2**-7, atol=1e-6)


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """Paths (str) of the tiny models: a, b, c (same shapes), d (150-token vocabulary with its own
    token order), gpt2 (another architecture), wide (llama with another MLP width)."""
    from tokenizers import Tokenizer, decoders, models

    root = tmp_path_factory.mktemp("merge-models")
    paths = {}
    for i, name in enumerate("abc"):
        make_tiny("llama", root / name, seed=i)
        save_char_tokenizer(root / name)
        paths[name] = str(root / name)
    d = root / "d"
    make_tiny("llama", d, seed=5, vocab_size=150)
    chars = char_vocab()[:150][::-1]  # the same characters as a's first 150, in reverse id order
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    paths["d"] = str(d)
    make_tiny("gpt2", root / "gpt2")
    paths["gpt2"] = str(root / "gpt2")
    make_tiny("llama", root / "wide", intermediate_size=96)
    paths["wide"] = str(root / "wide")
    return paths


def weights(folder) -> dict[str, torch.Tensor]:
    from lmlab.loading.hf import folder_source

    src = folder_source(folder)
    return {k: src.get(k) for k in src.keys()}


def assert_same_weights(got: dict, want: dict, tol=FP32, what=""):
    assert set(got) == set(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))[:3]}"
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, (what, k, got[k].dtype, want[k].dtype)
        torch.testing.assert_close(got[k].float(), want[k].float(), **tol, msg=lambda s, k=k: f"{what} {k}: {s}")


def run(spec, out, **kw):
    merge(spec, out, **kw)
    return weights(out)


# ----------------------------------------------------------------------------- identities


def test_linear_self_merge_at_half_and_half_is_the_original(m, tmp_path):
    got = run(spec_from_options([m["a"], m["a"]], "linear", weights="0.5,0.5"), tmp_path / "out")
    assert_same_weights(got, weights(m["a"]), what="linear a+a")


def test_slerp_at_t0_is_a_and_at_t1_is_b(m, tmp_path):
    for t, want in (("0", "a"), ("1", "b")):
        got = run(spec_from_options([m["a"], m["b"]], "slerp", t=t), tmp_path / f"t{t}")
        assert_same_weights(got, weights(m[want]), what=f"slerp t={t}")


def test_task_arithmetic_with_weight_0_is_the_base(m, tmp_path):
    spec = spec_from_options([m["b"], m["c"]], "task-arithmetic", base=m["a"], weights="0,0")
    assert_same_weights(run(spec, tmp_path / "out"), weights(m["a"]), what="task arithmetic, weight 0")


def test_ties_with_density_1_and_one_model_is_task_arithmetic(m, tmp_path):
    for w, norm in (("1", None), ("0.6", False)):
        ties = spec_from_options([m["b"]], "ties", base=m["a"], weights=w, density=1.0, normalize=norm)
        ta = spec_from_options([m["b"]], "task-arithmetic", base=m["a"], weights=w)
        ta = run(ta, tmp_path / f"ta{w}")
        assert_same_weights(run(ties, tmp_path / f"ties{w}"), ta, what=f"ties vs task arithmetic, weight {w}")
    # and both differ from the base: the identity is not the trivial one
    assert not torch.equal(
        ta["model.layers.0.mlp.up_proj.weight"], weights(m["a"])["model.layers.0.mlp.up_proj.weight"]
    )


def test_slerp_t_varies_by_layer(m, tmp_path):
    """--t 0,1 on two layers: layer 0 (and the embeddings, norm, head: t=0) is A, layer 1 is B."""
    got = run(spec_from_options([m["a"], m["b"]], "slerp", t="0,1"), tmp_path / "out")
    a, b = weights(m["a"]), weights(m["b"])
    want = {k: (b if ".layers.1." in k else a)[k] for k in a}
    assert_same_weights(got, want, what="slerp t=0,1")


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_lerps_parallel_ones():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(0.5, e1, e2), torch.tensor([1.0, 1.0]) / math.sqrt(2), **FP32)
    torch.testing.assert_close(slerp(1 / 3, e1, e2), torch.tensor([math.cos(math.pi / 6), 0.5]), **FP32)
    a = torch.tensor([1.0, 2.0, 3.0])  # 2a is parallel: the angle is 0, so it interpolates linearly
    torch.testing.assert_close(slerp(0.25, a, 2 * a), 1.25 * a, **FP32)


# ----------------------------------------------------------------------------- parity with mergekit


def _configs(m) -> dict[str, dict]:
    a, b, c = m["a"], m["b"], m["c"]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": [0.2, 0.9]}}],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": a,
            "models": [{"model": b, "parameters": {"weight": 0.7}}, {"model": c, "parameters": {"weight": -0.4}}],
            "parameters": {"lambda": 1.3},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": a,
            "models": [
                {"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": c, "parameters": {"weight": 0.5, "density": [0.2, 0.9]}},
            ],
        },
        "ties_bf16": {
            "merge_method": "ties",
            "base_model": a,
            "dtype": "bfloat16",
            "models": [
                {"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": c, "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": a,
            "models": [
                {"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": c, "parameters": {"weight": 0.5, "density": 0.6}},
            ],
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": a,
            "models": [
                {"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": c, "parameters": {"weight": 0.5, "density": 0.6}},
            ],
            "parameters": {"lambda": 0.8, "normalize": True},
        },
        "linear_out_bf16": {
            "merge_method": "linear",
            "out_dtype": "bfloat16",
            "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.9}}],
        },
        "tokenizer_base": {
            "merge_method": "linear",
            "tokenizer_source": "base",
            "base_model": a,
            "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": m["d"], "parameters": {"weight": 0.5}}],
        },
    }


PARITY = [
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "ties_bf16",
    "dare_ties",
    "dare_linear",
    "linear_out_bf16",
    "tokenizer_base",
]


@pytest.mark.parametrize("name", PARITY)
def test_same_tensors_as_mergekit_on_the_same_config(m, tmp_path, name):
    """lmlab merges the YAML; mergekit merges the mergekit_config.yml lmlab wrote next to the model
    (so that file is checked too); every tensor must agree. DARE draws with the same seed."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_configs(m)[name]))
    ours = run(spec_from_yaml(path), tmp_path / "lmlab", seed=7)
    written = yaml.safe_load((tmp_path / "lmlab" / "mergekit_config.yml").read_text())
    run_merge(MergeConfiguration.model_validate(written), str(tmp_path / "mk"), MergeOptions(random_seed=7, quiet=True))
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    assert_same_weights(ours, theirs, BF16 if "bf16" in name else FP32, what=f"{name} vs mergekit")
    if name.startswith("dare"):  # the draws matter: another seed gives another model
        other = run(spec_from_yaml(path), tmp_path / "seed8", seed=8)
        k = "model.layers.1.mlp.up_proj.weight"
        assert (other[k] - ours[k]).abs().max() > 1e-3


def test_tokenizer_base_matches_rows_by_token_text(m, tmp_path):
    spec = spec_from_options([m["a"], m["d"]], "linear", weights="0.5,0.5", tokenizer="base", base=m["a"])
    got = run(spec, tmp_path / "out")["model.embed_tokens.weight"]
    ea, ed = weights(m["a"])["model.embed_tokens.weight"], weights(m["d"])["model.embed_tokens.weight"]
    assert got.shape == ea.shape  # the base's 160 tokens
    torch.testing.assert_close(got[0], (ea[0] + ed[149]) / 2, **FP32)  # d holds a's token 0 at id 149
    torch.testing.assert_close(got[155], ea[155], **FP32)  # d lacks a's token 155: the base's row stands in


# ----------------------------------------------------------------------------- the folder


def test_merged_folder_loads_in_transformers_with_lmlab_logits_also_sharded(m, tmp_path):
    import transformers

    import lmlab

    spec = spec_from_options([m["b"], m["c"]], "ties", base=m["a"], weights="0.6,0.4", density=0.5)
    merge(spec, tmp_path / "one")
    merge(spec, tmp_path / "sharded", shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*/*.tmp"))
    ids = torch.tensor([[5, 17, 42, 99, 3, 120, 64, 7]])
    want = lmlab.load(tmp_path / "one")(ids).float()
    for folder in ("one", "sharded"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-5, msg=lambda s, f=folder: f"{f}: {s}")
    torch.testing.assert_close(lmlab.load(tmp_path / "sharded")(ids).float(), want, rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "one")  # tokenizer files came from the base
    assert tok.convert_ids_to_tokens([33]) == [char_vocab()[33]]


def test_cli_prints_the_comparison_and_records_a_merge_run(m, tmp_path, home, capsys):
    from lmlab.cli.main import main
    from lmlab.runs import RunStore

    out = tmp_path / "merged"
    sample = tmp_path / "sample.txt"
    sample.write_text("merging two models is an average of their weights, tensor by tensor. " * 3)
    argv = ["merge", m["a"], m["b"], "--weights", "0.5,0.5", "-o", str(out), "--text", str(sample)]
    assert main([*argv, "--prompt", "Hello", "--prompt", "x = "]) == 0
    text = capsys.readouterr().out
    assert "perplexity on " + str(sample) in text and "merged" in text and "'Hello' →" in text
    with RunStore() as store:
        runs = store.list(command="merge")
        assert len(runs) == 1
        run = store.get(runs[0]["id"])
    assert run["status"] == "complete" and run["model_path"] == str(out) and run["model_hash"]
    rows = run["outputs"]["comparison"]
    assert [r["label"] for r in rows] == [m["a"], m["b"], "merged"]
    assert all(r["perplexity"] > 1 and len(r["answers"]) == 2 for r in rows)
    assert run["config"]["merge_method"] == "linear"


def test_cli_runs_a_yaml_config(m, tmp_path, home, capsys):
    from lmlab.cli.main import main

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_configs(m)["slerp"]))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--no-compare", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "slerp" and summary["tensors"] == len(weights(m["a"]))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{a}", "{gpt2}"], "is a llama model and"),
        (["{a}", "{wide}"], "tensor model.layers.0.mlp.down_proj.weight is (64, 128)"),
        (["{a}", "{d}"], "pass --tokenizer base"),
        (["{a}", "{b}", "--weights", "0.2,0.3,0.5"], "--weights has 3 values for 2 models"),
        (["{b}", "{c}", "--method", "ties", "--base", "{a}", "--weights", "1"], "--weights has 1 value for 2 models"),
        (["{a}", "{b}", "--method", "average"], "unknown merge method 'average'"),
        (["{b}", "--method", "ties", "--base", "{a}", "--density", "1.5"], "density must be between 0 and 1"),
        (["{a}", "{b}", "--method", "slerp", "--t", "2"], "t must be between 0"),
        (["{a}", "{b}", "--method", "slerp", "--weights", "1,1"], "slerp takes no weights"),
        (["{a}", "{b}", "{c}", "--method", "slerp"], "slerp interpolates exactly two models"),
        (["{a}", "{b}"], None),  # after the loop below: -o pointing at an existing model
    ],
)
def test_bad_input_gets_one_sentence_and_exit_2(m, tmp_path, home, capsys, argv, message):
    from lmlab.cli.main import main

    out = tmp_path / "out"
    if message is None:  # -o naming a folder that already holds a model
        out, message = m["c"], "already holds a model"
    code = main(["merge", *[a.format(**m) for a in argv], "-o", str(out), "--no-compare"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and err.strip().count("\n") <= 1
    assert not (tmp_path / "out").exists()


def test_yaml_with_unsupported_keys_names_them(m, tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "slices": [], "models": [{"model": m["a"]}]}))
    with pytest.raises(LmlabError, match="does not support the key slices"):
        spec_from_yaml(path)
    rows = [{"model": m["a"], "parameters": {"wieght": 1}}, {"model": m["b"]}]
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": rows}))
    with pytest.raises(LmlabError, match="no parameter 'wieght'"):
        spec_from_yaml(path)


def test_a_full_disk_leaves_no_half_written_file(m, tmp_path, monkeypatch):
    from lmlab.merge.io import ModelWriter

    real = ModelWriter._write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] == 6:  # a few tensors in: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(ModelWriter, "_write", write)
    spec = spec_from_options([m["a"], m["b"]], "linear")
    with pytest.raises(LmlabError, match="is full") as e:
        merge(spec, tmp_path / "new")
    assert "nothing half-written" in str(e.value)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays, empty
    calls["n"] = 0
    with pytest.raises(LmlabError, match="is full"):
        merge(spec, tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


def test_ctrl_c_mid_merge_leaves_nothing(m, tmp_path):
    def progress(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(spec_from_options([m["a"], m["b"]], "linear"), tmp_path / "out", progress=progress)
    assert not (tmp_path / "out").exists()
