"""What the terminal shows, exactly: redirected text byte for byte, stats lines that break only
between figures, --version and --help, and one sentence with exit 2 for each bad input."""

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

import lmlab
import lmlab.cli.common as common
from lmlab.cli.main import main
from tiny import make_tiny, save_char_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama with a one-character-per-token tokenizer and room for long outputs."""
    d = tmp_path_factory.mktemp("tiny_out")
    make_tiny("llama", d, max_position_embeddings=1024)
    save_char_tokenizer(d)
    return d


def lmlab_process(*argv, stdout=subprocess.PIPE, home=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMLAB_NATIVE": "0"}
    env.pop("COLUMNS", None)
    if home is not None:
        env["LMLAB_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "lmlab.cli.main", *map(str, argv)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
        timeout=300,
    )


def test_redirected_output_is_the_generated_text_byte_for_byte(tiny_dir, tmp_path):
    # 250 tokens of one character each: past the 160 columns rich used to break lines at
    args = ["generate", "The cat sat", "-m", tiny_dir, "-t", "250", "--ignore-eos", "--seed", "3", "--no-record"]
    args += ["--temperature", "1"]
    proc = lmlab_process(*args, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    text = json.loads(proc.stdout)["results"][0]["text"]
    assert len(text) >= 200
    out_file = tmp_path / "out.txt"
    with open(out_file, "wb") as f:
        proc = lmlab_process(*args, stdout=f)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out_file.read_bytes() == (text + "\n").encode("utf-8")  # the text, then one newline
    # the stats on stderr: one line when stderr is not a terminal, whatever its length
    stats = [line for line in proc.stderr.decode().splitlines() if "tok/s" in line]
    assert len(stats) == 1 and "prefill" in stats[0] and "decode" in stats[0]


def test_stats_line_breaks_only_between_figures(monkeypatch, capsys):
    parts = ["load 9.21 s", "prompt 35 tok", "generated 10 tok", "TTFT 120 ms", "prefill 292 tok/s"]
    parts += ["decode 31.6 tok/s", "peak mem 866 MiB"]
    narrow = Console(stderr=True, width=40, force_terminal=True, color_system=None)
    monkeypatch.setattr(common, "err", narrow)
    common.print_stats(parts)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    joined = " · ".join(line.removeprefix("· ") for line in lines)
    assert [p.strip() for p in joined.split(" · ")] == parts  # every figure whole, on one line


def test_decode_rate_without_a_decode_step_is_a_dash(tiny_dir, capsys):
    assert main(["generate", "hi", "-m", str(tiny_dir), "-t", "1", "--ignore-eos", "--no-record"]) == 0
    err = capsys.readouterr().err
    assert "decode – tok/s" in err and "decode 0.0" not in err


def test_streamed_runs_record_why_they_stopped(tiny_dir, capsys, home):
    from lmlab.runs import RunStore

    args = ["generate", "hi", "-m", str(tiny_dir), "-t", "5", "--ignore-eos", "--stream"]
    assert main(args) == 0
    with RunStore() as store:
        run = store.get("last")
    assert run["outputs"]["finish_reasons"] == ["length"]
    assert len(run["outputs"]["token_ids"][0]) == 5


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmlab {lmlab.__version__} (python {sys.version.split()[0]})"


@pytest.mark.parametrize("command", [["generate"], ["inspect"], ["steer"], ["runs", "list"], ["bench"], []])
def test_help_shows_plain_types(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out
    for python_type in ("<bool>", "<list[str]>", "<str>", "<int>", "<float>"):
        assert python_type not in out


# ----------------------------------------------------------------------------- bad input: one sentence, exit 2


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "please report it" not in lines[0]
    return lines[0]


def test_a_binary_prompts_file(tiny_dir, tmp_path, capsys):
    f = tmp_path / "prompts.bin"
    f.write_bytes(bytes(range(256)) * 4)
    assert main(["generate", "--prompts", str(f), "-m", str(tiny_dir), "--no-record"]) == 2
    assert "is not UTF-8 text" in one_error(capsys.readouterr().err)


def test_a_prompts_file_with_nul_bytes(tiny_dir, tmp_path, capsys):
    f = tmp_path / "prompts.dat"
    f.write_bytes(b"hello\x00\x00\x01world\n")
    assert main(["generate", "--prompts", str(f), "-m", str(tiny_dir), "--no-record"]) == 2
    assert "is binary, not text" in one_error(capsys.readouterr().err)


def test_a_prompts_folder(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--prompts", str(tmp_path), "-m", str(tiny_dir), "--no-record"]) == 2
    assert "is a folder; pass a text file" in one_error(capsys.readouterr().err)


def test_a_prompts_file_and_a_prompt(tiny_dir, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo\n")
    assert main(["generate", "--prompts", str(f), "hi", "-m", str(tiny_dir), "--no-record"]) == 2
    assert "pass one or the other" in one_error(capsys.readouterr().err)


def test_an_unquoted_prompt_gets_a_hint(tiny_dir, capsys):
    assert main(["generate", "The", "cat", "sat", "-m", str(tiny_dir), "--no-record"]) == 2
    line = one_error(capsys.readouterr().err)
    assert "put the prompt in quotes" in line and 'lmlab generate "The cat sat"' in line


def test_chat_on_a_model_without_a_chat_template(tiny_dir, capsys):
    assert main(["generate", "hi", "--chat", "-m", str(tiny_dir), "--no-record"]) == 2
    line = one_error(capsys.readouterr().err)
    assert "has no chat template" in line and "--fake-chat" in line and "--format" not in line


def test_ctrl_c_while_the_model_loads(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmlab, "load", interrupted)
    assert main(["generate", "hi", "--no-record"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted while loading smollm2-135m; nothing was run."


def test_a_read_only_home_says_once_that_the_native_step_is_off(tiny_dir, monkeypatch, capsys):
    from lmlab import native

    monkeypatch.setattr(native, "status", lambda: "off: could not build or load /ro/native/x.so (Permission denied)")
    monkeypatch.setattr(common, "_NATIVE_NOTED", False)
    for _ in range(2):
        assert main(["generate", "hi", "-m", str(tiny_dir), "-t", "2", "--no-record"]) == 0
    err = capsys.readouterr().err
    assert err.count("the native decoding step is off") == 1 and "LMLAB_HOME" in err


# ----------------------------------------------------------------------------- tables at 100 columns


def fits(out: str, width: int = 100) -> str:
    assert out.strip() and max(len(line) for line in out.splitlines()) <= width
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    return out


def test_models_and_info_fit_100_columns(tiny_dir, monkeypatch, capsys):
    from lmlab.config import ALIASES

    monkeypatch.setenv("COLUMNS", "100")
    assert main(["models"]) == 0
    out = fits(capsys.readouterr().out)
    column = "".join(out.split())
    assert all(a.name in out and "".join(a.hub_id.split()) in column for a in ALIASES.values())
    assert main(["info", str(tiny_dir)]) == 0
    card = fits(capsys.readouterr().out)
    assert main(["info", "-m", str(tiny_dir)]) == 0  # README: every command that runs a model takes -m
    assert capsys.readouterr().out == card


def test_the_model_as_first_argument_or_m_but_not_two_different_ones(tiny_dir, capsys):
    for argv in (
        ["info", "smollm2-135m", "-m", str(tiny_dir)],
        ["quantize", "gpt2", "-m", str(tiny_dir), "-o", "x.gguf"],
        ["eval", "perplexity", "gpt2", "-m", str(tiny_dir), "--data", "x.txt"],
        ["finetune", "gpt2", "-m", str(tiny_dir), "--data", "x.jsonl"],
        ["lora", "merge", "gpt2", "ad", "-m", str(tiny_dir), "-o", "out"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: two models were given") and err.endswith("pass one."), (argv, err)
    assert main(["info"]) == 2
    assert "lmlab info MODEL (or -m MODEL)" in capsys.readouterr().err
    for argv in (["lora", "merge", "-m", str(tiny_dir), "-o", "out"], ["lora", "merge", "-o", "out"]):
        assert main(argv) == 2, argv
        assert "name the base model and the adapter folder" in capsys.readouterr().err, argv


def test_the_bench_table_splits_rather_than_cuts_at_100_columns():
    from lmlab.cli.bench import points_table
    from lmlab.inspect.display import as_text

    point = dict(
        engine="lmlab", dtype="float32", quant="none", batch=1, prompt_len=64, new_tokens=64, ttft_ms=109.0,
        prefill_tok_s=589.0, decode_tok_s=43.8, decode_tok_s_median=43.7, p50_ms=22.8, p95_ms=24.3,
        peak_mem_bytes=985e6, kv_cache_bytes=6e6, bandwidth_gb_s=23.8, bandwidth_pct=80.0, flops_pct=34.8,
        ratio_vs_hf=1.70, ratio_vs_llama_cpp=0.51,
    )  # fmt: skip
    peer = {**point, "engine": "hf", "decode_tok_s": 25.8}
    table = points_table([point, peer], ["hf", "llama.cpp"])
    wide = as_text(table, width=160)
    assert wide.startswith("lmlab bench ") and "memory and roofline" not in wide  # fits 160: one table
    narrow = fits(as_text(table, width=100))
    assert "lmlab bench: speed" in narrow and "lmlab bench: latency, memory and roofline" in narrow
    for figure in ("109", "589", "43.8", "22.8/24.3", "985 MB", "6 MB", "23.8", "80%", "34.8%", "1.70×", "0.51×"):
        assert figure in narrow, figure
    assert narrow.count("hf ") >= 2  # the peer's row in both tables
