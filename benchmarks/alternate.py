"""Two (or more) sides of a speed comparison, each in its own process, taking turns.

Each side runs in a fresh process of its own, so neither sees the other's allocator state,
thread pools or caches, and each runs as its own tool would run it (lmlab's trainer keeps its
freed memory, a plain loop does not). The sides take turns: ``chunk`` steps of one, then
``chunk`` of the next, while the others wait, so a change in the machine's load falls on all
alike. Wall and CPU seconds are summed per side over the timed steps.

    sides = Alternating({"lmlab": (build_lmlab, args), "plain": (build_plain, args)})
    result = sides.run(warmup=1, steps=30, chunk=5)   # {name: {"wall_s", "cpu_s", "first_loss", "loss"}}
    sides.close()

A builder is a module-level function ``build(args) -> step``, and ``step(i)`` runs step ``i`` and
returns its loss as a float (reading it waits for the step). Builders run in the child process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time

_HELD = contextlib.ExitStack()


def hold(context) -> None:
    """Enter ``context`` for the rest of this (worker) process: a builder's way to run its side
    inside, e.g., ``lmlab.host.keep_freed_memory()`` as the tool it measures does."""
    _HELD.enter_context(context)


def _serve(conn, build, args) -> None:
    try:
        step = build(args)
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001 - the parent says what failed
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        start, n = msg
        wall, cpu = time.perf_counter(), time.process_time()
        loss = None
        for i in range(start, start + n):
            loss = step(i)
        conn.send(("done", (time.perf_counter() - wall, time.process_time() - cpu, loss)))


class Alternating:
    def __init__(self, builders: dict):
        ctx = mp.get_context("spawn")
        self.sides = {}
        for name, (build, args) in builders.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, build, args), daemon=True)
            proc.start()
            self.sides[name] = (proc, parent)
        for name, (_, conn) in self.sides.items():
            kind, value = conn.recv()
            if kind == "error":
                self.close()
                raise RuntimeError(f"{name}: {value}")

    def _steps(self, name: str, start: int, n: int):
        conn = self.sides[name][1]
        conn.send((start, n))
        kind, value = conn.recv()
        if kind != "done":
            raise RuntimeError(f"{name}: {value}")
        return value

    def run(self, warmup: int, steps: int, chunk: int) -> dict:
        """``warmup`` untimed steps per side, then ``steps`` timed steps per side in turns of ``chunk``."""
        out = {name: {"wall_s": 0.0, "cpu_s": 0.0, "first_loss": None, "loss": None} for name in self.sides}
        for name in self.sides:
            if warmup:
                out[name]["first_loss"] = self._steps(name, 0, warmup)[2]
        i = warmup
        while i < warmup + steps:
            n = min(chunk, warmup + steps - i)
            for name in self.sides:
                wall, cpu, loss = self._steps(name, i, n)
                out[name]["wall_s"] += wall
                out[name]["cpu_s"] += cpu
                out[name]["loss"] = loss
                if out[name]["first_loss"] is None:
                    out[name]["first_loss"] = loss
            i += n
        return out

    def close(self) -> None:
        for proc, conn in self.sides.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
