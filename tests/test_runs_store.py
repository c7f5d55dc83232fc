"""The run store: what a user finds after a run finishes, fails, is interrupted, killed, or hits a
full disk; concurrent writers; schema migrations; the wandb mirror (offline)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import lmlab.runs.store as store_mod
from lmlab.errors import LmlabError
from lmlab.runs import RunStore, file_hash, record_run
from lmlab.runs.store import SCHEMA_VERSION

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child_env(home: Path) -> dict:
    """A child's environment: the same store, and its temp folder (where a run that cannot be
    recorded would go) under the test's own folder."""
    env = dict(
        os.environ,
        LMLAB_HOME=str(home),
        TMPDIR=str(home.parent),
        PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("LMLAB_WANDB", None)
    return env


def test_completed_run_keeps_everything_set_during_it(home):
    with record_run(
        "generate",
        model="smollm2-135m",
        config={"temperature": 0.7, "top_k": 50},
        seed=3,
        inputs={"prompts": ["Once upon a time"]},
        argv=["lmlab", "generate", "Once upon a time"],
    ) as run:
        run.outputs = {"texts": [" there was a cat"]}
        run.timings = {"ttft_ms": 12.5}
        run.add_metrics(decode_tok_s=41.5)
        run.add_metrics(prefill_tok_s=900.0)
    with RunStore() as store:
        r = store.get(run.id)
    assert (home / "runs.db").is_file()
    assert r["status"] == "complete" and r["error"] is None and not r["incomplete"]
    assert r["command"] == "generate" and r["model"] == "smollm2-135m" and r["seed"] == 3
    assert r["config"] == {"temperature": 0.7, "top_k": 50}
    assert r["inputs"] == {"prompts": ["Once upon a time"]}
    assert r["outputs"] == {"texts": [" there was a cat"]}
    assert r["metrics"] == {"decode_tok_s": 41.5, "prefill_tok_s": 900.0}
    assert r["timings"] == {"ttft_ms": 12.5}
    assert r["argv"] == ["lmlab", "generate", "Once upon a time"]
    assert r["versions"]["python"] and r["versions"]["torch"]
    assert r["host"]["cores_logical"] >= 1 and r["host"]["ram_bytes"] > 0 and r["host"]["cpu"]
    assert r["finished"] >= r["created"] and r["duration_s"] >= 0
    assert len(run.id) == 12 and int(run.id, 16) >= 0


def test_record_false_writes_nothing(home):
    with record_run("generate", model="m", record=False) as run:
        run.outputs = {"texts": ["x"]}
        run.add_metrics(a=1)
        run.checkpoint()
    assert run.id is None
    assert RunStore().list() == []


def test_exception_marks_run_failed_with_error_and_reraises(home):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        with record_run("generate", model="m") as run:
            run.outputs = {"texts": ["half"]}
            raise ValueError("temperature must be >= 0")
    r = RunStore().get(run.id)
    assert r["status"] == "failed"
    assert r["error"].splitlines()[0] == "ValueError: temperature must be >= 0"
    assert "Traceback" in r["error"]
    assert r["outputs"] == {"texts": ["half"]}


def test_ctrl_c_marks_run_interrupted_and_keeps_partial_outputs(home):
    with pytest.raises(KeyboardInterrupt):
        with record_run("generate", model="m") as run:
            run.outputs = {"texts": ["Once upon a"], "finish_reasons": ["interrupted"]}
            run.add_metrics(decode_tok_s=10.0)
            raise KeyboardInterrupt
    r = RunStore().get(run.id)
    assert r["status"] == "interrupted" and r["error"] is None
    assert r["outputs"]["texts"] == ["Once upon a"]
    assert r["metrics"] == {"decode_tok_s": 10.0}
    assert r["finished"] is not None


def test_typer_exit_zero_counts_as_complete(home):
    import typer

    with pytest.raises(typer.Exit):
        with record_run("chat", model="m") as run:
            raise typer.Exit(0)
    assert RunStore().get(run.id)["status"] == "complete"


def test_model_file_hash_is_recorded_and_cached(home, tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(300_000))
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    with record_run("generate", model="local", model_path=model) as run:
        pass
    r = RunStore().get(run.id)
    assert r["model_hash"] == expected and r["model_path"] == str(model)

    # Second time: same (path, size, mtime) -> served from the cache without reading the file.
    def no_read(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(store_mod, "_sha256_file", no_read)
    assert file_hash(model) == expected
    monkeypatch.undo()
    monkeypatch.setenv("LMLAB_HOME", str(home))

    # Changed file (new size and mtime) -> hashed again.
    model.write_bytes(b"other weights")
    assert file_hash(model) == hashlib.sha256(b"other weights").hexdigest()


def test_model_folder_hash_depends_on_contents_not_location(home, tmp_path):
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"n_layer": 2}')
        (d / "model.safetensors").write_bytes(b"\x00" * 1000)
        (d / "notes.md").write_text(f"not part of the model {name}")
    assert file_hash(tmp_path / "a") == file_hash(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x01" * 1000)
    assert file_hash(tmp_path / "a") != file_hash(tmp_path / "b")


def test_get_by_unique_prefix_and_last(home):
    ids = []
    for i in range(3):
        with record_run("generate", model=f"m{i}") as run:
            pass
        ids.append(run.id)
    with RunStore() as store:
        assert store.get(ids[1])["model"] == "m1"
        # All ids made in the same second share their first 8 digits; 10+ digits are unique here.
        unique = next(n for n in range(1, 13) if sum(i.startswith(ids[2][:n]) for i in ids) == 1)
        assert store.get(ids[2][:unique])["id"] == ids[2]
        assert store.get("last")["id"] == ids[2]
        assert store.get("last-2")["id"] == ids[0]


def test_unknown_and_ambiguous_ids_say_what_to_do(home):
    for _ in range(2):
        with record_run("generate", model="m"):
            pass
    store = RunStore()
    with pytest.raises(LmlabError) as e:
        store.get("deadbeef9999")
    assert str(e.value) == "no run with id 'deadbeef9999'; `lmlab runs list` shows the ids."
    with pytest.raises(LmlabError, match="no run with id 'nope'"):
        store.get("nope")
    first = store.list()[0]["id"]
    with pytest.raises(LmlabError, match="matches several runs .*give more of the id"):
        store.get(first[:2])


def test_delete_removes_only_that_run(home):
    ids = []
    for i in range(2):
        with record_run("generate", model=f"m{i}") as run:
            pass
        ids.append(run.id)
    store = RunStore()
    assert store.delete(ids[0]) == ids[0]
    assert [r["id"] for r in store.list()] == [ids[1]]
    with pytest.raises(LmlabError, match="no run with id"):
        store.get(ids[0])


def test_list_filters_and_search(home):
    with record_run("generate", model="gpt2", inputs={"prompts": ["The capital of France"]}):
        pass
    with record_run("bench", model="smollm2-135m", config={"batch": [1, 2]}):
        pass
    with record_run("generate", model="smollm2-135m", inputs={"prompts": ["100% sure_thing"]}):
        pass
    store = RunStore()
    assert len(store.list()) == 3
    assert len(store.list(limit=2)) == 2
    assert [r["command"] for r in store.list(command="bench")] == ["bench"]
    assert {r["command"] for r in store.list(model="smollm2-135m")} == {"bench", "generate"}
    assert [r["model"] for r in store.list(search="capital of FRANCE")] == ["gpt2"]
    assert [r["model"] for r in store.list(search="100% sure_")] == ["smollm2-135m"]  # % and _ are literal
    assert store.list(search="0%_") == []


def test_diff_reports_changed_config_metrics_and_outputs(home):
    with record_run("generate", model="gpt2", config={"temperature": 0.7, "top_k": 50}, seed=1) as a:
        a.outputs = {"texts": ["a cat"]}
        a.add_metrics(decode_tok_s=40.0)
    with record_run("generate", model="gpt2", config={"temperature": 1.0, "top_k": 50, "top_p": 0.9}, seed=1) as b:
        b.outputs = {"texts": ["a dog"]}
        b.add_metrics(decode_tok_s=50.0)
    d = RunStore().diff(a.id, b.id)
    assert d["a"] == a.id and d["b"] == b.id
    changes = {(c["section"], c["key"]): c for c in d["changes"]}
    assert changes[("config", "temperature")]["a"] == 0.7 and changes[("config", "temperature")]["b"] == 1.0
    assert changes[("config", "top_p")]["change"] == "added"
    assert changes[("outputs", "texts[0]")]["b"] == "a dog"
    assert changes[("metrics", "decode_tok_s")]["ratio"] == pytest.approx(1.25)
    assert ("config", "top_k") not in changes and ("run", "seed") not in changes and ("run", "model") not in changes
    assert d["same"]["config"] == 1


# ---------------------------------------------------------------------------------------------
# Several processes, crashes, schema versions


CHILD_WRITER = """
import os, sys, time
from lmlab.runs import record_run
me, go = sys.argv[1], sys.argv[2]
open(go + "." + me, "w").close()           # ready
while not os.path.exists(go):               # start together with the other writer
    time.sleep(0.005)
for i in range(50):
    with record_run("bench", model="writer-" + me, config={"i": i}) as run:
        run.add_metrics(i=i)
        run.checkpoint(force=True)
"""


def test_two_processes_writing_at_once_lose_nothing(home, tmp_path):
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_WRITER, name, str(go)], env=_child_env(home), stderr=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    deadline = time.time() + 60
    while not all(Path(f"{go}.{n}").exists() for n in ("a", "b")):
        assert time.time() < deadline and all(c.poll() is None for c in children), "writers did not start"
        time.sleep(0.01)
    go.touch()
    for c in children:
        _, stderr = c.communicate(timeout=120)
        assert c.returncode == 0, stderr
        assert "could not record" not in stderr, stderr
    runs = RunStore().list(limit=None)
    assert len(runs) == 100
    for name in ("a", "b"):
        mine = [r for r in runs if r["model"] == f"writer-{name}"]
        assert sorted(r["metrics"]["i"] for r in mine) == list(range(50))
        assert all(r["status"] == "complete" for r in mine)


CHILD_KILLED = """
import sys, time
from lmlab.runs import record_run
with record_run("train", model="tiny-gpt", config={"steps": 1000}) as run:
    run.outputs = {"samples": ["step 100: the cat"]}
    run.add_metrics(loss=2.5)
    run.checkpoint(force=True)
    print(run.id, flush=True)
    time.sleep(120)
"""


def test_sigkill_mid_run_leaves_a_valid_db_with_the_run_incomplete(home):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_KILLED], env=_child_env(home), stdout=subprocess.PIPE, text=True
    )
    run_id = child.stdout.readline().strip()
    assert run_id, "the child did not start its run"
    # While it runs, another process sees it as running, not incomplete.
    live = RunStore().get(run_id)
    assert live["status"] == "running" and not live["incomplete"]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    conn = sqlite3.connect(home / "runs.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    r = RunStore().get(run_id)
    assert r["status"] == "running" and r["incomplete"] is True and r["finished"] is None
    assert r["outputs"] == {"samples": ["step 100: the cat"]} and r["metrics"] == {"loss": 2.5}


V1_SCHEMA = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, finished REAL, command TEXT NOT NULL, argv TEXT,
    model TEXT, model_hash TEXT, config TEXT, seed INTEGER, inputs TEXT, outputs TEXT, metrics TEXT,
    timings TEXT, versions TEXT, host TEXT, status TEXT NOT NULL DEFAULT 'running', error TEXT
);
"""


def test_v1_database_migrates_to_current_with_data_intact(home):
    home.mkdir()
    conn = sqlite3.connect(home / "runs.db")
    conn.executescript(V1_SCHEMA)
    conn.execute(
        "INSERT INTO runs VALUES ('00000abc0001', 1700000000.0, 1700000002.5, 'generate', '[\"lmlab\"]', "
        "'gpt2', 'ab12', '{\"temperature\": 0.8}', 7, '{\"prompts\": [\"hi\"]}', '{\"texts\": [\" there\"]}', "
        "'{\"decode_tok_s\": 33.0}', '{}', '{\"python\": \"3.10\"}', '{\"os\": \"Linux\"}', 'complete', NULL)"
    )
    conn.execute(
        "INSERT INTO runs (id, created, command, status) VALUES ('00000abc0002', 1700000100.0, 'bench', 'running')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    store = RunStore()
    r = store.get("00000abc0001")
    assert r["config"] == {"temperature": 0.8} and r["seed"] == 7 and r["model_hash"] == "ab12"
    assert r["outputs"] == {"texts": [" there"]} and r["metrics"] == {"decode_tok_s": 33.0}
    assert r["duration_s"] == pytest.approx(2.5) and r["status"] == "complete"
    assert r["pid"] is None and r["model_path"] is None  # columns added by v2
    # A 'running' v1 row has no process to wait for: it shows as incomplete.
    assert store.get("00000abc0002")["incomplete"] is True
    store.close()
    conn = sqlite3.connect(home / "runs.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert conn.execute("SELECT count(*) FROM file_hashes").fetchone()[0] == 0
    conn.close()
    with record_run("generate", model="gpt2"):  # and it is usable for new runs
        pass
    assert len(RunStore().list()) == 3


def test_db_from_a_newer_lmlab_is_refused_and_left_untouched(home):
    home.mkdir()
    db = home / "runs.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, future_column BLOB)")
    conn.execute("INSERT INTO runs VALUES ('x', x'00ff')")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    files_before = sorted(os.listdir(home))

    expected = (
        f"{db} was written by a newer lmlab (schema v7, this one knows v{SCHEMA_VERSION}); "
        "upgrade lmlab or set LMLAB_HOME to another folder."
    )
    with pytest.raises(LmlabError) as e:
        RunStore()
    assert str(e.value) == expected
    with pytest.raises(LmlabError, match="newer lmlab"):
        with record_run("generate", model="m"):
            pass
    assert db.read_bytes() == before
    assert sorted(os.listdir(home)) == files_before


# ---------------------------------------------------------------------------------------------
# A store that cannot be written


class _FullDisk:
    """A connection whose writes fail like SQLite's on a full disk."""

    def __init__(self, real):
        self._real = real

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self._real.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_full_disk_keeps_the_run_in_a_temp_file_and_says_so_once(home, tmp_path, monkeypatch, capsys):
    RunStore().close()  # the store exists; then the disk fills up
    real_connect = store_mod._connect
    monkeypatch.setattr(store_mod, "_connect", lambda path: _FullDisk(real_connect(path)))
    tmp = tmp_path / "systemp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    with record_run("generate", model="m", inputs={"prompts": ["hi"]}) as run:  # must not raise
        run.outputs = {"texts": ["hello"]}
        run.checkpoint(force=True)
        run.add_metrics(decode_tok_s=5.0)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    fallback = tmp / f"lmlab-run-{run.id}.json"
    assert len(lines) == 1, err
    assert "could not record run" in lines[0] and "database or disk is full" in lines[0] and str(fallback) in lines[0]
    saved = json.loads(fallback.read_text())
    assert saved["status"] == "complete" and saved["outputs"] == {"texts": ["hello"]}
    assert saved["metrics"] == {"decode_tok_s": 5.0} and saved["inputs"] == {"prompts": ["hi"]}
    assert saved["not_recorded_because"] == "database or disk is full"
    monkeypatch.setattr(store_mod, "_connect", real_connect)
    assert RunStore().list() == []


def test_unwritable_store_and_temp_dir_print_the_run_as_json_on_stderr(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LMLAB_HOME", str(blocker / "home"))  # cannot be created: its parent is a file
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))

    with record_run("generate", model="m") as run:
        run.outputs = {"texts": ["kept"]}

    err = capsys.readouterr().err
    assert err.count("could not record run") == 1
    head, _, payload = err.partition("here is the run as JSON: ")
    assert str(blocker / "home" / "runs.db") in head and "not writable either" in head
    saved = json.loads(payload)
    assert saved["id"] == run.id and saved["outputs"] == {"texts": ["kept"]} and saved["status"] == "complete"


def test_cli_store_errors_are_one_sentence(tmp_path, monkeypatch):
    bad = tmp_path / "home"
    bad.mkdir()
    (bad / "runs.db").write_bytes(b"this is not a database at all" * 100)
    monkeypatch.setenv("LMLAB_HOME", str(bad))
    # a damaged file is named as damaged, with the way out (not "free disk space")
    with pytest.raises(LmlabError, match=r"the run store at .*runs.db is damaged \(file is not a database\); "):
        RunStore()


# ---------------------------------------------------------------------------------------------
# wandb mirror


def test_wandb_requested_but_not_installed_says_how_to_install(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(LmlabError) as e:
        with record_run("generate", model="m", wandb=True):
            pass
    assert str(e.value) == "wandb is not installed; pip install 'lmlab[wandb]' (or pip install wandb)."
    monkeypatch.setenv("LMLAB_WANDB", "1")
    with pytest.raises(LmlabError, match="wandb is not installed"):
        with record_run("generate", model="m"):
            pass
    with record_run("generate", model="m", wandb=False):  # explicit False wins over the env
        pass


def _wandb_records(path: str, timeout_s: float = 15.0) -> list:
    """The protobuf Records of an offline run's .wandb file (a LevelDB-style log).

    wandb's service process may still be writing for a moment after ``finish()`` returns,
    so wait (up to ``timeout_s``) until the run's exit record is there."""
    deadline = time.time() + timeout_s
    while True:
        records = _parse_wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.05)


def _parse_wandb_log(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a record still being written
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + payload)
            out.append(rec)
            buf = b""
        else:
            buf += payload
    return out


def test_wandb_offline_mirror_writes_config_summary_and_outputs(home, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wdir = tmp_path / "wandb-dir"
    wdir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(wdir / var.lower()))
    monkeypatch.setenv("LMLAB_WANDB", "1")

    with record_run(
        "generate", model="smollm2-135m", config={"temperature": 0.7}, seed=5, inputs={"prompts": ["Once upon a time"]}
    ) as run:
        run.outputs = {"texts": [" in a land far away"]}
        run.add_metrics(decode_tok_s=42.0)

    files = glob.glob(str(wdir / "wandb" / f"offline-run-*-{run.id}" / f"run-{run.id}.wandb"))
    assert len(files) == 1, os.listdir(wdir)
    records = _wandb_records(files[0])
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for u in r.run.config.update
    }
    config.update(
        {
            u.key: json.loads(u.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for u in r.config.update
        }
    )
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                summary[u.key or ".".join(u.nested_key)] = json.loads(u.value_json)
    assert config["temperature"] == 0.7 and config["lmlab/model"] == "smollm2-135m" and config["lmlab/seed"] == 5
    assert summary["decode_tok_s"] == 42.0 and summary["status"] == "complete"
    tables = glob.glob(str(Path(files[0]).parent / "files" / "media" / "table" / "outputs_*.table.json"))
    table = json.loads(Path(tables[0]).read_text())
    assert ["outputs.texts[0]", " in a land far away"] in table["data"]
    assert ["inputs.prompts[0]", "Once upon a time"] in table["data"]
    assert RunStore().get(run.id)["status"] == "complete"  # the local store still has it
