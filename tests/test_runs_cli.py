"""`lmlab runs list/show/diff/export/rm`: what lands on stdout and stderr, files written, errors."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from lmlab.cli.runs import key_metrics, register
from lmlab.errors import LmlabError
from lmlab.runs import RunStore, record_run
from lmlab.runs.report import fmt_value


@pytest.fixture()
def cli():
    """Invoke `runs ...` through a bare typer app, as the main CLI will."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root():
        pass

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["runs", *args])

    return invoke


@pytest.fixture()
def two_runs(home):
    """A baseline generate run and one with a higher temperature and faster decode."""
    ids = []
    for temp, speed, text in ((0.7, 40.0, "a cat sat"), (1.2, 50.0, "a dog ran")):
        with record_run(
            "generate",
            model="smollm2-135m",
            config={"temperature": temp, "top_k": 50},
            seed=1,
            inputs={"prompts": ["Once upon a time"]},
        ) as run:
            run.outputs = {"texts": [text]}
            run.add_metrics(decode_tok_s=speed, ttft_ms=100.0)
        ids.append(run.id)
    return ids


def test_list_shows_runs_newest_first_with_status_and_key_metrics(cli, two_runs):
    with pytest.raises(KeyboardInterrupt):
        with record_run("bench", model="gpt2") as run:
            raise KeyboardInterrupt
    r = cli("list")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stdout.splitlines() if re.search(r"[0-9a-f]{12}", line)]
    assert [re.search(r"[0-9a-f]{12}", line).group(0) for line in lines] == [run.id, two_runs[1], two_runs[0]]
    assert "interrupted" in lines[0] and "complete" in lines[1]
    assert "decode 50.0 tok/s" in lines[1] and "TTFT 100.0 ms" in lines[1]
    assert "3 of 3 runs in" in r.stderr and "3 of 3" not in r.stdout


def test_list_json_and_filters(cli, two_runs):
    with record_run("bench", model="gpt2"):
        pass
    r = cli("list", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert [d["id"] for d in data[1:]] == [two_runs[1], two_runs[0]]
    assert data[1]["metrics"]["decode_tok_s"] == 50.0 and data[1]["status"] == "complete"
    assert [d["command"] for d in json.loads(cli("list", "--json", "--command", "bench").stdout)] == ["bench"]
    assert [d["id"] for d in json.loads(cli("list", "--json", "--search", "dog ran").stdout)] == [two_runs[1]]
    assert len(json.loads(cli("list", "--json", "-n", "1").stdout)) == 1


def test_list_marks_a_killed_run_as_incomplete(cli, home):
    home.mkdir()
    RunStore().insert_run(
        {
            "id": "00000000abcd",
            "created": 1.0e9,
            "command": "train",
            "model": "tiny",
            "status": "running",
            "pid": 2**22 + 12345,
            "hostname": __import__("platform").node(),
        }
    )
    r = cli("list")
    assert "incomplete" in r.stdout
    assert json.loads(cli("list", "--json").stdout)[0]["incomplete"] is True


def test_empty_store_says_so_on_stderr(capsys, home):
    from lmlab.cli.main import main

    assert main(["runs", "list"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no runs yet in" in err
    # it names the commands this lmlab has that record runs, and no others
    said = " ".join(err.split()).split("every ")[1].split(" run lands here")[0].split(" / ")
    assert {"generate", "chat", "inspect", "steer", "induction", "bench"} <= set(said)
    assert not {"models", "info", "runs"} & set(said)


def test_list_fits_100_columns_without_cutting_a_model_name(capsys, home, monkeypatch):
    from lmlab.cli.main import main

    long_model = "/home/someone/models/a-rather-long-folder-name/SmolLM2-135M-Instruct-finetuned-on-poems"
    with record_run("generate", model=long_model, inputs={}) as run:
        run.add_metrics(decode_tok_s=41.3, prefill_tok_s=700.0, ttft_ms=120.0)
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100 and "…" not in out
    header = next(line for line in out.splitlines() if " model " in line)
    start, end = header.index(" model ") + 1, header.index(" status ")
    column = "".join(line[start:end].strip() for line in out.splitlines()[out.splitlines().index(header) + 1 :])
    assert long_model in column  # every character of the name, wrapped in its cell
    assert run.id in out and "41.3" in out and "120.0" in out


def test_a_damaged_store_is_named_and_check_moves_it_aside(capsys, home):
    from lmlab.cli.main import main

    with record_run("generate", model="m", inputs={}) as run:
        pass
    db = home / "runs.db"
    assert main(["runs", "check"]) == 0 and "ok:" in capsys.readouterr().out
    for side in ("runs.db-wal", "runs.db-shm"):
        (home / side).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database, just text\n" * 200)
    assert main(["runs", "list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the run store at") and "is damaged" in err and "runs check --move-aside" in err
    assert "free disk space" not in err and len(err.splitlines()) == 1
    assert main(["runs", "check"]) == 1
    out, err = capsys.readouterr()
    assert "damaged:" in out and "--move-aside" in err
    assert main(["runs", "check", "--move-aside"]) == 0
    out = capsys.readouterr().out
    assert "moved it to" in out and list(home.glob("runs.db.damaged-*"))
    assert main(["runs", "list"]) == 0  # a new, empty store
    assert run.id not in capsys.readouterr().out


def test_move_aside_keeps_the_runs_it_can_read(home):
    from lmlab.runs.store import move_aside

    with record_run("generate", model="m", inputs={"prompts": ["hi"]}) as run:
        run.outputs = {"texts": ["there"]}
    result = move_aside()
    assert result["recovered"] == 1
    with RunStore() as store:
        assert store.get(run.id)["outputs"] == {"texts": ["there"]}


def test_a_run_that_fell_back_to_a_file_can_be_imported(capsys, home, tmp_path, monkeypatch):
    import lmlab.runs as runs_pkg
    from lmlab.cli.main import main

    monkeypatch.setattr(runs_pkg, "_fallback_dir", lambda: tmp_path)
    home.mkdir()
    (home / "runs.db").mkdir()  # a folder where the database file should be: the store cannot open
    with record_run("generate", model="m", config={"temperature": 0.5}, inputs={"prompts": ["hi"]}) as run:
        run.outputs = {"texts": ["there"]}
    err = capsys.readouterr().err
    saved = tmp_path / f"lmlab-run-{run.id}.json"
    assert saved.is_file() and f"lmlab runs import {saved}" in err
    (home / "runs.db").rmdir()
    assert main(["runs", "import", str(saved)]) == 0
    assert f"imported run {run.id}" in capsys.readouterr().err
    with RunStore() as store:
        got = store.get(run.id)
    assert got["outputs"] == {"texts": ["there"]} and got["config"] == {"temperature": 0.5}
    assert got["status"] == "complete" and got["created"] == json.loads(saved.read_text())["created"]
    assert main(["runs", "import", str(saved)]) == 2  # once only
    assert "already in the store" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["runs", "import", str(bad)]) == 2
    assert "is not a JSON run file" in capsys.readouterr().err


def test_show_prints_the_whole_record(cli, two_runs):
    r = cli("show", two_runs[0][:11])
    assert r.exit_code == 0, r.output
    assert two_runs[0] in r.stdout and "smollm2-135m" in r.stdout and "a cat sat" in r.stdout
    assert "temperature" in r.stdout and "Once upon a time" in r.stdout and "python" in r.stdout
    data = json.loads(cli("show", "last", "--json").stdout)
    assert data["id"] == two_runs[1] and data["outputs"] == {"texts": ["a dog ran"]}


def test_unknown_id_is_an_lmlab_error_with_the_fix(cli, two_runs):
    r = cli("show", "abcdef123456")
    assert r.exit_code != 0
    assert isinstance(r.exception, LmlabError)
    assert str(r.exception) == "no run with id 'abcdef123456'; `lmlab runs list` shows the ids."


def test_diff_table_and_json(cli, two_runs):
    a, b = two_runs
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[2].strip(): line for line in r.stdout.splitlines() if line.count("│") >= 5}
    assert "0.700" in rows["temperature"] and "1.2" in rows["temperature"]
    assert "×1.25" in rows["decode_tok_s"]
    assert "a dog ran" in rows["texts[0]"]
    assert "top_k" not in rows
    assert "differences" in r.stderr
    d = json.loads(cli("diff", a, b, "--json").stdout)
    assert {(c["section"], c["key"]) for c in d["changes"]} == {
        ("config", "temperature"),
        ("outputs", "texts[0]"),
        ("metrics", "decode_tok_s"),
    }


def test_diff_of_identical_runs_says_so(cli, home):
    ids = []
    for _ in range(2):
        with record_run("generate", model="m", config={"t": 1}) as run:
            run.outputs = {"texts": ["same"]}
        ids.append(run.id)
    r = cli("diff", *ids)
    assert r.exit_code == 0 and r.stdout == ""
    assert "record the same config" in r.stderr


def test_export_markdown_and_json_go_to_stdout(cli, two_runs):
    r = cli("export", *two_runs, "--md")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("# lmlab: comparison of 2 runs")
    assert "| decode_tok_s | 40.0 | 50.0 (×1.25) |" in r.stdout
    r = cli("export", two_runs[0], "--json")
    data = json.loads(r.stdout)
    assert [d["id"] for d in data] == [two_runs[0]]


def test_export_html_writes_a_self_contained_file_and_says_where(cli, two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("export", *two_runs)  # HTML is the default
    assert r.exit_code == 0, r.output
    path = tmp_path / f"lmlab-report-{two_runs[0]}-{two_runs[1]}.html"
    assert path.is_file() and str(path.name) in r.stderr and r.stdout == ""
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "a dog ran" in page
    assert "<link" not in page and "<script" not in page
    out = tmp_path / "sub" / "report.html"
    out.parent.mkdir()
    r = cli("export", two_runs[0], "--html", "-o", str(out))
    assert r.exit_code == 0 and out.is_file() and str(out) in r.stderr


def test_export_refuses_two_formats(cli, two_runs):
    r = cli("export", two_runs[0], "--md", "--json")
    assert isinstance(r.exception, LmlabError) and "choose one format" in str(r.exception)


def test_rm_deletes_and_checks_every_id_first(cli, two_runs):
    r = cli("rm", two_runs[0], "ffffffffffff")
    assert isinstance(r.exception, LmlabError)
    assert len(RunStore().list()) == 2  # nothing deleted because one id was wrong
    r = cli("rm", two_runs[0])
    assert r.exit_code == 0 and f"deleted run {two_runs[0]}" in r.stderr
    assert [x["id"] for x in RunStore().list()] == [two_runs[1]]


def test_show_and_diff_fit_100_columns(capsys, two_runs, monkeypatch):
    from lmlab.cli.main import main

    monkeypatch.setenv("COLUMNS", "100")
    for argv in (["runs", "show", two_runs[0]], ["runs", "diff", *two_runs]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 100 and "…" not in out
        assert "temperature" in out


# ----------------------------------------------------------------------------- finetune and merge runs
# Real runs of the real commands on tiny random Llamas (one-character tokenizers, tests/tiny.py).


def _tiny_llamas(root, names="a"):
    from tiny import make_tiny, save_char_tokenizer

    for i, name in enumerate(names):
        make_tiny("llama", root / name, seed=i)
        save_char_tokenizer(root / name)
    return [str(root / n) for n in names]


def _show(capsys, run_id: str) -> str:
    from lmlab.cli.main import main

    assert main(["runs", "show", run_id]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 100  # COLUMNS=100
    return text


def test_a_finetune_run_shows_its_loss_curve_and_samples_before_and_after(home, tmp_path, capsys, monkeypatch):
    import html

    from lmlab.cli.main import main

    (model,) = _tiny_llamas(tmp_path)
    words = ["abc", "xyz", "hello", "qrs", "mno", "tuv", "ghi", "def"]
    rows = [{"prompt": f"w {words[i % 8]}{i}:", "completion": f" [{words[i % 8]}]"} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["finetune", model, "--data", str(data), "--lora", "r=4,alpha=8,targets=q,v", "--steps", "10"]
    argv += ["--lr", "1e-2", "--eval-every", "5", "--val-fraction", "0.2", "--sample-tokens", "4"]
    assert main([*argv, "--out", str(tmp_path / "ft"), "--no-progress", "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    with RunStore() as store:
        run = store.get(run_id)
    m, samples = run["metrics"], list(zip(run["outputs"]["samples_before"], run["outputs"]["samples_after"]))
    assert samples and [p for p in m["points"] if "train_loss" in p] and [p for p in m["points"] if "val_loss" in p]

    monkeypatch.setenv("COLUMNS", "100")
    text = _show(capsys, run_id)
    curve = text[text.index("loss curve") : text.index("before and after")]
    steps = {line.split()[0]: line.split()[1:] for line in curve.splitlines() if re.match(r"\s*\d+\s", line)}
    assert list(steps) == ["0", "5", "10"]  # held-out loss before training at step 0, then every 5 steps
    before, after = m["val_loss_before"], m["val_loss_after"]
    assert steps["0"] == [fmt_value(before)] and steps["10"][-2] == fmt_value(after)
    assert "▁" in curve and "█" in curve  # the sparklines
    assert f"held-out loss  {fmt_value(before)} → {fmt_value(after)} ({after - before:+.4f})" in text
    for b, a in samples:
        assert re.search(rf"│\s+{b['line']} │ {re.escape(b['prompt'])}\s+│", text)
    assert "samples_before" not in text  # not again among the outputs
    assert key_metrics(run).startswith(f"held-out loss {fmt_value(before)} → {fmt_value(after)}")  # in `runs list`

    assert main(["runs", "export", run_id, "--html", "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 1 and "train (line) and validation (dots)" in page
    ba = page[page.index("<h2>Before and after fine-tuning</h2>") : page.index("<h2>Measured points</h2>")]
    loss = f'<td class="num">{fmt_value(before)}</td><td class="num">{fmt_value(after)} ({after - before:+.4f})</td>'
    assert loss in ba
    for b, a in samples:
        cells = (b["line"], b["prompt"], b["expected"], b["output"], a["output"])
        want = f'<td class="num">{cells[0]}</td>' + "".join(f"<td><pre>{html.escape(c)}</pre></td>" for c in cells[1:])
        assert want in ba


def test_a_merge_run_shows_its_comparison_table(home, tmp_path, capsys, monkeypatch):
    import html

    from lmlab.cli.main import main

    a, b = _tiny_llamas(tmp_path, "ab")
    assert main(["merge", a, b, "--weights", "0.5,0.5", "-o", str(tmp_path / "merged"), "--prompt", "Hi"]) == 0
    capsys.readouterr()
    with RunStore() as store:
        run = store.get("last")
    rows = run["outputs"]["comparison"]
    assert run["command"] == "merge" and [r["label"] for r in rows] == [a, b, "merged"]

    monkeypatch.setenv("COLUMNS", "100")
    text = _show(capsys, run["id"])
    table = text[text.index("merge comparison") : text.index("inputs")]
    assert run["outputs"]["prompts"] == ["Hi"]
    assert "perplexity" in table and "'Hi' →" in table and "│ merged " in table
    for r in rows:
        assert f" {fmt_value(r['perplexity'])} │ {r['tokens']:>6} │" in table
    assert "comparison[0]" not in text  # not again among the outputs
    ppl = [fmt_value(r["perplexity"]) for r in rows]
    assert key_metrics(run) == f"ppl {ppl[0]} / {ppl[1]} → merged {ppl[2]}"  # in `runs list`

    assert main(["runs", "export", run["id"], "--html", "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    mc = page[page.index("<h2>Merge comparison</h2>") : page.index("<h2>Inputs and outputs</h2>")]
    for r in rows:
        assert (
            f'<tr><th class="key">{html.escape(r["label"])}</th><td class="num">{fmt_value(r["perplexity"])}</td>'
            f'<td class="num">{r["tokens"]}</td><td><pre>{html.escape(r["answers"][0])}</pre></td></tr>'
        ) in mc


def test_a_long_loss_curve_shows_20_steps_with_every_held_out_loss(home, capsys, monkeypatch):
    """A train run's curve as `lmlab train` records it: 30 points, a held-out loss every 100 steps."""
    points = [{"step": s, "train_loss": 5 - 0.01 * s, "lr": 1e-3} for s in range(0, 300, 10)]
    for p in points[::10] + points[-1:]:
        p["val_loss"] = p["train_loss"] + 0.1
    with record_run("train", model="tiny") as run:
        run.add_metrics(val_loss=2.2, points=points)
        run.outputs = {"samples": [{"step": 100, "text": "once upon"}]}
    monkeypatch.setenv("COLUMNS", "100")
    text = _show(capsys, run.id)
    assert "loss curve (nats/token), 20 of 30 steps shown" in text
    rows = [line.split() for line in text[text.index("loss curve") : text.index("outputs")].splitlines()]
    steps = [int(r[0]) for r in rows if r and r[0].isdigit()]
    assert len(steps) == 20 and steps == sorted(steps) and steps[0] == 0 and steps[-1] == 290
    assert {0, 100, 200, 290} <= set(steps)  # every held-out loss is among them
    assert "   train 5.000 " + "█" in text and " 2.100\n" in text  # the sparkline, first to last value
