"""`lmlab runs list/show/diff/export/rm`: what lands on stdout and stderr, files written, errors."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from lmlab.cli.runs import register
from lmlab.errors import LmlabError
from lmlab.runs import RunStore, record_run


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


def test_empty_store_says_so_on_stderr(cli, home):
    r = cli("list")
    assert r.exit_code == 0 and r.stdout == ""
    assert "0 of 0 runs" in r.stderr


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
