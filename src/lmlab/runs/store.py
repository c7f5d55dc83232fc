"""The run store: every generate / chat / inspect / bench / eval / train run is one row in SQLite.

Where: ``$LMLAB_HOME/runs.db`` (default ``~/.lmlab/runs.db``).

How it stays safe:
- WAL journal and a busy timeout, and every write is one short ``BEGIN IMMEDIATE`` transaction,
  so several processes can record at once and none loses a run.
- The row is inserted when a run starts (status ``running``) and updated as it goes, so a crash
  or SIGKILL leaves a trace; ``list`` shows such a row as ``incomplete`` once its process is gone.
- The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes version i to
  i + 1 in one transaction. A database written by a newer lmlab is refused and never modified.

What a run looks like to callers is a plain dict (see ``RunStore.get``), JSON-serialisable, with
timestamps as ISO-8601 local time strings.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.host import lmlab_home

DB_NAME = "runs.db"
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another process's transaction (ms)

# MIGRATIONS[i] takes the schema from version i to i + 1. Never edit a released step: add one.
MIGRATIONS: list[tuple[str, ...]] = [
    # v1: the first schema. JSON columns hold UTF-8 JSON text; times are unix seconds (REAL).
    (
        """CREATE TABLE runs (
            id          TEXT PRIMARY KEY,
            created     REAL NOT NULL,
            finished    REAL,
            command     TEXT NOT NULL,
            argv        TEXT,
            model       TEXT,
            model_hash  TEXT,
            config      TEXT,
            seed        INTEGER,
            inputs      TEXT,
            outputs     TEXT,
            metrics     TEXT,
            timings     TEXT,
            versions    TEXT,
            host        TEXT,
            status      TEXT NOT NULL DEFAULT 'running',
            error       TEXT
        )""",
    ),
    # v2: which process wrote the run (so `list` can tell a live run from one killed mid-way),
    # where the model file was, a cache of model file hashes, and an index for newest-first lists.
    (
        "ALTER TABLE runs ADD COLUMN pid INTEGER",
        "ALTER TABLE runs ADD COLUMN hostname TEXT",
        "ALTER TABLE runs ADD COLUMN model_path TEXT",
        """CREATE TABLE file_hashes (
            path      TEXT PRIMARY KEY,
            size      INTEGER NOT NULL,
            mtime_ns  INTEGER NOT NULL,
            sha256    TEXT NOT NULL,
            hashed_at REAL NOT NULL
        )""",
        "CREATE INDEX runs_created ON runs (created)",
    ),
    # v3: the requests a `lmlab serve` run answered, one row each (written in batches).
    (
        """CREATE TABLE serve_requests (
            run_id            TEXT NOT NULL,
            seq               INTEGER NOT NULL,
            request_id        TEXT,
            created           REAL NOT NULL,
            endpoint          TEXT NOT NULL,
            model             TEXT,
            status            INTEGER NOT NULL,
            stream            INTEGER,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            finish_reasons    TEXT,
            params            TEXT,
            timings           TEXT,
            prompt            TEXT,
            output            TEXT,
            error             TEXT,
            PRIMARY KEY (run_id, seq)
        )""",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

JSON_COLUMNS = ("argv", "config", "inputs", "outputs", "metrics", "timings", "versions", "host")
# serve_requests: seq counts a run's requests from 1; created is unix seconds; status the HTTP status;
# prompt and output are NULL when the server ran with --no-log-text.
REQUEST_COLUMNS = (
    "run_id",
    "seq",
    "request_id",
    "created",
    "endpoint",
    "model",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "finish_reasons",
    "params",
    "timings",
    "prompt",
    "output",
    "error",
)
REQUEST_JSON_COLUMNS = ("finish_reasons", "params", "timings", "prompt", "output")
COLUMNS = (
    "id",
    "created",
    "finished",
    "command",
    "argv",
    "model",
    "model_path",
    "model_hash",
    "config",
    "seed",
    "inputs",
    "outputs",
    "metrics",
    "timings",
    "versions",
    "host",
    "status",
    "error",
    "pid",
    "hostname",
)

# Files that define a model when model_path is a folder (weights, config, tokenizer).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".model", ".txt", ".tiktoken")


class StoreUnavailable(LmlabError):
    """The store could not be read or written (disk full, I/O error, read-only, not a database).

    ``reason`` is SQLite's or the OS's short description, e.g. 'database or disk is full'.
    """

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        if is_damage(reason):
            super().__init__(
                f"the run store at {path} is damaged ({reason}); `lmlab runs check --move-aside` moves "
                "it aside (keeping every run it can still read) and starts a new one."
            )
        else:
            super().__init__(
                f"could not use the run store at {path} ({reason}); free disk space, make the folder "
                "writable, or set LMLAB_HOME to another folder."
            )


DAMAGE_WORDS = ("not a database", "malformed", "corrupt", "disk image")


def is_damage(reason: str) -> bool:
    """Whether SQLite's complaint means the file itself is damaged (rather than full or unwritable)."""
    return any(w in reason.lower() for w in DAMAGE_WORDS)


def default_db_path() -> Path:
    return lmlab_home() / DB_NAME


# ---------------------------------------------------------------------------------------------
# JSON and time helpers


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback: numpy/torch scalars -> numbers, tensors/arrays -> lists, paths -> str."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    return str(obj)  # never let an odd object lose the whole run


def to_json(obj: Any) -> str | None:
    """JSON text for a column (None stays NULL). Never raises: what JSON cannot hold (a cycle,
    tuple keys) is kept as its repr, so a record is never lost to an odd value."""
    if obj is None:
        return None
    try:
        return json.dumps(obj, default=_jsonable, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps({"unserialisable": repr(obj)[:100_000]}, ensure_ascii=False)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def iso_time(ts: float | None) -> str | None:
    """Unix seconds -> '2025-01-31T14:02:07+01:00' in local time (None stays None)."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def new_run_id(now: float | None = None) -> str:
    """A 12-hex-digit id: 8 digits of unix seconds (so ids sort by time) + 4 random digits."""
    now = time.time() if now is None else now
    return f"{int(now) & 0xFFFFFFFF:08x}{os.urandom(2).hex()}"


# ---------------------------------------------------------------------------------------------
# Process liveness: a 'running' row whose process is gone was killed (SIGKILL, power loss, OOM).


def process_alive(pid: int | None, hostname: str | None, created: float) -> bool | None:
    """True/False when we can tell, None when the run is on another machine."""
    if pid is None:
        return False  # rows from before v2 have no pid; they cannot still be running
    if hostname and hostname != platform.node():
        return None
    try:
        import psutil
    except ImportError:  # psutil is a dependency, but be robust on odd installs
        if os.name != "posix":
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        # A process that started after the run was created reused the pid: the run's process is gone.
        return proc.create_time() <= created + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False if not psutil.pid_exists(pid) else None


def status_label(run: dict) -> str:
    """What a person should read: the status, with 'running' split into running / incomplete."""
    if run["status"] == "running" and run.get("incomplete"):
        return "incomplete"
    return run["status"]


# ---------------------------------------------------------------------------------------------
# Package versions (computed once per process; the host's details are lmlab.host.host_details)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict:
    """python, lmlab, and the installed versions of the packages that change results or speed."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in (
        "lmlab",
        "torch",
        "numpy",
        "transformers",
        "tokenizers",
        "safetensors",
        "gguf",
        "huggingface_hub",
        "llama_cpp_python",
        "wandb",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")  # only if already imported: importing it costs seconds
    if torch is not None:
        versions["torch"] = torch.__version__
        if getattr(torch.version, "cuda", None):
            versions["cuda"] = torch.version.cuda
        if getattr(torch.version, "hip", None):
            versions["hip"] = torch.version.hip
    return versions


# ---------------------------------------------------------------------------------------------
# Model file hashing


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model_files(folder: Path) -> list[Path]:
    """The files that define a model in a folder (weights, config, tokenizer), sorted, hidden ones skipped."""
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in MODEL_FILE_SUFFIXES and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def file_hash(path: str | os.PathLike, store: "RunStore | None" = None, cache: bool = True) -> str:
    """sha256 (hex) of a model file, or of a model folder's files.

    A folder's hash is the sha256 of the lines 'relative/path<TAB>sha256' of its weight, config
    and tokenizer files, so the same weights in another folder hash the same. Each file's hash is
    cached in the store under (absolute path, size, mtime), so a multi-GB file is read once.
    ``store=None`` uses the default store; ``cache=False`` or a store that cannot be opened
    still gives the hash, computed from the bytes.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LmlabError(f"cannot hash {p}: it does not exist; pass the path of a model file or folder.")
    own_store = None
    if not cache:
        store = None
    elif store is None:
        try:
            store = own_store = RunStore()
        except LmlabError:  # unwritable, or from a newer lmlab: hash without the cache
            store = None
    try:
        if p.is_dir():
            lines = [f"{f.relative_to(p).as_posix()}\t{_cached_hash(f, store)}\n" for f in _model_files(p)]
            return hashlib.sha256("".join(lines).encode()).hexdigest()
        return _cached_hash(p, store)
    finally:
        if own_store is not None:
            own_store.close()


def _cached_hash(path: Path, store: "RunStore | None") -> str:
    st = path.stat()
    key = str(path.resolve())
    if store is not None:
        cached = store._cached_file_hash(key, st.st_size, st.st_mtime_ns)
        if cached:
            return cached
    digest = _sha256_file(path)
    if store is not None:
        store._remember_file_hash(key, st.st_size, st.st_mtime_ns, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# The store


def _connect(path: Path) -> sqlite3.Connection:
    """Open the SQLite file (tests replace this to simulate a full disk)."""
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so every write is one short transaction
    # that waits for (rather than fails against) another process's write.
    return sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


# SQLite can report a lock without waiting for the busy timeout (e.g. while another process
# opens, recovers or checkpoints the WAL); such errors pass, so they are retried a while.
TRANSIENT_ERRORS = ("locked", "busy", "locking protocol")
TRANSIENT_RETRY_S = 10.0  # give up (and fall back) after this long (s)


def _retry_transient(action):
    """Run ``action()``; retry it with backoff while SQLite says the database is busy."""
    deadline, delay = time.monotonic() + TRANSIENT_RETRY_S, 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as e:
            if not any(t in str(e).lower() for t in TRANSIENT_ERRORS) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class RunStore:
    """The SQLite run store. Open one, use it, ``close()`` it (or use ``with RunStore() as s:``).

    ``path``: the database file; default ``$LMLAB_HOME/runs.db``.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        self._conn: sqlite3.Connection | None = None
        # One connection may serve several threads (the web app): keep their transactions apart.
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(self.path)
            _retry_transient(self._open)
        except LmlabError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise StoreUnavailable(self.path, _reason(e)) from e

    def _open(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Check the version before anything that could write (journal mode, migrations), so a
        # database from a newer lmlab is left byte-for-byte as it was.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._refuse_newer(version)
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        if version < SCHEMA_VERSION:
            self._migrate()

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise LmlabError(
                f"{self.path} was written by a newer lmlab (schema v{version}, this one knows "
                f"v{SCHEMA_VERSION}); upgrade lmlab or set LMLAB_HOME to another folder."
            )

    def _migrate(self) -> None:
        """Apply the missing migrations in one transaction (another process may be doing it too)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # re-read under the write lock
            self._refuse_newer(version)
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, sql: str, params: tuple = ()) -> int:
        """One statement in its own short write transaction; returns the rows changed."""
        if self._conn is None:
            raise StoreUnavailable(self.path, "the store is closed")
        with self._lock:
            try:
                return _retry_transient(lambda: self._transaction(sql, params))
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as e:
                raise StoreUnavailable(self.path, _reason(e)) from e

    def _transaction(self, sql: str, params: tuple) -> int:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            n = self._conn.execute(sql, params).rowcount
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return n

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self._conn is None:
            raise StoreUnavailable(self.path, "the store is closed")
        try:
            with self._lock:
                return _retry_transient(lambda: self._conn.execute(sql, params).fetchall())
        except sqlite3.Error as e:
            raise StoreUnavailable(self.path, _reason(e)) from e

    # -- writing runs (used by record_run) ------------------------------------------------------

    def insert_run(self, row: dict) -> str:
        """Insert a new row; picks a fresh id if ``row['id']`` is taken. Returns the id used."""
        for _ in range(50):
            values = tuple(to_json(row.get(c)) if c in JSON_COLUMNS else row.get(c) for c in COLUMNS)
            try:
                self._write(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values)
                return row["id"]
            except sqlite3.IntegrityError:
                row["id"] = new_run_id(row.get("created"))  # same second, same random suffix: retry
        raise StoreUnavailable(self.path, "could not find a free run id")

    def add_requests(self, run_id: str, rows: list[dict]) -> None:
        """Append a serve run's request rows (keys: REQUEST_COLUMNS but run_id) in one transaction."""
        if not rows:
            return
        if self._conn is None:
            raise StoreUnavailable(self.path, "the store is closed")
        sql = (
            f"INSERT OR REPLACE INTO serve_requests ({', '.join(REQUEST_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"
        )
        values = [
            tuple(
                run_id if c == "run_id" else to_json(row.get(c)) if c in REQUEST_JSON_COLUMNS else row.get(c)
                for c in REQUEST_COLUMNS
            )
            for row in rows
        ]

        def insert():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, values)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

        with self._lock:
            try:
                _retry_transient(insert)
            except sqlite3.Error as e:
                raise StoreUnavailable(self.path, _reason(e)) from e

    def update_run(self, run_id: str, fields: dict) -> None:
        """Set some columns of one row (JSON columns are serialised here)."""
        names = [c for c in fields if c in COLUMNS and c != "id"]
        values = tuple(to_json(fields[c]) if c in JSON_COLUMNS else fields[c] for c in names)
        self._write(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in names)} WHERE id = ?", values + (run_id,))

    # -- file hash cache -------------------------------------------------------------------------

    def _cached_file_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        try:
            rows = self._read(
                "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?", (path, size, mtime_ns)
            )
        except StoreUnavailable:
            return None
        return rows[0][0] if rows else None

    def _remember_file_hash(self, path: str, size: int, mtime_ns: int, digest: str) -> None:
        try:
            self._write(
                "INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, sha256, hashed_at) VALUES (?, ?, ?, ?, ?)",
                (path, size, mtime_ns, digest, time.time()),
            )
        except StoreUnavailable:
            pass  # the cache is an optimisation: a full disk must not stop the hash

    # -- reading ---------------------------------------------------------------------------------

    def _row_to_run(self, values: tuple) -> dict:
        raw = dict(zip(COLUMNS, values))
        run = {c: (_from_json(raw[c]) if c in JSON_COLUMNS else raw[c]) for c in COLUMNS}
        created, finished = raw["created"], raw["finished"]
        run["created"], run["finished"] = iso_time(created), iso_time(finished)
        run["duration_s"] = round(finished - created, 3) if finished is not None else None
        alive = process_alive(raw["pid"], raw["hostname"], created) if raw["status"] == "running" else None
        # A 'running' row whose process is gone never finished: killed, crashed or lost power.
        run["incomplete"] = raw["status"] == "running" and alive is False
        return run

    def list(
        self, limit: int | None = 20, command: str | None = None, model: str | None = None, search: str | None = None
    ) -> list[dict]:
        """Runs, newest first. ``search`` is a case-insensitive substring of the command, model,
        config, inputs, outputs or error; ``command`` and ``model`` match exactly."""
        where, params = [], []
        if command:
            where.append("command = ?")
            params.append(command)
        if model:
            where.append("model = ?")
            params.append(model)
        if search:
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            cols = ("command", "model", "config", "inputs", "outputs", "error", "id")
            where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in cols) + ")")
            params += [like] * len(cols)
        sql = f"SELECT {', '.join(COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC"
        if limit is not None and limit > 0:
            sql += f" LIMIT {int(limit)}"
        return [self._row_to_run(r) for r in self._read(sql, tuple(params))]

    def count(self) -> int:
        return self._read("SELECT count(*) FROM runs")[0][0]

    def requests(self, run_id: str, limit: int | None = None) -> list[dict]:
        """The requests a serve run answered, in order (``seq`` from 1); JSON columns decoded."""
        full = self.resolve_id(run_id)
        sql = f"SELECT {', '.join(REQUEST_COLUMNS)} FROM serve_requests WHERE run_id = ? ORDER BY seq"
        if limit is not None and limit > 0:
            sql += f" LIMIT {int(limit)}"
        rows = [dict(zip(REQUEST_COLUMNS, r)) for r in self._read(sql, (full,))]
        for row in rows:
            for c in REQUEST_JSON_COLUMNS:
                row[c] = _from_json(row[c])
            row["stream"] = bool(row["stream"]) if row["stream"] is not None else None
        return rows

    def request_count(self, run_id: str) -> int:
        """How many requests a serve run answered (0 for any other run)."""
        return self._read("SELECT count(*) FROM serve_requests WHERE run_id = ?", (self.resolve_id(run_id),))[0][0]

    def resolve_id(self, run_id: str) -> str:
        """The full id for an id, a unique prefix of one, 'last' (newest run) or 'last-N'."""
        text = (run_id or "").strip().lower()
        if text == "last" or (text.startswith("last-") and text[5:].isdigit()):
            back = int(text[5:]) if text != "last" else 0
            rows = self._read("SELECT id FROM runs ORDER BY created DESC, id DESC LIMIT 1 OFFSET ?", (back,))
            if not rows:
                raise LmlabError(
                    f"there is no run '{run_id}' (the store holds {self.count()} runs); "
                    "`lmlab runs list` shows the ids."
                )
            return rows[0][0]
        if not text or any(ch not in "0123456789abcdef" for ch in text):
            raise LmlabError(f"no run with id '{run_id}'; `lmlab runs list` shows the ids.")
        rows = self._read("SELECT id FROM runs WHERE id LIKE ? ORDER BY created DESC LIMIT 6", (text + "%",))
        if not rows:
            raise LmlabError(f"no run with id '{run_id}'; `lmlab runs list` shows the ids.")
        ids = [r[0] for r in rows]
        if text in ids:
            return text
        if len(rows) > 1:
            shown = ", ".join(ids[:5])
            raise LmlabError(
                f"run id '{run_id}' matches several runs ({shown}{', ...' if len(rows) > 5 else ''}); "
                "give more of the id."
            )
        return rows[0][0]

    def get(self, run_id: str) -> dict:
        """One run as a dict (``run_id`` may be a unique prefix, 'last' or 'last-N').

        Keys: id, created, finished (ISO-8601 local time), duration_s (s), command, argv, model,
        model_path, model_hash (sha256 hex), config, seed, inputs, outputs, metrics, timings,
        versions, host, status, incomplete (True when status is 'running' but its process is
        gone), error, pid, hostname.
        """
        full = self.resolve_id(run_id)
        rows = self._read(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE id = ?", (full,))
        if not rows:  # deleted between the two statements
            raise LmlabError(f"no run with id '{run_id}'; `lmlab runs list` shows the ids.")
        return self._row_to_run(rows[0])

    def delete(self, run_id: str) -> str:
        """Delete one run; returns its full id."""
        full = self.resolve_id(run_id)
        self._write("DELETE FROM serve_requests WHERE run_id = ?", (full,))
        self._write("DELETE FROM runs WHERE id = ?", (full,))
        return full

    def diff(self, a: str, b: str) -> dict:
        """What differs between two runs: see ``diff_runs``."""
        return diff_runs(self.get(a), self.get(b))


# ---------------------------------------------------------------------------------------------
# Diff

DIFF_SECTIONS = ("run", "config", "inputs", "outputs", "metrics", "versions", "host")
RUN_FIELDS = ("command", "model", "model_hash", "model_path", "seed", "status")
_MISSING = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {'a.b': leaf, 'texts[0]': leaf}. A list of plain numbers (token ids,
    a loss curve) stays one leaf, so a diff says 'token_ids[0] changed' rather than 500 rows."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = value
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and not all(isinstance(x, (int, float, bool)) or x is None for x in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix or "value"] = value
    return out


def ratio(a: Any, b: Any) -> float | None:
    """b / a for two real numbers with a != 0, else None."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return b / a if a else None


def diff_runs(a: dict, b: dict) -> dict:
    """Structured differences between two run dicts.

    Returns {'a': id, 'b': id, 'changes': [{'section', 'key', 'change': 'changed'|'added'|'removed',
    'a', 'b', 'ratio' (b/a for numbers, else None)}], 'same': {section: number of equal keys}}.
    'added' means only b has the key. Sections: run, config, inputs, outputs, metrics, versions, host.
    """
    changes, same = [], {}
    for section in DIFF_SECTIONS:
        if section == "run":
            fa = {k: a.get(k) for k in RUN_FIELDS}
            fb = {k: b.get(k) for k in RUN_FIELDS}
        else:
            fa, fb = flatten(a.get(section) or {}), flatten(b.get(section) or {})
        same[section] = 0
        for key in list(fa) + [k for k in fb if k not in fa]:
            va, vb = fa.get(key, _MISSING), fb.get(key, _MISSING)
            if va == vb:
                same[section] += 1
                continue
            change = "added" if va is _MISSING else "removed" if vb is _MISSING else "changed"
            va = None if va is _MISSING else va
            vb = None if vb is _MISSING else vb
            changes.append({"section": section, "key": key, "change": change, "a": va, "b": vb, "ratio": ratio(va, vb)})
    return {"a": a["id"], "b": b["id"], "changes": changes, "same": same}


# ---------------------------------------------------------------------------------------------
# Checking a store, moving a damaged one aside, importing runs that fell back to a JSON file


def check_store(path: str | os.PathLike | None = None) -> dict:
    """Read-only health check of a store file: {'path', 'exists', 'ok', 'problems' (SQLite's
    complaints), 'runs' (count, None if unreadable), 'schema' (user_version)}. Never writes."""
    p = Path(path) if path is not None else default_db_path()
    report = {"path": str(p), "exists": p.exists(), "ok": True, "problems": [], "runs": 0, "schema": None}
    if not p.exists():
        return report
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as e:
        return {**report, "ok": False, "problems": [_reason(e)], "runs": None}
    try:
        report["schema"] = conn.execute("PRAGMA user_version").fetchone()[0]
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        report["problems"] = problems
        report["runs"] = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error as e:
        report["problems"].append(_reason(e))
        report["runs"] = None if report["runs"] == 0 else report["runs"]
    finally:
        conn.close()
    report["ok"] = not report["problems"]
    return report


def _readable_rows(path: Path) -> list[dict]:
    """Every run row that can still be read from a (damaged) store file, as column -> raw value."""
    rows: list[dict] = []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows
    try:
        have = [r[1] for r in conn.execute("PRAGMA table_info(runs)").fetchall() if r[1] in COLUMNS]
        if "id" not in have:
            return rows
        cursor = conn.execute(f"SELECT {', '.join(have)} FROM runs")
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.Error:
                break  # a damaged page: keep what came before it
            if row is None:
                break
            rows.append(dict(zip(have, row)))
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return rows


def move_aside(path: str | os.PathLike | None = None) -> dict:
    """Rename a (damaged) store file and its WAL/SHM files to runs.db.damaged-<time>, start a new
    store in its place and copy into it every run still readable from the old one.
    Returns {'moved_to': path, 'recovered': count}."""
    p = Path(path) if path is not None else default_db_path()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = p.with_name(f"{p.name}.damaged-{stamp}")
    try:
        p.rename(target)
        for suffix in ("-wal", "-shm"):
            side = p.with_name(p.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
    except OSError as e:
        raise LmlabError(f"could not move {p} aside ({e.strerror or e}); move it by hand, e.g. mv {p} {target}") from e
    rows = _readable_rows(target)
    recovered = 0
    with RunStore(p) as store:
        for row in rows:
            names = list(row)
            try:
                recovered += store._write(
                    f"INSERT OR IGNORE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                    tuple(row.values()),
                )
            except sqlite3.Error:
                continue
    return {"moved_to": str(target), "recovered": recovered}


def _unix(value: Any) -> float | None:
    """ISO-8601 text (as RunStore.get returns) or unix seconds -> unix seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    return _dt.datetime.fromisoformat(str(value)).timestamp()


def import_run(store: RunStore, run: dict) -> str:
    """Add a run given as the dict ``RunStore.get`` returns (e.g. the JSON file a run falls back to
    when the store cannot be written). Returns its id; refuses an id that is already stored."""
    if not isinstance(run, dict) or not run.get("id") or not run.get("command") or not run.get("created"):
        raise LmlabError(
            "this is not an lmlab run (it needs an id, a command and a created time); pass a file "
            "that lmlab wrote, e.g. /tmp/lmlab-run-<id>.json."
        )
    if store._read("SELECT 1 FROM runs WHERE id = ?", (run["id"],)):
        raise LmlabError(f"run {run['id']} is already in the store at {store.path}; nothing to import.")
    row = {c: run.get(c) for c in COLUMNS}
    try:
        row["created"], row["finished"] = _unix(run["created"]), _unix(run.get("finished"))
    except ValueError as e:
        raise LmlabError(f"run {run['id']} has a time lmlab cannot read ({e}); pass the file as lmlab wrote it.") from e
    if row["status"] == "running":  # its process is gone: it never finished
        row["status"] = "interrupted" if row["finished"] else "running"
    store.insert_run(row)
    return row["id"]
