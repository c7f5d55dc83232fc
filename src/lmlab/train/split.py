"""A CPU's cores as data parallelism inside one process: each batch's rows split between threads.

A training step of a small model on a CPU is mostly matrix products, and PyTorch runs each one
on all the cores at once: every product, norm and attention call divides its work between the
threads and waits for the slowest at its end, a few hundred times a step. ``RowSplit`` runs the
step as DDP runs it on several machines, inside one process: each of ``workers`` threads (the
calling one and ``workers - 1`` of its own) takes its share of every micro-batch's rows through
the forward and backward of its own replica of the model, on one torch thread (or ``threads //
workers``), so no operation waits for another core. The replicas are the model's parameters
(the same memory: the optimiser's update is seen by all), each with its own gradients, which
``reduce`` adds into the model's in replica order, so a run sums the same way every time and a
resumed run repeats the same losses. The step's other passes over the parameters (that sum, the
gradient norm, AdamW) are split between the threads too, by parameter (``map``).

Each share's loss is its mean times its share of the rows, so the sum is the whole batch's mean
loss and the gradients are the whole batch's: the same step as one thread over all rows, up to
the order of the sums. The threads hand the interpreter lock to each other between operations;
the operations themselves run without it. Processes instead of threads were measured too (a
helper process on shared memory): less gain at 10M GPT-2 (1.4% a step, where the threads gained
3.3% in a like run), and a second interpreter to start.

While a step runs, this thread too uses ``threads_each`` torch threads (``step``): an OpenMP pool
thread that had run an operation of the step would spin-wait for more work (OpenMP's idle threads
spin for a while before they sleep) on the cores the other shares compute on.

It needs a model whose forward draws no random numbers (lmlab's Transformer has no dropout).
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

# The least work (FLOPs of a forward and backward) a share must have for the split to be chosen by
# itself: the threads wait for each other's interpreter lock for ~10 ms a step at 10M, which is
# ~1.5% of its 0.7 s share (66 GFLOP) and more than the split gains on nanoGPT's baby (1.8 GFLOP
# a share: 35.8 -> 37.1 ms a step, where 10M went 893 -> 857 ms).
MIN_SHARE_FLOPS = 20e9


def split_workers(asked: int, rows: int, threads: int, flops_per_row: float) -> int:
    """How many threads take a share of ``rows`` rows: ``asked`` where it is above 0, else the
    most of ``threads`` that divides the rows evenly and leaves each share MIN_SHARE_FLOPS of
    work (1: no split)."""
    if asked > 0:
        return asked
    fits = [w for w in range(1, max(1, min(threads, rows)) + 1) if rows % w == 0]
    return max([w for w in fits if rows // w * flops_per_row >= MIN_SHARE_FLOPS], default=1)


def _replica(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are new Parameters on the same memory (ties kept):
    its own gradients, the model's values."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _set_threads(n: int) -> None:
    torch.get_num_threads()  # a new thread takes the process's count at its first use: let it, then set its own
    torch.set_num_threads(n)


class RowSplit:
    """``workers`` shares: share 0 on the calling thread and ``model`` itself, share i on thread
    i and replica i; rows ``[i B / workers, (i + 1) B / workers)`` of each micro-batch of B rows."""

    def __init__(self, model: nn.Module, workers: int, make_net, context):
        """``make_net(model)``: the module whose forward (x, y) is the loss; ``context()``: what
        each share's forward runs inside (autocast, which is per thread)."""
        from lmlab import native

        native.serves()  # built and loaded here, not by two threads at once
        self.workers, self.context = workers, context
        replicas = [model] + [_replica(model) for _ in range(workers - 1)]
        self.nets = [make_net(m) for m in replicas]
        self.params = [list(m.parameters()) for m in replicas]
        self.threads = torch.get_num_threads()
        self.threads_each = max(1, self.threads // workers)
        self.pools = [
            ThreadPoolExecutor(1, f"lmlab-rows-{i}", initializer=_set_threads, initargs=(self.threads_each,))
            for i in range(1, workers)
        ]
        for started in [pool.submit(int) for pool in self.pools]:  # each thread started (its count set) now
            started.result()
        torch.set_num_threads(self.threads)  # the process's default again (this thread's own was not changed)

    @contextlib.contextmanager
    def step(self):
        """Inside, this thread runs on ``threads_each`` torch threads (see the module's note)."""
        torch.set_num_threads(self.threads_each)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Each share of (x, y) through its replica's loss and backward; the loss times ``scale``
        (each share's weighted by its rows), summed in share order, detached."""
        B = x.shape[0]
        cuts = [B * i // self.workers for i in range(self.workers + 1)]
        return self._on_all(
            lambda i: self._share(
                i, x[cuts[i] : cuts[i + 1]], y[cuts[i] : cuts[i + 1]], scale * (cuts[i + 1] - cuts[i]) / B
            )
        )

    def _share(self, i: int, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        with self.context():
            loss = self.nets[i](x, y) * scale
        loss.backward()
        return loss.detach()

    def _on_all(self, fn):
        """fn(i) for every share i, share 0 on this thread and the others on theirs at the same
        time; the results summed in share order (an error in any is raised here)."""
        jobs = [pool.submit(fn, i) for i, pool in enumerate(self.pools, 1)]
        try:
            total = fn(0)
        except BaseException:
            for job in jobs:  # the others end first: no thread goes on with a replica after this
                job.exception()
            raise
        for job in jobs:
            total = total + job.result()
        return total

    def map(self, fn, items: list, sizes: list[int]) -> list:
        """``fn(part)`` for the parts of ``items`` (consecutive, of about equal ``sizes`` sums), a
        part a thread, at the same time; the lists fn returns, joined in order."""
        parts = _parts(sizes, self.workers)
        part = lambda i: items[parts[i] : parts[i + 1]]  # noqa: E731
        return self._on_all(lambda i: list(fn(part(i)) or []) if part(i) else [])

    def reduce(self) -> None:
        """The replicas' gradients added into the model's, replica after replica, and cleared."""
        for copies in self.params[1:]:
            pairs = []
            for p, c in zip(self.params[0], copies):
                if c.grad is None:
                    continue
                if p.grad is None:
                    p.grad = c.grad
                else:
                    pairs.append((p.grad, c.grad))
                c.grad = None
            self.map(_add_into, pairs, [a.numel() for a, _ in pairs])

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown()


def _add_into(pairs: list) -> None:
    if pairs:
        torch._foreach_add_([a for a, _ in pairs], [b for _, b in pairs])


def _parts(sizes: list[int], n: int) -> list[int]:
    """Boundaries b[0] = 0 <= ... <= b[n] = len(sizes) cutting ``sizes`` into n consecutive runs of
    about equal sums."""
    total, run, bounds = sum(sizes), 0, [0]
    for k, size in enumerate(sizes):
        run += size
        while len(bounds) < n and run >= total * len(bounds) / n:
            bounds.append(k + 1)
    bounds += [len(sizes)] * (n + 1 - len(bounds))
    return bounds
