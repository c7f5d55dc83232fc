"""Continuous batching: requests that arrive at any time share one model's decoding steps.

    engine = BatchEngine(lm, max_batch=8)
    engine.start()                                   # one worker thread runs the model
    handle = engine.submit(BatchRequest(prompt_ids=ids, max_new_tokens=64), on_event=print)
    handle.cancel()                                  # leaves the batch at the next step

A request that arrives while others decode joins the running batch at the next step: the worker
prefills it alone, places its keys and values beside the others' and decodes every row together
from then on. A row that finishes (or is cancelled) leaves at once, so its slot is free for the
next request in the queue. Beyond ``max_batch`` rows, requests wait in a bounded queue;
``submit`` raises ``QueueFull`` when it is full.

The KV cache is one tensor for the live rows, (L, B, K, max_len, D) as ``KVCache`` holds it, and
every row writes its next token at the same slot, ``cache.length``. Row r's tokens fill the slots
``first[r]`` .. ``length - 1``, contiguous, so a key mask of ``slot >= first[r]`` hides what came
before it, and slot distance is token distance (sliding windows work on slots). A prompt longer
than ``length`` shifts the others right to make room; slots no row uses any more are dropped
from the front when the cache fills. Positions are per row, so a shift changes nothing a row
computes: each request gets what it would get alone (tested against ``generate``).

Each row samples with its own ``Sampler`` (its own settings and seeded generator) and keeps its
own token history and text, so requests with different knobs share a batch.

Events go to the request's ``on_event`` callback, in the worker thread, in order:
``PromptLogprobs`` (only when asked for), a ``TokenEvent`` per generated token (a
``SampledTokenEvent`` with ``sampled_top``), then exactly one ``RequestEnd``.

``call(fn)`` runs a function in the worker thread between two steps (the playground's looks
inside the model: hooks and interventions must not touch the batch in flight).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmlab.engine.cache import KVCache, kv_dtype
from lmlab.engine.generate import SequenceText, StopMatcher, TokenEvent, TokenHistory
from lmlab.engine.sampling import Sampler, SamplingParams, chosen_logprobs, entropy, sample, top_alternatives
from lmlab.engine.steps import decode_one_token, prefill
from lmlab.errors import LmlabError

MIN_SLOTS = 256  # the cache's first size; it doubles as rows need more, up to the model's context


class QueueFull(LmlabError):
    """Raised by ``submit`` when ``max_queue`` requests are already waiting."""


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 16  # 0: no generation (the prompt's log-probs only, with prompt_logprobs)
    params: SamplingParams = field(default_factory=SamplingParams)  # n is ignored: one sequence per request
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0  # alternatives per generated token (TokenEvent.alternatives), 0..20
    prompt_logprobs: int | None = None  # log-probs of the prompt tokens, with this many top alternatives
    ignore_eos: bool = False
    sampled_top: int = 0  # > 0: SampledTokenEvents, with this many alternatives of the distribution sampled from


@dataclass
class SampledTokenEvent(TokenEvent):
    """A TokenEvent that also tells about the distribution the token was drawn from (``BatchRequest.sampled_top``).

    That distribution is softmax of the logits after every sampling stage the request uses (penalties,
    temperature, top-k, top-p, min-p, typical-p: ``Sampler.process``); with temperature 0 (argmax) it
    is softmax of the penalised logits, the ones the argmax was taken over.
    """

    sampled_logprob: float = 0.0  # log p(token) under that distribution (nats; -inf cannot occur: it was drawn)
    sampled_entropy: float = 0.0  # its entropy (nats)
    sampled_alternatives: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first
    t_wall_ms: float = 0.0  # time.time() * 1000 when the token was sampled


@dataclass
class PromptLogprobs:
    """The prompt's tokens scored by the model: logprobs[t] = log p(token_ids[t] | token_ids[:t])."""

    token_ids: list[int]
    logprobs: list[float | None]  # None at position 0: nothing predicts the first token
    top: list[list[tuple[int, float]]]  # per position, (token id, logprob) best first; [] at position 0


@dataclass
class RequestEnd:
    """The last event of a request, exactly once."""

    finish_reason: str  # "eos" | "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    timings: dict  # queue_ms, ttft_ms (from submit), decode_tok_s, total_ms
    error: str | None = None


class RequestHandle:
    """A submitted request. ``cancel()`` makes it leave the batch at the next step."""

    def __init__(self, rid: int, request: BatchRequest, on_event: Callable):
        self.id, self.request, self.on_event = rid, request, on_event
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """One live request in the batch: its sampler, history, text and timings."""

    def __init__(self, handle: RequestHandle, lm, sampler: Sampler, history: TokenHistory, next_pos: int, first: int):
        req = handle.request
        self.handle, self.sampler, self.history = handle, sampler, history
        self.next_pos = next_pos  # position of the token fed next
        self.first = first  # the first cache slot this row uses
        eos = (
            set() if req.ignore_eos else set(lm.config.eos_token_ids) | set(getattr(lm.tokenizer, "eos_ids", ()) or ())
        )
        self.text = SequenceText(lm.tokenizer, StopMatcher(req.stop), eos, max(1, req.max_new_tokens))
        self.last_id: int | None = None  # the token sampled last: fed at the next step
        self.t_first: float | None = None
        self.n_generated = 0


class BatchEngine:
    """Continuous batching over one LM; see the module docstring."""

    def __init__(self, lm, *, max_batch: int = 8, max_queue: int = 64):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise LmlabError(f"max_batch must be a positive integer, got {max_batch!r}; use e.g. --max-batch 8.")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise LmlabError(f"max_queue must be a whole number >= 0, got {max_queue!r}; use e.g. --max-queue 64.")
        self.lm, self.max_batch, self.max_queue = lm, max_batch, max_queue
        self.context = lm.config.max_seq_len
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.steps = 0  # decode steps run
        self.busy_s = 0.0  # seconds the worker spent computing

    # ------------------------------------------------------------------ the public side (any thread)

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmlab-batch", daemon=True)
            self._thread.start()

    def submit(self, request: BatchRequest, on_event: Callable) -> RequestHandle:
        """Queue a request; its events go to ``on_event(event)`` in the worker thread."""
        n = len(request.prompt_ids)
        if n == 0:
            raise LmlabError("the prompt is empty; give at least one token.")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 0:
            raise LmlabError(f"max_tokens must be a whole number >= 0, got {request.max_new_tokens!r}.")
        if n + request.max_new_tokens > self.context:
            raise LmlabError(
                f"the prompt is {n} tokens and {request.max_new_tokens} more were asked for, but the model's "
                f"context is {self.context} tokens; shorten the prompt or ask for fewer tokens."
            )
        vocab = self.lm.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise LmlabError(f"a prompt token id is out of range; this model's vocabulary has ids 0..{vocab - 1}.")
        with self._wake:
            if self._stopping:
                raise LmlabError("the server is shutting down; send the request again once it is back.")
            if len(self._queue) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise QueueFull(f"{len(self._queue)} requests are waiting already; try again in a moment.")
            handle = RequestHandle(next(self._ids), request, on_event)
            self._queue.append(handle)
            self._wake.notify()
        return handle

    def call(self, fn: Callable) -> Future:
        """Run ``fn()`` in the worker thread between two decoding steps; its result (or exception) comes
        back in the Future. While it runs no step runs, so it may use the model (hooks, interventions,
        forwards of its own) without touching the batch in flight, which resumes after it."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise LmlabError("the server is shutting down; send the request again once it is back.")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def stats(self) -> dict:
        """What a metrics page shows: rows decoding now, requests waiting, steps run."""
        return {
            "active": len(self._rows),
            "queued": len(self._queue),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "busy_s": self.busy_s,
            "cache_slots": self._cache.max_len if self._cache is not None else 0,
        }

    def stop(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Take no more requests. drain: let the queued and running ones finish; else cancel them."""
        with self._wake:
            self._stopping, self._drain = True, drain
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._rows and not self._calls and not self._stopping:
                    self._wake.wait()
                calls, self._calls = list(self._calls), collections.deque()
                if self._stopping and not self._drain:
                    for h in self._queue:
                        h.cancel()
                    for r in self._rows:
                        r.handle.cancel()
                if self._stopping and not self._queue and not self._rows and not calls:
                    return
                admit = []
                while self._queue and len(self._rows) + len(admit) < self.max_batch:
                    admit.append(self._queue.popleft())
            t = time.perf_counter()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        with torch.inference_mode():
                            future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001  (told to the caller, the worker goes on)
                        future.set_exception(e)
            with torch.inference_mode():
                for handle in admit:
                    try:
                        self._admit(handle)
                    except Exception as e:  # noqa: BLE001  (one bad request must not stop the others)
                        self._fail(handle, e)
                self._drop_cancelled()
                if self._rows:
                    try:
                        self._step()
                    except Exception as e:  # noqa: BLE001  (the worker must survive and tell every request)
                        rows, self._rows, self._cache = self._rows, [], None
                        for r in rows:
                            self._fail(r.handle, e, r)
            self.busy_s += time.perf_counter() - t

    def _admit(self, handle: RequestHandle) -> None:
        """Prefill one request alone, emit its prompt log-probs and first token, and add it to the batch."""
        if handle.cancelled:
            return self._end(handle, "cancelled", 0)
        lm, cfg, req = self.lm, self.lm.config, handle.request
        dev = lm.device
        P = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=dev)
        own = KVCache(cfg, 1, P, kv_dtype(lm.dtype, dev), dev)
        want_prompt = req.prompt_logprobs is not None
        if want_prompt:  # every position's logits
            logits = lm.model(ids, cache=own)[0]  # (P, V)
        else:  # the last one's: a short prompt to a quantized model may take the native step (steps.prefill)
            pos = torch.arange(P, device=dev)[None]
            logits = prefill(lm.model, ids, pos, own, None, getattr(lm, "native_decode", True))  # (1, V)
        if want_prompt:
            handle.on_event(_prompt_logprobs(req.prompt_ids, logits, req.prompt_logprobs, cfg.vocab_size))
        if req.max_new_tokens == 0:
            return self._end(handle, "length", 0)
        sampler = Sampler(req.params, cfg.vocab_size, dev)
        history = TokenHistory(req.params, ids, torch.ones_like(ids, dtype=torch.bool), cfg.vocab_size)
        first = self._make_room(P)
        row = _Row(handle, lm, sampler, history, next_pos=P, first=first)
        self._place(row, own, P)
        self._sample([row], logits[-1:])

    def _make_room(self, P: int) -> int:
        """The first slot of a new row whose P prompt tokens end at the shared write slot."""
        if self._cache is None or not self._rows:
            slots = min(self.context, max(MIN_SLOTS, 2 * P))
            self._cache = KVCache(self.lm.config, 0, slots, kv_dtype(self.lm.dtype, self.lm.device), self.lm.device)
            self._cache.length = P
            return 0
        cache = self._cache
        if P > cache.length:  # shift every live row right, so the new prompt fits before the write slot
            self._ensure_slots(P + 1)
            d = P - cache.length
            for t in (cache.k, cache.v):
                t[:, :, :, d : d + cache.length] = t[:, :, :, : cache.length].clone()
            for r in self._rows:
                r.first += d
            cache.length = P
        return cache.length - P

    def _place(self, row: _Row, own: KVCache, P: int) -> None:
        """Add the row's prefilled keys and values to the batch cache, ending at the write slot."""
        cache = self._cache
        start = cache.length - P
        shape = list(cache.k.shape)
        shape[1] = 1
        k = torch.zeros(shape, dtype=cache.k.dtype, device=cache.k.device)
        v = torch.zeros_like(k)
        k[:, :, :, start : cache.length] = own.k[:, :, :, :P]
        v[:, :, :, start : cache.length] = own.v[:, :, :, :P]
        cache.k = torch.cat([cache.k, k], dim=1)
        cache.v = torch.cat([cache.v, v], dim=1)
        self._rows.append(row)

    def _ensure_slots(self, needed: int) -> None:
        """Make the cache hold at least ``needed`` slots: drop slots no row uses, then grow."""
        cache = self._cache
        if needed <= cache.max_len:
            return
        lead = min((r.first for r in self._rows), default=cache.length)
        if lead > 0:  # slots before every row's first: nobody reads them any more
            for t in (cache.k, cache.v):
                t[:, :, :, : cache.length - lead] = t[:, :, :, lead : cache.length].clone()
            for r in self._rows:
                r.first -= lead
            cache.length -= lead
            needed -= lead
        if needed > cache.max_len:
            slots = min(max(needed, 2 * cache.max_len), self.context + 1)
            grown = KVCache(self.lm.config, cache.k.shape[1], slots, cache.k.dtype, cache.k.device)
            grown.k[:, :, :, : cache.length] = cache.k[:, :, :, : cache.length]
            grown.v[:, :, :, : cache.length] = cache.v[:, :, :, : cache.length]
            grown.length = cache.length
            self._cache = grown

    def _step(self) -> None:
        """One decoding step for every live row: feed each row's last token, sample its next."""
        self._ensure_slots(self._cache.length + 1)
        cache, rows, dev = self._cache, self._rows, self.lm.device
        ids = torch.tensor([[r.last_id] for r in rows], device=dev)
        pos = torch.tensor([[r.next_pos] for r in rows], device=dev)
        firsts = torch.tensor([r.first for r in rows], device=dev)
        padded = bool((firsts > 0).any())
        key_mask = torch.arange(cache.length + 1, device=dev)[None] >= firsts[:, None] if padded else None
        logits = decode_one_token(self.lm.model, ids, pos, cache, key_mask, getattr(self.lm, "native_decode", True))
        self.steps += 1
        for r in rows:
            r.next_pos += 1
        self._sample(list(rows), logits)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample the next token of each row from its logits (B, V), emit events, drop finished rows."""
        chosen, lps, alts, drawn = [], [], [], []
        for i, r in enumerate(rows):
            row_logits = logits[i : i + 1]
            if r.handle.request.sampled_top:
                tid, lp, info = _sample_and_describe(r.sampler, row_logits, r.history, r.handle.request.sampled_top)
            else:
                tid, lp = r.sampler(row_logits, r.history.counts, r.history.ids)
                info = None
            r.history.add(tid)
            chosen.append(tid)
            lps.append(lp)
            drawn.append(info)
            k = r.handle.request.top_logprobs
            alts.append(top_alternatives(row_logits, k) if k else None)
        ents = entropy(logits).tolist()
        ids = torch.cat(chosen).tolist()
        lps = torch.cat(lps).tolist()
        now = time.perf_counter()
        done = []
        for i, r in enumerate(rows):
            tid = ids[i]
            text, reason = r.text.push(tid)
            alt = []
            if alts[i] is not None:
                probs, alt_ids = alts[i][0][0].tolist(), alts[i][1][0].tolist()
                tok = self.lm.tokenizer
                alt = [(a, tok.token_str(a) if tok is not None else str(a), p) for a, p in zip(alt_ids, probs)]
            if r.t_first is None:
                r.t_first = now
            r.n_generated += 1
            r.last_id = tid
            if r.handle.cancelled and reason is None:
                reason = "cancelled"
            fields = (0, r.n_generated - 1, tid, text, lps[i], ents[i], alt, reason if reason != "cancelled" else None)
            if drawn[i] is None:
                event = TokenEvent(*fields)
            else:
                d_lp, d_ent, d_top = drawn[i]
                event = SampledTokenEvent(*fields, d_lp, d_ent, d_top, time.time() * 1e3)
            r.handle.on_event(event)
            if reason:
                done.append((r, reason))
        for r, reason in done:
            self._remove(r)
            self._end(r.handle, reason, r.n_generated, r)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._rows if r.handle.cancelled]:
            self._remove(r)
            self._end(r.handle, "cancelled", r.n_generated, r)

    def _remove(self, row: _Row) -> None:
        i = self._rows.index(row)
        keep = [j for j in range(len(self._rows)) if j != i]
        self._rows.pop(i)
        cache = self._cache
        index = torch.tensor(keep, dtype=torch.long, device=cache.k.device)
        cache.keep(index)
        if not self._rows:
            cache.length = 0

    def _end(
        self, handle: RequestHandle, reason: str, n_generated: int, row: _Row | None = None, error: str | None = None
    ) -> None:
        now = time.perf_counter()
        timings = {"total_ms": (now - handle.submitted) * 1e3}
        if row is not None and row.t_first is not None:
            timings["ttft_ms"] = (row.t_first - handle.submitted) * 1e3
            decode_s = now - row.t_first
            timings["decode_tok_s"] = (n_generated - 1) / decode_s if n_generated > 1 and decode_s > 0 else 0.0
        handle.on_event(RequestEnd(reason, len(handle.request.prompt_ids), n_generated, timings, error))

    def _fail(self, handle: RequestHandle, e: Exception, row: _Row | None = None) -> None:
        """End a request with an error; the engine goes on with the others."""
        if row is not None and row in self._rows:
            self._remove(row)
        msg = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
        self._end(handle, "error", row.n_generated if row is not None else 0, row, error=msg)


def _sample_and_describe(sampler: Sampler, logits: torch.Tensor, history: TokenHistory, k: int):
    """What ``sampler(logits, ...)`` does (the same stages, the same draw from its generator), and also
    the distribution the token was drawn from: (id [1], raw logprob [1], (logprob, entropy, top k
    [(id, logprob)] of the drawn distribution, the drawn token added when it is not among them))."""
    processed = sampler.process(logits, history.counts, history.ids)  # (1, vocab)
    tid = sample(processed, sampler.generator, greedy=sampler.params.greedy)
    raw_lp = chosen_logprobs(logits[..., : sampler.vocab_size], tid)
    logp = torch.log_softmax(processed, dim=-1)[0]  # (vocab,)
    ent = float(-(logp * logp.exp()).nansum())
    top = torch.topk(logp, min(k, logp.shape[-1]))
    pairs = list(zip(top.indices.tolist(), top.values.tolist()))
    t = int(tid[0])
    if all(a != t for a, _ in pairs):
        pairs.append((t, float(logp[t])))
    return tid, raw_lp, (float(logp[t]), ent, pairs)


def _prompt_logprobs(prompt_ids: list[int], logits: torch.Tensor, k: int, vocab_size: int) -> PromptLogprobs:
    """Score each prompt token by the logits (P, V) of the positions before it."""
    logp = torch.log_softmax(logits[:-1, :vocab_size].float(), dim=-1)  # (P-1, V): position t predicts token t+1
    nxt = torch.tensor(prompt_ids[1:], device=logp.device)
    chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
    top: list[list[tuple[int, float]]] = [[]]
    if k:
        vals, idx = torch.topk(logp, min(k, vocab_size), dim=-1)
        top += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        top += [[] for _ in chosen]
    return PromptLogprobs(list(prompt_ids), [None, *chosen], top)
