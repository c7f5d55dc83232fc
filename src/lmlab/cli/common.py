"""What every command shares: the console on stderr, JSON output, model loading with a spinner."""

from __future__ import annotations

import json
import sys

from rich.console import Console

# Content goes to stdout; stats, progress and errors to stderr, so pipes stay clean.
# Piped output gets a wide console so tables are not squeezed to 80 columns.
out = Console(highlight=False)
if not out.is_terminal:
    out = Console(highlight=False, width=160)
err = Console(stderr=True, highlight=False)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


def load_model(name: str, dtype: str = "float32", device: str = "cpu", quiet: bool = False, **kw):
    """lmlab.load with a status line on stderr (loading takes seconds)."""
    import lmlab

    if quiet or not err.is_terminal:
        return lmlab.load(name, dtype=dtype, device=device, **kw)
    with err.status(f"loading {name} ({dtype}, {device})"):
        return lmlab.load(name, dtype=dtype, device=device, **kw)
