"""Test-wide settings: offline, a private LMLAB_HOME, quiet transformers."""

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("LMLAB_HOME", tempfile.mkdtemp(prefix="lmlab-test-home-"))
sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny.py and bundled.py
