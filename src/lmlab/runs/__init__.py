"""Every run is recorded: ``record_run`` wraps a command, ``RunStore`` reads the records back.

Usage (how generate / bench / inspect / eval / train call it)::

    from lmlab.runs import record_run
    with record_run("generate", model="smollm2-135m", model_path=path, config={...}, seed=0,
                    inputs={"prompts": [...]}, record=True) as run:
        run.outputs = {"texts": [...]}        # set or update any time; run.metrics, run.timings too
        run.add_metrics(decode_tok_s=41.3)    # merges into run.metrics
        run.checkpoint()                      # saves what is set so far (cheap; for long runs)

The row is inserted at enter with status 'running'. On exit it becomes 'complete'; Ctrl-C makes
it 'interrupted' (what was set so far is kept) and any other exception 'failed' with the error
text; the exception is re-raised either way. A SIGKILL leaves the row 'running', which
``lmlab runs list`` shows as incomplete.

If the store cannot be written (disk full, I/O error, read-only folder), the command still
runs: one sentence on stderr says so and where the run was written instead (a JSON file in the
system temp folder, or stderr itself).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from lmlab.host import host_details, lmlab_home
from lmlab.runs import wandb_mirror
from lmlab.runs.store import (
    SCHEMA_VERSION,
    RunStore,
    StoreUnavailable,
    default_db_path,
    diff_runs,
    file_hash,
    iso_time,
    new_run_id,
    package_versions,
    status_label,
    to_json,
)

__all__ = [
    "record_run",
    "Run",
    "RunStore",
    "StoreUnavailable",
    "file_hash",
    "diff_runs",
    "lmlab_home",
    "default_db_path",
    "status_label",
    "SCHEMA_VERSION",
]

CHECKPOINT_MIN_INTERVAL_S = 0.25  # checkpoint() more often than this is coalesced (s)


def _fallback_dir() -> Path:
    """Where a run goes when the store cannot take it (tests point this elsewhere)."""
    return Path(tempfile.gettempdir())


class Run:
    """One run being recorded. Set ``outputs``, ``metrics`` and ``timings`` (dicts) freely.

    ``id`` is None for a run made with ``record=False`` (nothing is written).
    """

    def __init__(
        self,
        command: str,
        *,
        model: str | None,
        model_path: str | None,
        config: dict | None,
        seed: int | None,
        inputs: dict | None,
        argv: list[str] | None,
        record: bool,
    ):
        self.command = command
        self.model = model
        self.model_path = str(model_path) if model_path is not None else None
        self.model_hash: str | None = None
        self.config = dict(config or {})
        self.seed = seed
        self.inputs = inputs if inputs is not None else {}
        self.outputs: Any = {}
        self.metrics: dict = {}
        self.timings: dict = {}
        self.argv = list(sys.argv if argv is None else argv)
        self.status = "running"
        self.error: str | None = None
        self.created = time.time()
        self.finished: float | None = None
        self.record = record
        self.id: str | None = new_run_id(self.created) if record else None
        self._store: RunStore | None = None
        self._own_store = False  # close the store at the end only if we opened it
        self._db_path: Path | None = None
        self._fallback_path: Path | None = None
        self._fallback_reason: str | None = None
        self._last_save = 0.0

    # -- what callers use -------------------------------------------------------------------------

    def add_metrics(self, **values: Any) -> None:
        """Merge values into ``run.metrics`` (e.g. ``add_metrics(decode_tok_s=41.3)``)."""
        if not isinstance(self.metrics, dict):
            self.metrics = {}
        self.metrics.update(values)

    def checkpoint(self, force: bool = False) -> None:
        """Save outputs, metrics and timings set so far. Calls closer than 0.25 s apart are
        coalesced unless ``force``; the final state is always saved at exit."""
        if not self.record or self.status != "running":
            return
        now = time.monotonic()
        if not force and now - self._last_save < CHECKPOINT_MIN_INTERVAL_S:
            return
        self._last_save = now
        self._save()

    def as_dict(self) -> dict:
        """The run as ``RunStore.get`` would return it: the stored row, its times as ISO text."""
        return {
            **self._row(),
            "created": iso_time(self.created),
            "finished": iso_time(self.finished),
            "duration_s": round(self.finished - self.created, 3) if self.finished else None,
            "incomplete": False,
        }

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, command={self.command!r}, status={self.status!r})"

    # -- store plumbing -----------------------------------------------------------------------------

    def _row(self) -> dict:
        return {
            "id": self.id,
            "created": self.created,
            "finished": self.finished,
            "command": self.command,
            "argv": self.argv,
            "model": self.model,
            "model_path": self.model_path,
            "model_hash": self.model_hash,
            "config": self.config,
            "seed": self.seed,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "timings": self.timings,
            "versions": package_versions(),
            "host": host_details(),
            "status": self.status,
            "error": self.error,
            "pid": os.getpid(),
            "hostname": platform.node(),
        }

    def _start(self, store: RunStore | None) -> None:
        """Open the store, hash the model, insert the 'running' row (or fall back)."""
        self._db_path = store.path if store is not None else default_db_path()
        try:
            self._own_store = store is None
            self._store = store if store is not None else RunStore()
        except StoreUnavailable as e:
            self._store = None
            self._fallback_reason = e.reason
        if self.model_path and os.path.exists(self.model_path):
            try:
                self.model_hash = file_hash(self.model_path, store=self._store, cache=self._store is not None)
            except OSError:
                self.model_hash = None  # unreadable model file: the run itself will say why
        if self._store is None:
            self._fall_back(self._fallback_reason or "unknown error")
            return
        try:
            self.id = self._store.insert_run(self._row())
        except StoreUnavailable as e:
            self._fall_back(e.reason)

    def _save(self) -> None:
        if self._store is not None:
            try:
                self._store.update_run(
                    self.id,
                    {
                        "outputs": self.outputs,
                        "metrics": self.metrics,
                        "timings": self.timings,
                        "status": self.status,
                        "error": self.error,
                        "finished": self.finished,
                        "model_hash": self.model_hash,
                    },
                )
                return
            except StoreUnavailable as e:
                self._fall_back(e.reason)
                return
        self._write_fallback()

    def _fall_back(self, reason: str) -> None:
        """Stop using the store; keep the run in a JSON file (said once on stderr) or, failing that,
        print it on stderr when it ends."""
        self._release_store()
        self._fallback_reason = reason
        path = _fallback_dir() / f"lmlab-run-{self.id}.json"
        try:
            path.write_text(self._fallback_json(), encoding="utf-8")
            self._fallback_path = path
        except OSError:
            self._fallback_path = None
            return  # said with the JSON itself when the run ends (see _finish)
        sys.stderr.write(
            f"lmlab: could not record run {self.id} in {self._db_path} ({reason}); "
            f"it is being written to {path} instead (`lmlab runs import {path}` adds it later).\n"
        )

    def _fallback_json(self) -> str:
        """The run as JSON, with why it is not in the store."""
        return to_json({**self.as_dict(), "not_recorded_because": self._fallback_reason})

    def _write_fallback(self) -> None:
        if self._fallback_path is None:
            return
        try:
            self._fallback_path.write_text(self._fallback_json(), encoding="utf-8")
        except OSError:
            pass  # the announced file stays with the last state it could take

    def _finish(self, status: str, error: str | None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        self._save()
        if self._store is None and self._fallback_path is None:
            sys.stderr.write(
                f"lmlab: could not record run {self.id} in {self._db_path} ({self._fallback_reason}) "
                f"and {_fallback_dir()} is not writable either; here is the run as JSON: "
                f"{self._fallback_json()}\n"
            )
        self._release_store()

    def _release_store(self) -> None:
        if self._store is not None and self._own_store:
            self._store.close()
        self._store = None


def _exit_status(exc: BaseException) -> str:
    """The run status for an exception leaving the with-block."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    code = exc.code if isinstance(exc, SystemExit) else getattr(exc, "exit_code", None)
    is_exit = isinstance(exc, SystemExit) or type(exc).__name__ in ("Exit", "Abort")  # typer/click exits
    if is_exit and type(exc).__name__ == "Abort":
        return "interrupted"  # click's Abort is how it reports Ctrl-C
    if is_exit and code in (0, None):
        return "complete"
    if is_exit and code == 130:
        return "interrupted"
    return "failed"


def _error_text(exc: BaseException) -> str:
    """The exception in one line, then its traceback (for `lmlab runs show`)."""
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return head + "\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


@contextlib.contextmanager
def record_run(
    command: str,
    *,
    model: str | None = None,
    model_path: str | os.PathLike | None = None,
    config: dict | None = None,
    seed: int | None = None,
    inputs: dict | None = None,
    record: bool = True,
    wandb: bool | None = None,
    argv: list[str] | None = None,
    store: RunStore | None = None,
) -> Iterator[Run]:
    """Record one run of ``command`` (see the module docstring for the life of a run).

    ``model_path``: the model file or folder; its sha256 is stored (cached by path, size, mtime).
    ``record=False``: a run object that writes nothing. ``wandb``: mirror to wandb at the end
    (None: read LMLAB_WANDB). ``argv``: default sys.argv. ``store``: default the one in LMLAB_HOME.
    """
    run = Run(
        command, model=model, model_path=model_path, config=config, seed=seed, inputs=inputs, argv=argv, record=record
    )
    if not record:
        yield run
        return
    mirror = wandb_mirror.requested(wandb)
    if mirror:
        wandb_mirror.require()  # fail before the work, not after it
    run._start(store)
    try:
        yield run
    except BaseException as exc:
        status = _exit_status(exc)
        run._finish(status, None if status in ("complete", "interrupted") else _error_text(exc))
        if mirror:
            wandb_mirror.mirror(run.as_dict())
        raise
    run._finish("complete", None)
    if mirror:
        wandb_mirror.mirror(run.as_dict())
