"""Mirror a finished run to Weights & Biases (optional: ``pip install 'lmlab[wandb]'``).

Turned on by ``--wandb`` on a command or ``LMLAB_WANDB=1``. The local store stays the source
of truth; wandb gets a copy when the run ends:
- config: the run's config plus command, model, model hash, seed, inputs, versions and host;
- summary: every scalar metric and timing (timings under 'timings/...'), and the status;
- tables: 'outputs' (field, value) with the inputs and outputs, and 'points' when the metrics
  hold a series (a bench sweep's ``metrics["points"]``).
wandb's own settings apply: ``WANDB_MODE=offline`` writes under ``WANDB_DIR`` for a later
``wandb sync``; ``WANDB_PROJECT`` picks the project (default 'lmlab').
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from lmlab.errors import LmlabError
from lmlab.host import env_flag

DEFAULT_PROJECT = "lmlab"


def requested(flag: bool | None) -> bool:
    """``flag`` if given, else whether LMLAB_WANDB is set to 1/true/yes/on."""
    if flag is not None:
        return bool(flag)
    return env_flag("LMLAB_WANDB", False)


def require():
    """Import wandb or say how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise LmlabError("wandb is not installed; pip install 'lmlab[wandb]' (or pip install wandb).") from e
    return wandb


def _scalars(d: dict | None, prefix: str = "") -> dict[str, Any]:
    """The numbers, strings and bools of a (nested) dict as flat 'a/b' keys; lists are left out."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _io_rows(run: dict) -> list[list[str]]:
    """(field, value) rows for the run's inputs and outputs: one row per text, JSON for the rest."""
    from lmlab.runs.store import flatten, to_json

    rows = []
    for section in ("inputs", "outputs"):
        for key, value in flatten(run.get(section) or {}).items():
            rows.append([f"{section}.{key}", value if isinstance(value, str) else to_json(value)])
    return rows


def _points_table(wandb, points: list) -> Any:
    columns = []
    for p in points:
        for k in p:
            if k not in columns:
                columns.append(k)
    # allow_mixed_types: a point may lack a measure (None) or hold an int where others hold floats
    return wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points], allow_mixed_types=True)


def mirror(run: dict) -> str | None:
    """Send one run (a dict as ``RunStore.get`` returns) to wandb; returns the wandb run's URL or
    directory. Problems (no network, no login) print one sentence on stderr and never raise."""
    wandb = require()
    try:
        config = dict(run.get("config") or {})
        config.update(
            {
                "lmlab/command": run.get("command"),
                "lmlab/model": run.get("model"),
                "lmlab/model_hash": run.get("model_hash"),
                "lmlab/seed": run.get("seed"),
                "lmlab/run_id": run.get("id"),
                "lmlab/inputs": run.get("inputs"),
                "lmlab/versions": run.get("versions"),
                "lmlab/host": run.get("host"),
            }
        )
        config = json.loads(json.dumps(config, default=str))  # wandb wants plain JSON values
        wb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            id=run.get("id"),
            name=f"{run.get('command')} {run.get('model') or ''} {run.get('id')}".strip(),
            job_type=run.get("command"),
            config=config,
            tags=[run.get("status") or "unknown"],
            settings=wandb.Settings(console="off"),  # we start at the end: nothing to capture
        )
        metrics = dict(run.get("metrics") or {})
        points = metrics.pop("points", None)
        summary = _scalars(metrics)
        summary.update(_scalars(run.get("timings"), "timings/"))
        summary["status"] = run.get("status")
        if run.get("error"):
            summary["error"] = str(run["error"]).splitlines()[0]
        wb.summary.update(summary)
        tables = {"outputs": wandb.Table(columns=["field", "value"], data=_io_rows(run))}
        if isinstance(points, list) and points and all(isinstance(p, dict) for p in points):
            tables["points"] = _points_table(wandb, points)
        wb.log(tables)
        where = getattr(wb, "url", None) or getattr(wb, "dir", None)
        wb.finish(exit_code=0 if run.get("status") == "complete" else 1)
        return where
    except Exception as e:  # the run is safe in the local store; a mirror failure must not fail the command
        sys.stderr.write(
            f"lmlab: could not mirror run {run.get('id')} to wandb ({type(e).__name__}: {e}); "
            "it is still in the local store (`lmlab runs show "
            f"{run.get('id')}`).\n"
        )
        return None
