"""lmlab train: the output folder loads in transformers with the same logits, a run killed with
SIGKILL resumes onto the same loss curve, two DDP processes (and two threads splitting the rows)
match one, Ctrl-C saves and says how to resume, and bad input gets one sentence.

Models here are tiny (1-2 layers, 32 wide) and runs short, so the file takes well under two
minutes on 2 shared cores. Subprocesses run with one thread: the runs compare losses exactly,
and tiny matmuls are faster on one thread than two on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from lmlab.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--n-layers",
    "2",
    "--d-model",
    "32",
    "--n-heads",
    "2",
    "--block-size",
    "32",
    "--batch-size",
    "8",
    "--dtype",
    "float32",
    "--eval-iters",
    "2",
    "--sample-tokens",
    "16",
    "--no-progress",
]


def seed_machine(home: Path) -> None:
    """A machine.json in ``home`` for 1 and 2 threads, so MFU needs no 10-second measurement."""
    from lmlab.bench.machine import SCHEMA, host_key
    from lmlab.host import host_details

    entry = {"matmul_gflops": {"float32": 300.0, "bfloat16": 1200.0, "float16": 150.0}, "bandwidth_gb_s": 20.0}
    entries = {host_key(host_details("cpu", t)): entry for t in (1, 2, torch.get_num_threads())}
    home.mkdir(parents=True, exist_ok=True)
    (home / "machine.json").write_text(json.dumps({"schema": SCHEMA, "entries": entries}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 40 KB of real text every machine has: three standard library modules."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in ("textwrap", "shlex", "glob")))
    return path


@pytest.fixture()
def env(home) -> dict:
    seed_machine(home)
    e = {**os.environ, "LMLAB_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    e.pop("LMLAB_WANDB", None)
    return e


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(env, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmlab.cli.main", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def summary_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def train_losses(summary: dict) -> dict[int, float]:
    return {p["step"]: p["train_loss"] for p in summary["points"] if "train_loss" in p}


# ----------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_output_folder_loads_in_lmlab_and_transformers_with_the_same_logits(arch, corpus, home, one_thread):
    import transformers

    import lmlab
    from lmlab.train import TrainConfig, train

    seed_machine(home)
    out = home / f"out-{arch}"
    tc = TrainConfig(
        data=str(corpus),
        arch=arch,
        n_layers=2,
        d_model=32,
        n_heads=2,
        block_size=32,
        batch_size=8,
        steps=12,
        eval_every=6,
        eval_iters=2,
        sample_every=0,
        sample_tokens=8,
        dtype="float32",
        out=str(out),
    )
    summary = train(tc, record=False, log=lambda m: None)
    assert summary["steps"] == 12 and summary["val_loss"] < summary["points"][0]["val_loss"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoint.pt"} <= {p.name for p in out.iterdir()}

    lm = lmlab.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    text = "def wrap(text, w=7):\n    return"  # within the 32-token block
    ids = lm.tokenizer.encode(text)
    assert lm.tokenizer.decode(ids) == text  # the char tokenizer round-trips through tokenizer.json
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    ours = lm(ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    # the trained weights are what was trained: the checkpoint's model gives the same logits
    from lmlab.model import Transformer
    from lmlab.train.checkpoint import load_checkpoint

    state = load_checkpoint(out)
    raw = Transformer(lm.config)
    raw.load_state_dict(state["model"])
    with torch.no_grad():
        assert (raw(torch.tensor([ids])) - ours).abs().max().item() < 1e-5
    assert lm.generate("def ", max_new_tokens=5, temperature=0).text  # lmlab generate -m ./out works


# ----------------------------------------------------------------------------- resume


def test_resume_after_kill9_gives_the_same_losses_as_an_uninterrupted_run(corpus, env, tmp_path):
    args = [
        *TINY,
        "--data",
        str(corpus),
        "--steps",
        "120",
        "--save-every",
        "20",
        "--eval-every",
        "60",
        "--log-every",
        "5",
        "--sample-every",
        "0",
        "--json",
    ]
    full = summary_of(cli(env, *args, "--out", str(tmp_path / "full")))

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.cli.main", "train", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed between two checkpoints"
    saved_step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < saved_step < 120 and not (out / "model.safetensors").exists()

    resumed = summary_of(cli(env, "--resume", str(out), "--json"))
    assert resumed["steps"] == 120
    a, b = train_losses(full), train_losses(resumed)
    after = [s for s in a if s > saved_step]
    assert after and all(b[s] == a[s] for s in after), [(s, a[s], b.get(s)) for s in after if b.get(s) != a[s]]
    assert resumed["val_loss"] == full["val_loss"]


def test_resume_refuses_another_config_and_a_fresh_run_refuses_a_used_folder(
    corpus, home, capsys, one_thread, tmp_path
):
    seed_machine(home)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--steps", "4", "--eval-every", "2", "--out", str(out)]) == 0
    assert "d_model=32" in bad(capsys, "--resume", str(out), "--d-model", "64")
    assert f"--resume {out}" in bad(capsys, *TINY, "--data", str(corpus), "--steps", "4", "--out", str(out))
    assert "no checkpoint" in bad(capsys, "--resume", str(tmp_path / "nothing-here"))


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(corpus, env, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmlab.cli.main",
            "train",
            *TINY,
            "--data",
            str(corpus),
            "--steps",
            "100000",
            "--eval-every",
            "100000",
            "--sample-every",
            "0",
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines = []
    for line in proc.stderr:  # wait until training has started
        lines.append(line)
        if line.startswith("step 0/"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert f"Resume with: lmlab train --resume {out}" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] < 100000
    assert (out / "model.safetensors").exists()  # what was trained so far is a usable model too


# ----------------------------------------------------------------------------- DDP


def test_ddp_two_gloo_processes_and_two_threads_reach_the_loss_of_one_process(corpus, env, tmp_path):
    args = [
        *TINY,
        "--data",
        str(corpus),
        "--steps",
        "20",
        "--eval-every",
        "10",
        "--log-every",
        "5",
        "--sample-every",
        "0",
        "--sample-tokens",
        "0",
        "--json",
        "--no-record",
    ]
    one = summary_of(cli(env, *args, "--out", str(tmp_path / "one")))
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lmlab.cli.main",
            "train",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = json.loads(ddp.stdout)  # rank 0 prints the summary, the other ranks nothing
    assert two["world_size"] == 2 and one["world_size"] == 1
    # and one process whose two threads each take half of every batch's rows (lmlab.train.split)
    proc = cli(env, *args, "--workers", "2", "--out", str(tmp_path / "threads"))
    threads = summary_of(proc)
    assert "rows split over 2 threads (4 rows each)" in proc.stderr
    for other in (two, threads):
        a, b = train_losses(one), train_losses(other)
        assert a.keys() == b.keys()
        for s in a:
            assert abs(a[s] - b[s]) < 1e-4 * abs(a[s]), (s, a[s], b[s])
        assert abs(one["val_loss"] - other["val_loss"]) < 1e-4 * one["val_loss"]
    assert (tmp_path / "two" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- compare, record, report


def test_runs_are_recorded_and_compare_overlays_their_loss_curves(corpus, home, capsys, one_thread, tmp_path):
    seed_machine(home)
    ids = []
    for lr in ("1e-3", "3e-3"):
        code = main(
            [
                "train",
                *TINY,
                "--data",
                str(corpus),
                "--steps",
                "10",
                "--eval-every",
                "5",
                "--lr",
                lr,
                "--out",
                str(tmp_path / lr),
                "--json",
            ]
        )
        assert code == 0
        ids.append(json.loads(capsys.readouterr().out)["run_id"])
    from lmlab.runs import RunStore

    with RunStore() as store:
        run = store.get(ids[0])
    assert run["command"] == "train" and run["status"] == "complete"
    assert run["metrics"]["val_loss"] and run["metrics"]["points"] and run["outputs"]["samples"]
    png = tmp_path / "cmp.png"
    assert main(["train", "--compare", ids[0], ids[1], "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the --out folders name the same runs (the newest train run that wrote each)
    capsys.readouterr()
    folders = [str(tmp_path / "1e-3"), str(tmp_path / "3e-3")]
    assert main(["train", "--compare", *folders, "--plot", str(png), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == ids
    (tmp_path / "empty").mkdir()
    assert main(["train", "--compare", str(tmp_path / "empty"), ids[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no recorded train run wrote") and "run id" in err, err
    from lmlab.runs.report import render_html

    with RunStore() as store:
        page = render_html([store.get(i) for i in ids])
    assert "loss (nats/token)" in page  # the same loss plot is in the HTML report


# ----------------------------------------------------------------------------- bad input


def bad(capsys, *argv) -> str:
    capsys.readouterr()
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after what it said while starting (tokenizing...)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_data_gets_one_sentence(capsys, home, tmp_path):
    seed_machine(home)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "is empty" in bad(capsys, "--data", str(empty), "--no-record")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert "binary" in bad(capsys, "--data", str(binary), "--no-record")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01\x02" * 100)
    assert "no text files" in bad(capsys, "--data", str(folder), "--no-record")
    assert "does not exist" in bad(capsys, "--data", str(tmp_path / "missing.txt"), "--no-record")


def test_bad_sizes_get_one_sentence(capsys, home, corpus, tmp_path):
    seed_machine(home)
    toml = tmp_path / "train.toml"
    toml.write_text("[train]\nn_layer = 4\n")
    assert "unknown key 'n_layer'" in bad(capsys, "--config", str(toml), "--no-record")
    toml.write_text('steps = "five"\n')
    assert "steps must be a whole number, not 'five'" in bad(capsys, "--config", str(toml), "--no-record")
    toml.write_text("compile = 1\n")
    assert "compile must be true or false, not 1" in bad(capsys, "--config", str(toml), "--no-record")
    err = bad(capsys, "--data", str(corpus), "--block-size", "4096", "--arch", "gpt2", "--no-record")
    assert "limit of 1024" in err
    err = bad(capsys, "--data", str(corpus), "--size", "50M", "--batch-size", "100000", "--no-record")
    assert "GiB" in err and "smaller" in err
    assert "unknown --size" in bad(capsys, "--size", "7M", "--no-record")
    assert "--preset and --size" in bad(capsys, "--preset", "nanogpt-baby", "--size", "1M", "--no-record")


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path):
    import errno

    from lmlab.errors import LmlabError
    from lmlab.train.checkpoint import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def full_disk(state, f):
        f.write(b"x" * 1000)  # part of the file goes out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(LmlabError) as e:
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path, writer=full_disk)
    assert "disk is full" in str(e.value) and "previous checkpoint is intact" in str(e.value)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- pieces


def test_schedule_decay_groups_and_tokenizers(corpus):
    from lmlab.model import Transformer
    from lmlab.train.config import TrainConfig, model_config
    from lmlab.train.loop import lr_at, make_optimizer
    from lmlab.train.tokenizing import build_tokenizer

    tc = TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, tc) < lr_at(50, tc) < lr_at(99, tc) <= 1e-3
    assert abs(lr_at(100, tc) - 1e-3) < 1e-9 and abs(lr_at(1000, tc) - 1e-4) < 1e-12
    assert lr_at(550, tc) == pytest.approx((1e-3 + 1e-4) / 2)

    model = Transformer(model_config(TrainConfig(arch="llama", n_layers=1, d_model=32, n_heads=2), 100))
    decay, no_decay = make_optimizer(model, tc, torch.device("cpu")).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0

    text = corpus.read_text()[:5000]
    for spec in ("char", "bytes", "bpe:300"):
        tok = build_tokenizer(spec, [text])
        ids = tok.encode("def f(x):\n    return x  # ünïcode")
        assert tok.decode(ids) == "def f(x):\n    return x  # ünïcode" or spec == "char"
    assert build_tokenizer("bpe:300", [text]).vocab_size == 300


def _tiny_model_and_optimizer(arch: str):
    """A one-layer, 32-wide model (vocabulary 50) with GPT-2's initialisation and lmlab's AdamW, seeded."""
    from lmlab.model import Transformer
    from lmlab.train.config import TrainConfig, model_config
    from lmlab.train.loop import init_weights, make_optimizer

    tc = TrainConfig(arch=arch, n_layers=1, d_model=32, n_heads=2, lr=1e-2)
    torch.manual_seed(0)
    model = Transformer(model_config(tc, 50))
    init_weights(model, 1)
    return model, make_optimizer(model, tc, torch.device("cpu"))


def _loss_of_a_batch(model, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and under the limit
def test_clipping_through_the_fused_adamw_equals_clip_grad_norm(max_norm):
    """lmlab hands the clipping to the fused AdamW as its grad_scale instead of multiplying every
    gradient first: after three steps the parameters equal clip_grad_norm_ + step's within fp32
    rounding (the scale divides where clip_grad_norm_ multiplies; Adam's normalised update carries
    that rounding into the next steps): within 1e-4 of the size of the steps' change."""
    from lmlab.train.loop import clip_gradients

    after = []
    for ours in (True, False):
        model, opt = _tiny_model_and_optimizer("gpt2")
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert opt.defaults["fused"]
        for step in range(3):
            _loss_of_a_batch(model, step).backward()
            if ours:
                clip_gradients(model, opt, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    change = (after[1] - before).abs().max()
    assert (after[0] - after[1]).abs().max() <= 1e-4 * change, ((after[0] - after[1]).abs().max(), change)


def test_the_lean_adamw_step_equals_optimizer_step():
    """``adamw_step`` calls the fused AdamW kernel itself: after three steps (the first through
    ``opt.step()``, which makes the state) the parameters and the optimizer's state equal
    ``opt.step()``'s bit for bit, and the state dict still describes the run."""
    from lmlab.train.loop import adamw_step

    runs = []
    for lean in (True, False):
        model, opt = _tiny_model_and_optimizer("llama")
        for step in range(3):
            for g in opt.param_groups:
                g["lr"] = 1e-2 / (step + 1)
            _loss_of_a_batch(model, step).backward()
            adamw_step(opt) if lean else opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((list(model.parameters()), opt.state_dict()["state"]))
    (p1, s1), (p2, s2) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k][n], s2[k][n]) for k in s1 for n in s1[k])
    assert float(s1[0]["step"]) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_timing_a_step_before_training_changes_nothing(workers):
    """The time per 1,000 steps printed before training comes from two passes of a micro-batch
    through the step's own path (``time_step``): they leave the weights, the RNG and every
    gradient (the replicas' too) as they found them."""
    from lmlab.train.config import TrainConfig
    from lmlab.train.loop import Dist, LossModel, row_split, time_step

    model, _ = _tiny_model_and_optimizer("gpt2")
    tc = TrainConfig(n_layers=1, d_model=32, n_heads=2, batch_size=4, block_size=8, grad_accum=3)
    split = row_split(model, workers, Dist(), "float32")
    try:
        before = [p.detach().clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        seconds = time_step(LossModel(model), model, split, tc, Dist(), "float32")
        assert seconds > 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert torch.equal(rng, torch.get_rng_state())
        for params in split.params if split is not None else [list(model.parameters())]:
            assert all(p.grad is None for p in params)
    finally:
        if split is not None:
            split.close()
