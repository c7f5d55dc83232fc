"""Start a real `lmlab serve` process, as a user would, and talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"ready at (http://\S+)/v1")


class ServeProcess:
    """``python -m lmlab.cli.main serve --port 0 ARGS``; its stderr goes to ``folder/serve-stderr.txt``.

    It shares the tests' LMLAB_HOME (the native build and machine measurements are made once),
    so it records into the same run store; ``run()`` finds its run there by its pid.
    ``wait_ready()`` waits for the line that prints the URL (and sets ``url``); ``stop()`` sends
    SIGTERM (the server drains) and returns the exit code.
    """

    def __init__(self, args: list[str], folder: Path, env: dict | None = None, port: int = 0):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "serve-stderr.txt"
        self._log = open(self.log_path, "w")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        full_env.pop("LMLAB_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmlab.cli.main", "serve", "--port", str(port), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=full_env,
        )
        self.url: str | None = None

    def run(self) -> dict:
        """Its run in the store (the newest 'serve' run written by its process)."""
        from lmlab.runs import RunStore

        with RunStore() as store:
            mine = [r for r in store.list(limit=None, command="serve") if r["pid"] == self.proc.pid]
        assert mine, f"no serve run of process {self.proc.pid} in the store"
        return mine[0]

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 120.0) -> re.Match:
        """Wait until stderr matches ``pattern``; fail with the stderr if the process exits first."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.stderr())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"lmlab serve exited with {self.proc.returncode}:\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"lmlab serve did not print {rx.pattern!r} within {timeout} s:\n{self.stderr()}")

    def wait_ready(self, timeout: float = 120.0) -> str:
        self.url = self.wait_for(READY, timeout).group(1)
        return self.url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"lmlab serve did not stop within {timeout} s of signal {sig}:\n{self.stderr()}")
        self._log.close()
        return self.proc.returncode


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent-event stream (its lines), up to and including '[DONE]'."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            out.append("[DONE]")
            break
        out.append(json.loads(data))
    return out


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (the sum over samples that match the labels given)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    if not found:
        raise AssertionError(f"no sample {name}{labels} in the metrics:\n{text}")
    return total
