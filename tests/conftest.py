"""Test-wide settings: offline, a private LMLAB_HOME, quiet transformers."""

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("LMLAB_HOME", tempfile.mkdtemp(prefix="lmlab-test-home-"))
# The CLI's output is read as a pipe gives it (tables 160 wide, cli/common.py). pytest-xdist's
# workers (make test runs two) get COLUMNS=80 and LINES=24 from it, which a serial run has not.
for name in ("COLUMNS", "LINES"):
    os.environ.pop(name, None)
sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny.py and bundled.py

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family) -> an LM on a tiny random model of that family, built once per test module."""
    import lmlab
    from tiny import make_tiny

    made = {}

    def get(family):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            make_tiny(family, folder)
            made[family] = lmlab.load(folder)
        return made[family]

    return get


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private, empty LMLAB_HOME for one test, with the wandb mirror off."""
    h = tmp_path / "home"
    monkeypatch.setenv("LMLAB_HOME", str(h))
    monkeypatch.delenv("LMLAB_WANDB", raising=False)
    return h
