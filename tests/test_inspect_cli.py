"""The inspect commands on tiny models (token ids with --ids): output, --json, --png, knobs, errors."""

import json
import math

import pytest
import typer

import lmlab.cli.main as cli_main
from lmlab.cli.inspect_cmds import register
from tiny import make_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("llama", "gpt2"):
        folder = tmp_path_factory.mktemp(family)
        make_tiny(family, folder)
        out[family] = str(folder)
    return out


@pytest.fixture
def run(monkeypatch, capsys):
    """lmlab ARGS through the real entry point (its error handling), with these commands registered."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    monkeypatch.setattr(cli_main, "app", app)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", [])

    def go(*argv):
        code = cli_main.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return go


IDS = "1,5,9,33,2,7,5,9"


def test_inspect_lists_tokens_next_tokens_and_entropy(run, models):
    code, out, err = run("inspect", "-m", models["llama"], "--ids", IDS, "--json")
    assert code == 0
    d = json.loads(out)
    assert [t["id"] for t in d["tokens"]] == [1, 5, 9, 33, 2, 7, 5, 9]
    assert d["tokens"][0]["logprob"] is None and d["tokens"][1]["logprob"] < 0
    assert len(d["next"]) == 10 and d["next"][0]["prob"] >= d["next"][1]["prob"]
    assert 0 < d["entropy"] < 5.1  # at most log(160)
    assert "loaded in" in err and "loaded in" not in out
    code, out, _ = run("inspect", "-m", models["llama"], "--ids", IDS)
    assert code == 0 and "top 10 next tokens (entropy" in out


def test_attention_heatmap_json_and_png(run, models, tmp_path):
    png = tmp_path / "att.png"
    code, out, err = run("attention", "-m", models["llama"], "--ids", IDS, "--layer", "1", "--head", "3", "--png", png)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "attention pattern, layer 1, head 3" in out and " 100" in out  # the first query attends only to itself
    code, out, _ = run("attention", "-m", models["llama"], "--ids", IDS, "--layer", "0", "--json")
    pattern = json.loads(out)["pattern"]
    assert len(pattern) == 8 and all(abs(sum(row) - 1) < 1e-5 for row in pattern)


def test_lens_ablate_patch_shapes_induction(run, models, tmp_path):
    m = models["llama"]
    code, out, _ = run("lens", "-m", m, "--ids", IDS, "--json", "-k", "2")
    assert code == 0 and len(json.loads(out)["layers"]) == 2
    code, out, _ = run("lens", "-m", m, "--ids", IDS, "-g", "3", "--json")
    assert code == 0 and len(json.loads(out)["generated"]["token_ids"]) == 3
    code, out, _ = run("ablate", "-m", m, "--ids", IDS, "--heads", "0.1,1.*", "--skip-layers", "0", "-t", "5", "--json")
    d = json.loads(out)
    assert code == 0 and d["effect"]["interventions"] == ["ablate heads 0.1,1.* (zero)", "skip layers 0"]
    assert d["effect"]["summary"]["mean_kl"] > 0 and len(d["generation"]["base"]["token_ids"]) == 5
    code, out, _ = run("ablate", "-m", m, "--ids", IDS, "--heads", "1.2", "-t", "4")
    assert code == 0 and "effect of ablate heads 1.2 (zero)" in out and "generation, seed 0" in out
    png = tmp_path / "patch.png"
    code, out, _ = run("patch", "-m", m, "--clean", "ids:1,5,9,33", "--corrupt", "ids:1,6,9,33", "--png", png)
    assert code == 0 and "strongest single patch: layer 0, position 1" in out and png.is_file()
    code, out, _ = run("shapes", "-m", m, "--ids", "1,5,9", "--json")
    d = json.loads(out)
    assert code == 0 and all(r["ok"] for r in d["trace"]) and d["kv_cache"]["length_after_decode"] == 4
    code, out, _ = run("shapes", "-m", m, "--ids", "1,5,9")
    assert "GQA repeat" in out and "grows by 512 bytes per token" in out
    code, out, _ = run("induction", "-m", m, "--seq-len", "8", "--n-seqs", "2", "--top-layers", "1", "--json")
    d = json.loads(out)
    assert code == 0 and len(d["layers"]) == 2 and len(d["heads"]) == 4


def test_load_time_knobs(run, models):
    m = models["llama"]
    _, base, _ = run("inspect", "-m", m, "--ids", IDS, "--json")
    code, theta, err = run("inspect", "-m", m, "--ids", IDS, "--json", "--rope-theta", "10")
    assert code == 0 and "rope_theta=10" in err
    assert json.loads(theta)["next"] != json.loads(base)["next"]  # positions now rotate differently
    code, out, _ = run("shapes", "-m", m, "--ids", "1,5", "--n-layers", "1", "--json")
    assert code == 0 and json.loads(out)["config"]["n_layers"] == 1
    code, out, err = run("inspect", "-m", models["gpt2"], "--ids", IDS, "--rope-theta", "10")
    assert code == 2 and "--rope-theta applies to RoPE models" in err


def test_every_inspect_command_takes_quant(run, models, tmp_path):
    """--quant q8 quantizes the float model at load for each command; --quant native on a float
    folder is one sentence."""
    m = models["llama"]
    for argv in (
        ["inspect", "--ids", IDS],
        ["attention", "--ids", IDS, "--layer", "0"],
        ["lens", "--ids", IDS],
        ["ablate", "--ids", IDS, "--heads", "1.2", "-t", "2"],
        ["patch", "--clean", "ids:1,5,9,33", "--corrupt", "ids:1,6,9,33"],
        ["shapes", "--ids", "1,5,9"],
        ["induction", "--seq-len", "8", "--n-seqs", "2", "--top-layers", "1"],
    ):
        code, out, err = run(*argv, "-m", m, "--quant", "q8")
        assert code == 0 and "(quant q8)" in err and out, (argv, err)
    _, plain, _ = run("inspect", "-m", m, "--ids", IDS, "--json")
    _, q8, _ = run("inspect", "-m", m, "--ids", IDS, "--json", "--quant", "q8")
    a, b = json.loads(plain)["tokens"][1:], json.loads(q8)["tokens"][1:]
    # q8 moves a tiny random model's log-probabilities by up to 0.06 (measured)
    assert a != b and all(abs(x["logprob"] - y["logprob"]) < 0.25 for x, y in zip(a, b))
    code, out, err = run("lens", "-m", m, "--ids", IDS, "--quant", "native")
    assert code == 2 and "--quant native runs a GGUF file's own blocks" in err and "Traceback" not in err


def test_steer_takes_quant_on_the_bundled_file(run):
    from bundled import smollm2_gguf_path

    smollm2_gguf_path()  # skip when the bundled model is not installed
    argv = ["steer", "I think that", "--toward", "love", "--away", "hate", "--layer", "3", "-t", "3"]
    code, out, err = run(*argv, "-m", "smollm2-135m", "--quant", "native")
    assert code == 0 and "(quant native)" in err and "steered" in out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["attention", "--ids", IDS, "--layer", "0", "--head", "9"],
            "error: head 9 (layer 0) is out of range; this model has 4 heads per layer",
        ),
        (["attention", "--ids", IDS, "--layer", "5"], "error: layer 5 is out of range"),
        (["ablate", "--ids", IDS], "error: nothing to ablate; pass --heads"),
        (["ablate", "--ids", IDS, "--heads", "4.1"], "error: layer 4 is out of range"),
        (["inspect", "--ids", "1,x"], "error: --ids takes comma-separated token ids"),
        (["inspect", "--ids", "1,999"], "error: token id 999 is out of range"),
        (["inspect"], "error: no prompt was given"),
        (["inspect", "a prompt"], "has no tokenizer"),
        (["patch", "--clean", "ids:1,2", "--corrupt", "ids:1,2,3"], "same number of tokens"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(run, models, argv, message):
    code, out, err = run(*argv, "-m", models["llama"])
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_every_inspect_command_records_one_run_with_its_result(run, models):
    from lmlab.runs import RunStore

    with RunStore() as store:
        before = store.count()
    code, out, _ = run("ablate", "-m", models["llama"], "--ids", IDS, "--heads", "1.*", "-t", "4", "--json")
    assert code == 0
    with RunStore() as store:
        assert store.count() == before + 1
        rec = store.get("last")
    assert rec["command"] == "ablate" and rec["status"] == "complete"
    assert rec["inputs"] == {"ids": IDS} and rec["config"]["heads"] == "1.*"
    assert rec["model_hash"] and rec["outputs"] == json.loads(out)  # what was printed is what was kept
    code, _, _ = run("inspect", "-m", models["llama"], "--ids", IDS, "--no-record")
    assert code == 0
    code, _, _ = run("attention", "-m", models["llama"], "--ids", IDS, "--layer", "9")  # out of range
    assert code == 2
    with RunStore() as store:
        assert store.count() == before + 2
        assert store.get("last")["status"] == "failed"


def test_the_model_may_come_first_as_in_lmlab_shapes_MODEL_prompt(run, tmp_path):
    from tiny import save_char_tokenizer

    tokenizer_dir = tmp_path / "with-tokenizer"
    make_tiny("llama", tokenizer_dir)
    save_char_tokenizer(tokenizer_dir)
    code, out, _ = run("shapes", tokenizer_dir, "abc", "--json")
    assert code == 0 and json.loads(out)
    code, _, err = run("inspect", tokenizer_dir, "abc", "extra")
    assert code == 2 and "put the prompt in quotes" in err


def test_inspect_json_names_its_run(run, models):
    from lmlab.runs import RunStore

    code, out, _ = run("inspect", "-m", models["llama"], "--ids", IDS, "--json")
    assert code == 0
    with RunStore() as store:
        assert json.loads(out)["run_id"] == store.get("last")["id"]
    code, out, _ = run("inspect", "-m", models["llama"], "--ids", IDS, "--json", "--no-record")
    assert code == 0 and json.loads(out)["run_id"] is None


def test_the_stats_line_names_the_model_not_its_repr(run, models):
    code, _, err = run("inspect", "-m", models["llama"], "--ids", IDS)
    assert code == 0 and "LM(" not in err and "loaded in" in err


def test_print_shows_the_tables(models, capsys):
    import lmlab
    from lmlab.inspect import AblateHeads, effect

    lm = lmlab.load(models["llama"])
    _, cache = lm.run_with_cache([1, 5, 9, 33], names=["blocks.*.attn.pattern"])
    print(cache.attention(1, 3))
    out = capsys.readouterr().out
    assert out.startswith("attention pattern, layer 1, head 3") and " 100" in out and "object at" not in out
    assert repr(cache.attention(1, 3)) == "AttentionPattern(layer 1, head 3, 4 tokens)"
    eff = effect(lm, [1, 5, 9, 33], AblateHeads("1.*"))
    assert "Δlog p" in str(eff) and "KL (nats)" in str(eff)
    # Δlog p is the change of log p(base top token); Δlogit (the raw logit) is kept beside it
    for r in eff.rows():
        assert r["dlogp"] == pytest.approx(math.log(r["base_prob"] + r["dprob"]) - math.log(r["base_prob"]), abs=1e-4)
        assert "dlogit" in r
