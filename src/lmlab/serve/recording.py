"""A serve session is one run in the store, with a row per request, written in batches.

The event loop only appends a dict to a list (``RequestLog.add``); a background thread writes
what has gathered every ``FLUSH_EVERY_S`` seconds (sooner when ``FLUSH_ROWS`` rows wait), each
batch in one SQLite transaction, and updates the run's totals (``run.metrics``: requests,
errors, prompt and completion tokens) at the same time. ``close()`` writes the rest.

If the store cannot take the rows (disk full...), they are kept in ``run.outputs['requests']``,
which goes wherever the run itself falls back to (a JSON file), so nothing recorded is lost.
"""

from __future__ import annotations

import sys
import threading

from lmlab.runs.store import StoreUnavailable

FLUSH_EVERY_S = 1.0  # write the gathered rows at least this often (s)
FLUSH_ROWS = 256  # ... or as soon as this many wait


class RequestLog:
    """Collects request rows of one serve run and writes them to its store in batches.

    ``run``: the ``lmlab.runs.Run`` of the session; ``store``: the ``RunStore`` it was recorded in
    (None when the store was unavailable). ``log_text=False`` (--no-log-text) keeps prompts and
    outputs out of the rows.
    """

    def __init__(self, run, store, *, log_text: bool = True):
        self.run, self.store, self.log_text = run, store, log_text
        self.totals = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._failed = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmlab-serve-log", daemon=True)
            self._thread.start()

    def add(self, row: dict) -> None:
        """Queue one request's row (keys: see ``lmlab.runs.store.REQUEST_COLUMNS``). Cheap: no I/O."""
        if not self.log_text:
            row["prompt"] = row["output"] = None
        with self._lock:
            self._seq += 1
            row["seq"] = self._seq
            self._rows.append(row)
            t = self.totals
            t["requests"] += 1
            t["errors"] += row.get("status", 200) >= 400
            t["prompt_tokens"] += row.get("prompt_tokens") or 0
            t["completion_tokens"] += row.get("completion_tokens") or 0
            full = len(self._rows) >= FLUSH_ROWS
        if full:
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write the rows gathered so far and the run's totals."""
        with self._lock:
            rows, self._rows = self._rows, []
            totals = dict(self.totals)
        if rows:
            self._write(rows)
        self.run.add_metrics(**totals)
        self.run.checkpoint(force=True)

    def _write(self, rows: list[dict]) -> None:
        if self.store is not None and not self._failed:
            try:
                self.store.add_requests(self.run.id, rows)
                return
            except StoreUnavailable as e:
                self._failed = True
                sys.stderr.write(
                    f"lmlab: could not record requests in {e.path} ({e.reason}); they are kept with "
                    f"the run's outputs instead.\n"
                )
        if not isinstance(self.run.outputs, dict):
            self.run.outputs = {}
        self.run.outputs.setdefault("requests", []).extend(rows)

    def close(self) -> None:
        """Stop the writer and write what is left (the caller then closes the run)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()
