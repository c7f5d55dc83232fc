"""`lmlab generate` end to end on a tiny model: output, JSON, batches, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmlab.cli.main import main
from tiny import FP32_TIE, assert_same_greedy, make_tiny, near_ties, save_char_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny("llama", d)
    save_char_tokenizer(d)
    return d


def test_json_output_and_stats_on_stderr(tiny_dir, capsys):
    capsys.readouterr()
    code = main(
        [
            "generate",
            "hello",
            "-m",
            str(tiny_dir),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
            "--alternatives",
            "2",
            "--no-record",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)  # stdout is pure JSON
    r = data["results"][0]
    assert len(r["token_ids"]) == 6 and len(r["alternatives"][0]) == 2
    assert data["timings"]["decode_tok_s"] > 0


def test_a_weights_file_of_a_hf_folder_names_the_folder(tiny_dir, tmp_path, capsys):
    weights = sorted(tiny_dir.glob("*.safetensors"))[0]
    outs = []
    for model in (tiny_dir, weights):
        argv = ["generate", "hello", "-m", str(model), "--max-new-tokens", "4", "--temperature", "0", "--json"]
        assert main([*argv, "--no-record"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["results"][0]["token_ids"])
    assert outs[0] == outs[1]
    alone = tmp_path / "alone.safetensors"  # no config.json beside it: one sentence
    alone.write_bytes(weights.read_bytes())
    assert main(["generate", "hello", "-m", str(alone), "--no-record"]) == 2
    assert "is not a model lmlab can read" in capsys.readouterr().err


def test_prompts_file_runs_as_a_batch(tiny_dir, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo two\n\nthree three three\n")
    capsys.readouterr()
    code = main(
        [
            "generate",
            "--prompts",
            str(f),
            "-m",
            str(tiny_dir),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
            "--no-record",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [r["prompt"] for r in json.loads(out)["results"]] == ["one", "two two", "three three three"]


@pytest.mark.parametrize(
    "flag, value, word",
    [
        ("--top-p", "1.5", "top_p"),
        ("--temperature", "-1", "temperature"),
        ("--top-k", "-3", "top_k"),
        ("--max-new-tokens", "0", "max_new_tokens"),
    ],
)
def test_bad_sampling_flags(tiny_dir, capsys, flag, value, word):
    capsys.readouterr()
    code = main(["generate", "hi", "-m", str(tiny_dir), flag, value, "--no-record"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and word in err and "\n" not in err and err.startswith("error:")


def test_ctrl_c_while_streaming_keeps_the_text_and_exits_130(tmp_path):
    tiny_dir = tmp_path / "long"
    make_tiny("llama", tiny_dir, max_position_embeddings=200_000)  # a run long enough to interrupt
    save_char_tokenizer(tiny_dir)
    env = {**os.environ, "LMLAB_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    # --ignore-eos: only --max-new-tokens can end this run, so it cannot finish before the SIGINT
    # whatever token the sampler draws. (Without it, seed 1 drew the random model's EOS at token
    # 187 on AMD Zen 4 but not on Intel: the sampled path depends on the CPU's float rounding.)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmlab.cli.main",
            "generate",
            "once",
            "-m",
            str(tiny_dir),
            "--stream",
            "--max-new-tokens",
            "100000",
            "--ignore-eos",
            "--temperature",
            "1",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # as a terminal starts it: SIGINT at its default. A suite started in the background by a
        # shell without job control inherits SIGINT ignored, and so would the child (Python then
        # installs no KeyboardInterrupt), which would outlive the signal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.set_blocking(proc.stdout.fileno(), False)
    got, deadline = b"", time.time() + 60
    while len(got) < 20 and time.time() < deadline:  # wait until text is streaming, not a fixed sleep
        try:
            chunk = os.read(proc.stdout.fileno(), 4096)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        if not chunk:  # EOF: the process ended on its own (the assertions below say how)
            break
        got += chunk
    if proc.poll() is not None:  # it ended by itself: say how
        pytest.fail(f"the run ended (exit {proc.returncode}) before it was interrupted: {proc.stderr.read().decode()}")
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    assert len(got + rest) >= 20  # bytes streamed before the interrupt are all there
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "decode" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A tiny model with room for a fake-chat transcript (one character per token)."""
    d = tmp_path_factory.mktemp("tiny_long")
    make_tiny("llama", d, max_position_embeddings=1024)
    save_char_tokenizer(d)
    return d


def test_chat_keeps_history_reuses_the_cache_and_takes_commands(long_dir, capfd, monkeypatch, home):
    lines = iter(["hello", "/set temperature 0", "and again", "/reset", "third", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(long_dir), "--max-new-tokens", "5", "--no-record"]) == 0
    captured = capfd.readouterr()
    assert captured.out.count("bot> ") == 3
    err = " ".join(captured.err.split())  # the stats line may wrap
    assert "temperature = 0.0" in err and "history cleared" in err
    stats = [s for s in err.split("prompt ")[1:] if " tok" in s]
    assert len(stats) == 3
    # the second turn's prompt starts with the first turn's: its keys/values are not recomputed
    assert "cached" not in stats[0].split("·")[0]
    assert "cached)" in stats[1].split("·")[0]
    assert "cached" not in stats[2].split("·")[0]  # /reset dropped the cache with the history


def test_a_reused_cache_gives_what_a_fresh_prefill_gives(tiny_dir):
    import lmlab
    from lmlab.engine.generate import Generation

    lm = lmlab.load(tiny_dir)

    def run(text, reuse=None, n=8):
        g = Generation(lm, text, max_new_tokens=n, temperature=0, ignore_eos=True, reuse=reuse, alternatives=3)
        events = list(g.events())
        return [e.id for e in events], g, near_ties([e.alternatives for e in events], FP32_TIE)

    # A reused cache and a fresh prefill compute the same logits to float rounding (1e-6 apart),
    # so the greedy tokens must match except at a near-tie (FP32_TIE, see tiny.py). The text is
    # chosen to have none: the smallest top-2 logit gap of these runs is 4.8e-3. (The earlier
    # "... and then the dog, much later, sat down too" had a gap of 9.9e-5 at its first
    # generated token, within rounding of a tie on another CPU.)
    first, g1, _ = run("The cat sat on")
    follow = "The cat sat on" + lm.decode(first) + " and then, much later, the dog sat down too"
    fresh, _, ties = run(follow, n=30)
    reused, g2, _ = run(follow, g1.kv_state, n=30)  # needs more slots than the first call had: the cache grows
    assert_same_greedy(fresh, reused, ties, "reused cache vs fresh prefill")
    assert g2.stats.cached_prompt_tokens == len(lm.encode("The cat sat on")) + len(first) - 1
    other, g3, _ = run("Something else entirely", g2.kv_state)  # no common prefix: a plain prefill
    plain, _, ties = run("Something else entirely")
    assert_same_greedy(plain, other, ties, "after an unrelated cache vs plain prefill")
    assert g3.stats.cached_prompt_tokens == 0


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(long_dir, capfd, monkeypatch, home):
    long = "a long message " * 20  # 300 characters, one token each: the 1024-token context fills by turn 3
    lines = iter([long, long, long, long, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(long_dir), "--max-new-tokens", "5", "--no-record", "--temperature", "0"]) == 0
    captured = capfd.readouterr()
    assert captured.out.count("bot> ") == 4  # every turn answered
    err = " ".join(captured.err.split())
    assert "to fit the 1024-token context" in err and "error" not in err
