"""`lmlab bench` on a tiny random model: the points a sweep produces, its JSON, plots, the
machine cache and every bad input. Nothing here asserts a speed: timings are only checked to
be sane (positive, p95 >= p50), never compared with a number."""

import json
import sys

import pytest
import torch

from lmlab.bench import machine as machine_mod
from lmlab.bench.machine import MACHINE_FILE, host_key, machine_limits
from lmlab.bench.runner import weight_bytes_per_step
from lmlab.bench.sweep import SweepSpec, bench_prompts, estimate_memory, parse_int_list, run_sweep
from lmlab.engine.cache import kv_bytes_per_token
from lmlab.errors import LmlabError
from lmlab.host import host_details
from tiny import make_tiny, save_char_tokenizer

BANDWIDTH_GB_S = 10.0
PEAKS = {"float32": 100.0, "bfloat16": 400.0, "float16": 50.0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bench")
    make_tiny("llama", d)
    return d


def fake_entry(threads):
    return {
        "host": host_details("cpu", threads),
        "matvec_gb_s": BANDWIDTH_GB_S,
        "copy_gb_s": 12.0,
        "read_gb_s": 11.0,
        "bandwidth_test_bytes": 1 << 30,
        "matmul_gflops": dict(PEAKS),
        "bandwidth_gb_s": BANDWIDTH_GB_S,
        "threads": threads,
        "measured_at": "2024-01-01T00:00:00+00:00",
    }


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh LMLAB_HOME whose machine.json is written by hand; measuring for real is an error."""
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    threads = torch.get_num_threads()
    entry = fake_entry(threads)
    (tmp_path / MACHINE_FILE).write_text(
        json.dumps({"schema": machine_mod.SCHEMA, "entries": {host_key(entry["host"]): entry}})
    )

    def no_measuring(*a, **k):
        raise AssertionError("the sweep measured the machine although machine.json had this host")

    monkeypatch.setattr(machine_mod, "measure_machine", no_measuring)
    return tmp_path


@pytest.fixture(scope="module")
def sweep(tiny_dir, tmp_path_factory):
    """One small sweep against the hf peer, shared by the tests that read its points."""
    import os

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("LMLAB_HOME")
    os.environ["LMLAB_HOME"] = str(home)
    threads = torch.get_num_threads()
    entry = fake_entry(1)  # one thread: a tiny model gains nothing from more, and a busy machine stalls them
    (home / MACHINE_FILE).write_text(
        json.dumps({"schema": machine_mod.SCHEMA, "entries": {host_key(entry["host"]): entry}})
    )
    try:
        spec = SweepSpec(
            str(tiny_dir),
            batches=[1, 2],
            prompt_lens=[4, 9],
            new_tokens=[5],
            dtypes=["float32", "bfloat16"],
            peers=["hf"],
            repeats=2,
            warmup=0,
            threads=1,
        )
        return run_sweep(spec)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("LMLAB_HOME", None)
        else:
            os.environ["LMLAB_HOME"] = old


def test_sweep_gives_every_point_with_sane_fields(sweep):
    pts = sweep["points"]
    got = {(p["engine"], p["dtype"], p["batch"], p["prompt_len"]) for p in pts}
    want = {(e, d, b, p) for e in ("lmlab", "hf") for d in ("float32", "bfloat16") for b in (1, 2) for p in (4, 9)}
    assert got == want and len(pts) == len(want)
    for p in pts:
        assert p["new_tokens"] == 5 and p["repeats"] == 2 and p["decode_steps"] == 4
        assert p["ttft_ms"] > 0 and p["prefill_tok_s"] > 0 and p["decode_tok_s"] > 0
        assert p["decode_tok_s"] >= p["decode_tok_s_median"] > 0  # best >= median
        assert p["ttft_ms"] <= p["ttft_ms_median"]
        assert p["p95_ms"] >= p["p50_ms"] > 0
        assert p["peak_mem_bytes"] > 0
        assert p["bandwidth_gb_s"] > 0
        assert p["bandwidth_pct"] == pytest.approx(100 * p["bandwidth_gb_s"] / BANDWIDTH_GB_S)
        assert p["flops_pct"] == pytest.approx(100 * p["prefill_tflops"] * 1e3 / PEAKS[p["dtype"]])


def test_kv_bytes_and_ratios(sweep, tiny_dir):
    import lmlab

    lm = lmlab.load(tiny_dir)
    for p in sweep["points"]:
        per_token = kv_bytes_per_token(lm.config, getattr(torch, p["dtype"]))
        assert p["kv_cache_bytes"] == per_token * p["batch"] * (p["prompt_len"] + p["new_tokens"])
        if p["engine"] == "lmlab":
            hf = next(
                q
                for q in sweep["points"]
                if q["engine"] == "hf"
                and q["dtype"] == p["dtype"]
                and q["batch"] == p["batch"]
                and q["prompt_len"] == p["prompt_len"]
            )
            assert p["ratio_vs_hf"] == pytest.approx(p["decode_tok_s"] / hf["decode_tok_s"])
            assert p["ratio_vs_hf_prefill"] == pytest.approx(p["prefill_tok_s"] / hf["prefill_tok_s"])
    # bytes per step: every weight once; this tiny model has an untied input embedding, only gathered
    fp32 = next(p for p in sweep["points"] if p["engine"] == "lmlab" and p["dtype"] == "float32")
    embed = lm.model.tok_embed.weight
    assert fp32["weight_bytes_per_step"] == weight_bytes_per_step(lm.model) == lm.weight_bytes - embed.numel() * 4


def test_plots_are_written(sweep, tmp_path):
    from lmlab.bench.plots import write_plots

    paths = write_plots(sweep["points"], sweep["machine"], tmp_path / "plots", title="tiny")
    names = {p.name for p in paths}
    for stem in ("tokens_vs_batch", "memory_vs_length", "roofline"):
        for ext in ("png", "svg"):
            f = tmp_path / "plots" / f"{stem}.{ext}"
            assert f.name in names and f.stat().st_size > 1000
    assert (tmp_path / "plots" / "roofline.svg").read_text().lstrip().startswith("<?xml")


def test_cli_json_parses_and_writes_plots(tiny_dir, home, tmp_path, capsys, monkeypatch):
    from lmlab.cli import main as cli

    if "bench" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "bench"])
    capsys.readouterr()
    code = cli.main(
        [
            "bench",
            "-m",
            str(tiny_dir),
            "--batch",
            "1,2",
            "--prompt-len",
            "6",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            "--plots",
            str(tmp_path / "p"),
            "--no-record",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert [p["batch"] for p in data["points"]] == [1, 2]
    assert data["machine"]["bandwidth_gb_s"] == BANDWIDTH_GB_S
    assert (tmp_path / "p" / "roofline.png").stat().st_size > 0


def test_cli_table_on_stdout(tiny_dir, home, capsys, monkeypatch):
    from lmlab.cli import main as cli

    if "bench" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "bench"])
    capsys.readouterr()
    code = cli.main(
        [
            "bench",
            "-m",
            str(tiny_dir),
            "--prompt-len",
            "5",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-record",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "lmlab" in out and "TTFT" in out and "float32" in out
    assert "machine:" in err  # the limits the percentages are relative to


def test_bench_prompts_are_real_text_of_exact_length(tmp_path):
    import lmlab

    make_tiny("llama", tmp_path)
    save_char_tokenizer(tmp_path)
    lm = lmlab.load(tmp_path)
    rows = bench_prompts(lm, 3, 20)
    assert [len(r) for r in rows] == [20, 20, 20]
    assert len({tuple(r) for r in rows}) == 3  # each row a different stretch of text
    assert any(c.isalpha() for c in lm.decode(rows[0]))


# ----------------------------------------------------------------------------- bad input


def test_a_point_too_big_for_memory_is_refused_before_it_starts(tiny_dir, home):
    with pytest.raises(
        LmlabError,
        match=r"batch 10000000 × prompt 100 .*needs about .* GB \(weights .* \+ KV cache .* \+ "
        r"activations .*\) but .* is available; lower --batch or --prompt-len\.",
    ):
        run_sweep(SweepSpec(str(tiny_dir), batches=[1, 10_000_000], prompt_lens=[100], new_tokens=[8]))


def test_memory_estimate_adds_up(tiny_dir):
    import lmlab

    lm = lmlab.load(tiny_dir)
    est = estimate_memory(lm.config, lm.weight_bytes, torch.float32, 4, 64, 16)
    assert est["kv_cache"] == kv_bytes_per_token(lm.config, torch.float32) * 4 * 80
    assert est["total"] == est["weights"] + est["kv_cache"] + est["activations"]


def test_a_point_longer_than_the_context(tiny_dir, home):
    with pytest.raises(
        LmlabError, match=r"prompt 200 \+ 8 new tokens = 208 tokens is longer than this model's context of 128"
    ):
        run_sweep(SweepSpec(str(tiny_dir), prompt_lens=[200], new_tokens=[8]))


def test_quant_int8_is_not_available_yet(tiny_dir, home):
    with pytest.raises(
        LmlabError, match=r"^quantization 'int8' is not available; --quant takes none, native, q8, q4\.$"
    ):
        run_sweep(SweepSpec(str(tiny_dir), quant="int8"))


def test_missing_peer_says_how_to_install(tiny_dir, home, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(LmlabError, match=r"llama-cpp-python is not installed; pip install 'lmlab\[llamacpp\]'"):
        run_sweep(SweepSpec(str(tiny_dir), peers=["llama.cpp"]))


def test_llama_cpp_peer_needs_a_gguf(tiny_dir, home, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # "installed"
    with pytest.raises(LmlabError, match="runs GGUF files only"):
        run_sweep(SweepSpec(str(tiny_dir), peers=["llama.cpp"]))


@pytest.mark.parametrize("text", ["1;4", "a,b", "0", "4,-1", ""])
def test_bad_list_syntax(text):
    with pytest.raises(LmlabError, match=r"--batch takes a comma-separated list of positive integers like 1,4,16"):
        parse_int_list("--batch", text)


def test_bad_input_on_the_command_line(tiny_dir, home, capsys, monkeypatch):
    from lmlab.cli import main as cli

    if "bench" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "bench"])
    for args, sentence in [
        (["--prompt-len", "64;512"], "--prompt-len takes a comma-separated list"),
        (["--quant", "int8"], "quantization 'int8' is not available"),
        (["--dtype", "float33"], "unknown dtype 'float33'"),
        (["--peer", "vllm"], "unknown peer 'vllm'"),
    ]:
        capsys.readouterr()
        code = cli.main(["bench", "-m", str(tiny_dir), "--no-record", *args])
        _, err = capsys.readouterr()
        assert code == 2 and sentence in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the machine cache


def test_machine_numbers_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    calls = []

    def fake_measure(device="cpu", threads=None):
        calls.append((str(device), threads))
        return fake_entry(threads or torch.get_num_threads())

    monkeypatch.setattr(machine_mod, "measure_machine", fake_measure)
    said = []
    a = machine_limits("cpu", on_measure=said.append)
    b = machine_limits("cpu", on_measure=said.append)
    assert len(calls) == 1 and len(said) == 1 and "measuring" in said[0]
    assert a == b and a["bandwidth_gb_s"] == BANDWIDTH_GB_S
    data = json.loads((tmp_path / MACHINE_FILE).read_text())
    assert host_key(host_details("cpu")) in data["entries"]
    machine_limits("cpu", remeasure=True)  # --machine measures again
    assert len(calls) == 2
    other = torch.get_num_threads() + 1  # another thread count is another entry
    machine_limits("cpu", threads=other)
    assert len(calls) == 3 and len(json.loads((tmp_path / MACHINE_FILE).read_text())["entries"]) == 2


def test_an_entry_of_an_older_schema_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    old = fake_entry(torch.get_num_threads())
    (tmp_path / MACHINE_FILE).write_text(json.dumps({"schema": 1, "entries": {host_key(old["host"]): old}}))
    calls = []
    monkeypatch.setattr(
        machine_mod, "measure_machine", lambda *a, **k: calls.append(1) or fake_entry(torch.get_num_threads())
    )
    machine_limits("cpu")
    assert calls == [1] and json.loads((tmp_path / MACHINE_FILE).read_text())["schema"] == machine_mod.SCHEMA


def test_bandwidth_is_the_fastest_of_the_mat_vec_kernels(monkeypatch):
    from lmlab import kernels, native

    bw = machine_mod.measure_bandwidth("cpu", nbytes=16 << 20)
    assert bw["matvec_gb_s"] > 0 and bw["read_gb_s"] > 0
    if kernels.prepack_supported(torch.float32, "cpu"):
        assert bw["onednn_matvec_gb_s"] > 0
    assert (bw["native_matvec_gb_s"] or 0) > 0 if native.available() else bw["native_matvec_gb_s"] is None
    faster = max(bw["matvec_gb_s"], bw["onednn_matvec_gb_s"] or 0.0, bw["native_matvec_gb_s"] or 0.0)
    monkeypatch.setattr(machine_mod, "measure_bandwidth", lambda device="cpu": dict(bw))
    monkeypatch.setattr(machine_mod, "measure_matmul", lambda device="cpu": {})
    assert machine_mod.measure_machine("cpu")["bandwidth_gb_s"] == faster


def test_a_bench_never_stops_at_eos_and_restores_it(tiny_dir):
    import lmlab
    from lmlab.bench.sweep import LmlabRunner

    lm = lmlab.load(tiny_dir)
    every = list(range(lm.config.vocab_size))
    lm.config.eos_token_ids = every  # any token ends a normal generation at once
    assert len(lm.generate([5, 6, 7], max_new_tokens=6, temperature=0).token_ids) == 1
    trial = LmlabRunner(lm).trial([[5, 6, 7], [8, 9, 10]], 6)
    assert len(trial.stamps) == 6 and trial.decode_steps == 5
    assert lm.config.eos_token_ids == every


def crashing_llama_worker(conn, *args):
    """Stands in for llama.cpp's child process: ready, then dies of SIGSEGV on the first request."""
    import ctypes

    conn.send(("ok", None))
    conn.recv()
    ctypes.string_at(0)


def test_a_llama_cpp_crash_is_one_sentence_not_a_dead_sweep(tmp_path, monkeypatch):
    import types

    import gguf
    import numpy as np

    from lmlab.bench import peers

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("output.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(peers, "_llama_worker", crashing_llama_worker)
    runner = peers.LlamaCppRunner(types.SimpleNamespace(kind="gguf", path=path), 1, None, 64, "cpu")
    try:
        assert runner.weight_bytes == 8 * 4 * 4 and runner.dtype == "F32"
        with pytest.raises(LmlabError, match=r"llama.cpp crashed \(signal SIGSEGV\) running tiny.gguf; .*reinstall it"):
            runner.trial([[1, 2, 3]], 4)
    finally:
        runner.close()


def test_llama_cpp_rows_name_the_files_own_quantization():
    from bundled import gemma3_gguf_path, smollm2_gguf_path
    from lmlab.bench.peers import gguf_facts

    # Gemma's file is Q4_K_M although its biggest tensor (the tied embedding) is Q8_0
    assert gguf_facts(gemma3_gguf_path())["quant"] == "Q4_K_M"
    facts = gguf_facts(smollm2_gguf_path())
    assert facts["quant"] == "Q4_1" and 90e6 < facts["weight_bytes"] < 100e6


def test_the_machine_table_says_which_decoding_step_runs(monkeypatch):
    from rich.console import Console

    from lmlab import native
    from lmlab.cli.bench import machine_table

    entry = {
        "host": host_details("cpu"),
        "threads": 2,
        "bandwidth_gb_s": 20.0,
        "bandwidth_test_bytes": 1 << 30,
        "matvec_gb_s": 20.0,
        "copy_gb_s": 30.0,
        "read_gb_s": 25.0,
        "matmul_gflops": {"float32": 100.0},
        "measured_at": "2026-12-05T00:00:00+00:00",
    }
    console = Console(record=True, width=200)
    console.print(machine_table(entry))
    text = console.export_text()
    want = "native (lmlab.native): on" if native.available() else "PyTorch (model.py): native code off"
    assert "decoding step" in text and want in text
