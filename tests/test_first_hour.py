"""README's "A first hour", run as written on the bundled SmolLM2: every command line of its shell
block exits 0, and its Python snippet runs. The lines are read from README.md, so the README
cannot drift from the code.

Each line runs through the real entry point (`lmlab.cli.main.main`), in this process, with the
model loaded once (loading is tested elsewhere; a fresh process per line costs ~10 s each).
Where a line would take long, only its size knobs are added (FAST): fewer new tokens, a shorter
induction experiment, a one-point bench. Nothing else is changed.
"""

import functools
import re
import shlex
from pathlib import Path

import pytest
import torch

import lmlab
from bundled import smollm2_gguf_path
from lmlab.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"

# knobs added to keep each command short (the line as written comes first, so a knob it sets wins)
FAST = {
    "generate": ["--max-new-tokens", "8"],
    "chat": ["--max-new-tokens", "8"],
    "ablate": ["--max-new-tokens", "6"],
    "steer": ["--max-new-tokens", "6"],
    "lens": [],
    "induction": ["--seq-len", "12", "--n-seqs", "1", "--top-layers", "1"],
    "bench": ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--no-record"],
}


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def first_hour_lines() -> list[list[str]]:
    """The command lines of the section's first shell block, without their comments."""
    block = re.search(r"```\n(.*?)```", readme_section("A first hour"), re.S).group(1)
    lines = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "lmlab", line
            lines.append(words[1:])
    return lines


def python_snippet() -> str:
    return re.search(r"```python\n(.*?)```", readme_section("A first hour"), re.S).group(1)


@pytest.fixture(scope="module")
def cached_load():
    """lmlab.load, remembering the models it loaded (same name, dtype and options: the same LM)."""
    smollm2_gguf_path()  # skips when the bundled model is not installed
    real = lmlab.load

    @functools.lru_cache(maxsize=4)
    def load(name, dtype, device, options):
        return real(name, dtype=dtype, device=device, **dict(options))

    def fake(name, dtype="float32", device="cpu", **kw):
        return load(name, dtype, device, tuple(sorted((k, v) for k, v in kw.items() if v is not None)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster (see test_inspect_smollm2)
    yield fake
    torch.set_num_threads(threads)


def test_readme_first_hour_lines_all_exit_0(cached_load, monkeypatch, capsys):
    monkeypatch.setattr(lmlab, "load", cached_load)
    monkeypatch.setenv("COLUMNS", "100")
    answers = iter(["What is a transformer?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    lines = first_hour_lines()
    assert len(lines) >= 10 and lines[0] == ["models"]
    from lmlab.runs import RunStore

    with RunStore() as store:
        before = {r["id"] for r in store.list(limit=None)}
    ran = []
    for words in lines:
        argv = words + FAST.get(words[0], [])
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"lmlab {shlex.join(argv)} exited {code}: {err[-2000:]}"
        assert "Traceback" not in err
        ran.append((words[0], out, err))
    by = {name: (out, err) for name, out, err in ran}
    assert "bot> " in by["chat"][0]
    assert "induction heads" in by["induction"][0]
    # every run above was recorded, and `runs list` (the last line) lists runs. The store may be
    # shared with tests running beside this one (make test runs two processes), whose runs can
    # fill the list's 20 rows; so what was recorded is read from the store, by command and model.
    assert ran[-1][0] == "runs" and " id " in by["runs"][0]
    with RunStore() as store:
        mine = {(r["command"], r["model"]) for r in store.list(limit=None) if r["id"] not in before}
    for name in ("generate", "inspect", "steer", "induction"):
        assert (name, "smollm2-135m") in mine, (name, sorted(mine))


def test_readme_python_snippet_runs(cached_load, monkeypatch, capsys):
    monkeypatch.setattr(lmlab, "load", cached_load)
    snippet = python_snippet()
    assert 'lmlab.load("smollm2-135m"' in snippet
    namespace: dict = {}
    exec(compile(snippet, "README.md (A first hour)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Paris" in out and namespace["cache"] is not None
    assert namespace["s"].result().finish_reason in ("length", "eos", "stop")
