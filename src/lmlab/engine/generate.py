"""Generation: prefill the prompts, then decode one token per step from a preallocated KV cache.

A batch of prompts of different lengths is left-padded into one tensor; a key mask hides the
padding and each sequence's positions start at 0, so every prompt computes what it would alone.

``Generation`` is one call: iterating it yields a TokenEvent per generated token, ``.stats``
holds its timings (mid-run too) and ``.result()`` the results at the end. ``stream`` returns
one; ``generate`` runs one to the end. The loop is a few named steps: ``_prefill``,
``_decode_step`` (``engine.steps``), ``_read_back`` and ``_drop_finished``; ``StopMatcher``
finds stop strings and ``TokenHistory`` keeps what the penalties need.

Host syncs: on a GPU each ``.tolist()`` waits for the device, so token ids are read back every
step only when streaming needs them; ``generate`` reads them back every ``check_every`` steps
(16 on a GPU) to see which sequences stopped, and drops what a stopped row sampled after its stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lmlab.engine.cache import KVCache, kv_dtype
from lmlab.engine.sampling import Sampler, SamplingParams, entropy, top_alternatives, update_counts
from lmlab.engine.steps import decode_one_token, prefill
from lmlab.errors import LmlabError

GPU_CHECK_EVERY = 16  # generate() on a GPU reads sampled ids back once per this many steps


@dataclass
class TokenEvent:
    """One generated token of one sequence."""

    seq: int  # index of the sequence in the batch (prompt i, sample j -> i * n + j)
    index: int  # 0-based position among this sequence's generated tokens
    id: int
    text: str  # new text this token completes ('' while a multi-byte char or a possible stop string is pending)
    logprob: float  # log p(token) under the model's raw distribution (nats)
    entropy: float  # entropy of the raw next-token distribution (nats)
    alternatives: list[tuple[int, str, float]] = field(default_factory=list)  # (id, piece, prob), top-k
    finish_reason: str | None = None  # set on a sequence's last event: "eos" | "stop" | "length"


@dataclass
class KVState:
    """What a finished call leaves for the next one (a chat's next turn): the prompt's and the
    generated token ids, in order; ``cache`` holds keys and values for the first ``cache.length``
    of them. ``Generation(..., reuse=state)`` prefills only what follows the longest common
    prefix of these ids and its own prompt (one sequence)."""

    token_ids: list[int]
    cache: KVCache | None


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    alternatives: list[list[tuple[int, str, float]]]
    finish_reason: str  # "eos" | "stop" | "length" | "interrupted"
    timings: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationStats:
    """Timings of one generate/stream call (seconds, tokens, tokens/s, bytes)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, tokens whose keys/values came from a previous call (chat turns)
    batch: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    kv_cache_bytes: int = 0
    peak_memory_bytes: int = 0
    decode_started: float | None = None  # perf_counter() at the first decode step
    device: str = "cpu"

    def as_dict(self) -> dict:
        """The stats as a dict, with rates; works mid-run (after Ctrl-C) as well as at the end."""
        if not self.decode_s and self.decode_started is not None:
            self.decode_s = time.perf_counter() - self.decode_started
        if not self.peak_memory_bytes:
            self.peak_memory_bytes = peak_memory_bytes(torch.device(self.device))
        d = {k: v for k, v in self.__dict__.items() if k not in ("decode_started", "device")}
        d["prefill_tok_s"] = (
            (self.prompt_tokens - self.cached_prompt_tokens) / self.prefill_s if self.prefill_s else 0.0
        )
        # decode rate counts every token after the first of each sequence (the first comes from prefill)
        after_first = self.generated_tokens - self.batch
        d["decode_tok_s"] = after_first / self.decode_s if self.decode_s and after_first > 0 else 0.0
        d["ttft_ms"] = self.ttft_s * 1e3
        return d


def peak_memory_bytes(device: torch.device) -> int:
    """Peak resident memory of this process (CPU) or max allocated (CUDA), in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class StopMatcher:
    """Finds stop strings in a sequence's text: where to cut it, and how much of its end to hold
    back while it might still become a stop string."""

    def __init__(self, stop):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)

    def find(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string in ``text`` at or after ``start``, or -1."""
        hits = [h for h in (text.find(s, start) for s in self.stops) if h >= 0]
        return min(hits) if hits else -1


class SequenceText:
    """One sequence's text as its tokens arrive: incremental decoding (a multi-byte character
    waits for its last token), the end-of-sequence tokens, the length limit and stop strings.
    ``push`` gives the text that is safe to hand out and the finish reason, if any."""

    def __init__(self, tokenizer, stop: StopMatcher, eos: set[int], max_new_tokens: int):
        self.decoder = tokenizer.incremental_decoder() if tokenizer is not None else None
        self.stop, self.eos, self.max_new_tokens = stop, eos, max_new_tokens
        self.text = ""  # decoded so far (cut at a stop string)
        self.emitted = 0  # how much of it was handed out
        self.n_tokens = 0

    def push(self, token_id: int) -> tuple[str, str | None]:
        """(new text to hand out, finish reason "eos" | "stop" | "length" or None) for one token."""
        self.n_tokens += 1
        reason = None
        if token_id in self.eos:
            reason = "eos"  # the end-of-sequence token ends the text; its own text is not part of it
        elif self.decoder is not None:
            self.text += self.decoder.push(token_id)
        if reason is None and self.n_tokens >= self.max_new_tokens:
            reason = "length"
        if reason and self.decoder is not None:
            self.text += self.decoder.flush()  # a pending multi-byte character ends with the text
        # a stop string never starts in text already handed out (the tail is held back below)
        cut = self.stop.find(self.text, self.emitted)
        if cut >= 0:
            reason = "stop"
            self.text = self.text[:cut]
        safe = len(self.text) if reason else max(self.emitted, len(self.text) - self.stop.hold)
        new, self.emitted = self.text[self.emitted : safe], safe
        return new, reason

    @property
    def handed_out(self) -> str:
        """The text handed out so far: the whole text once the sequence has finished."""
        return self.text[: self.emitted]


class TokenHistory:
    """The tokens each row has seen (prompt and generated), in the forms the penalties read:
    ``counts`` (B, V) for repetition/frequency/presence and ``ids`` (B, S) for the n-gram ban
    (left padding marked -1 so it never counts); each None when no penalty needs it."""

    def __init__(self, params: SamplingParams, ids: torch.Tensor, real: torch.Tensor, vocab_size: int):
        """ids: (B, T0) the padded prompts; real: (B, T0) bool, False on the padding."""
        self.counts = self.ids = None
        if params.uses_counts:
            self.counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
            self.counts.scatter_add_(1, ids, real.float())
        if params.no_repeat_ngram_size:
            self.ids = torch.where(real, ids, -1)

    def add(self, next_ids: torch.Tensor) -> None:
        """Add one token per row, next_ids (B,)."""
        if self.counts is not None:
            update_counts(self.counts, next_ids)
        if self.ids is not None:
            self.ids = torch.cat([self.ids, next_ids[:, None]], dim=1)

    def keep(self, rows: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts = self.counts[rows]
        if self.ids is not None:
            self.ids = self.ids[rows]


@dataclass
class _Batch:
    """The live rows of a generation and what each needs for its next step."""

    rows: torch.Tensor  # (B,) original sequence index of each live row
    key_mask: torch.Tensor  # (B, total) bool over every slot this call can fill: False on left padding
    next_pos: torch.Tensor  # (B,) position of each row's next token
    padded: bool  # some live row has left padding (else no key mask is needed)
    prompt_len: int  # T0: slots of the (padded) prompts
    cache: KVCache | None  # None: the uncached path
    all_ids: torch.Tensor  # (B, S) the whole sequences so far (the uncached path recomputes them)
    history: TokenHistory


class Generation:
    """One call: prompts in, token events out.

    Iterate it (once) for a TokenEvent per generated token; ``.stats`` are the timings, valid
    mid-run and after Ctrl-C; ``.result()`` gives what ``generate`` returns; ``.kv_state`` is
    what a next call may reuse (one sequence).
    """

    def __init__(
        self,
        lm,
        prompts,
        *,
        max_new_tokens: int = 64,
        stop=None,
        alternatives: int = 0,
        use_cache: bool = True,
        truncate: str | None = None,
        chat: bool = False,
        add_special: bool = True,
        check_every: int | None = None,
        ignore_eos: bool = False,
        reuse: "KVState | None" = None,
        params: SamplingParams | None = None,
        **sampling,
    ):
        self.lm = lm
        self.reuse = reuse  # a previous call's KVState: its keys/values for a common prefix are not recomputed
        self.kv_state: KVState | None = None  # after iterating: this call's tokens and cache, to pass as `reuse`
        self.ignore_eos = ignore_eos  # run every sequence to max_new_tokens (benchmarks)
        self.params = params if params is not None else SamplingParams(**sampling)  # validated when built
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise LmlabError(
                f"max_new_tokens must be a positive integer, got {max_new_tokens!r}; use e.g. --max-new-tokens 64."
            )
        if alternatives < 0:
            raise LmlabError(f"alternatives must be >= 0, got {alternatives}.")
        self.stop = StopMatcher(stop)
        self.alternatives, self.use_cache = alternatives, use_cache
        self.single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        self.prompts, self.prompt_ids = self._encode(prompts, chat, add_special)
        ctx = lm.config.max_seq_len
        for i, ids in enumerate(self.prompt_ids):
            if len(ids) >= ctx:
                if truncate != "left":
                    raise LmlabError(
                        f"prompt {i + 1} is {len(ids)} tokens but the model's context is {ctx}; "
                        f"shorten it or pass --truncate left to keep its last {ctx - max_new_tokens} tokens."
                    )
                self.prompt_ids[i] = ids[-max(1, ctx - max_new_tokens) :]
        longest = max(len(ids) for ids in self.prompt_ids)
        self.max_new_tokens = min(max_new_tokens, ctx - longest)  # never run past the context
        self.stats = GenerationStats()
        # Read sampled ids back every step on the CPU (free there) and when streaming; on a GPU a
        # read-back waits for the device, so generate() reads back every 16 steps instead.
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise LmlabError(f"check_every must be a positive integer, got {check_every!r}.")
        self.check_every = check_every or 1
        self.use_native = getattr(lm, "native_decode", True)
        self._eos = (
            set() if ignore_eos else set(lm.config.eos_token_ids) | set(getattr(lm.tokenizer, "eos_ids", ()) or ())
        )
        B = len(self.prompt_ids)
        # what each sequence has produced so far, read back as events are made
        self._ids: list[list[int]] = [[] for _ in range(B)]
        self._logprobs: list[list[float]] = [[] for _ in range(B)]
        self._entropies: list[list[float]] = [[] for _ in range(B)]
        self._alts: list[list] = [[] for _ in range(B)]
        self._reasons: list[str] = ["interrupted"] * B
        self._seqs = [SequenceText(lm.tokenizer, self.stop, self._eos, self.max_new_tokens) for _ in range(B)]
        self._started = False

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompts, chat: bool, add_special: bool):
        """Accept a string, a list of strings, a list of ids or a list of id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if not prompts:
            raise LmlabError("no prompt was given; pass a prompt string (or --prompts FILE with one prompt per line).")
        texts, ids = [], []
        for p in prompts:
            if isinstance(p, str):
                self.lm._need_tokenizer()
                tok = self.lm.tokenizer
                text = tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
                # a chat template writes its own special tokens (BOS included)
                enc = tok.encode(text, add_special=add_special and not chat)
                texts.append(p)
            else:
                enc = [int(t) for t in p]
                texts.append(None)
            if not enc:
                bos = self.lm.config.bos_token_id
                if bos is None:
                    raise LmlabError(
                        "the prompt is empty and this model has no BOS token to start from; "
                        "give a prompt of at least one token."
                    )
                enc = [bos]
            ids.append(enc)
        n = self.params.n
        if n > 1:  # n samples per prompt: each prompt repeated n times, adjacent
            texts = [t for t in texts for _ in range(n)]
            ids = [list(x) for x in ids for _ in range(n)]
        return texts, ids

    # ------------------------------------------------------------------ the loop

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events()

    @torch.inference_mode()
    def events(self) -> Iterator[TokenEvent]:
        """Token events as they are generated; a Generation runs once."""
        if self._started:
            raise LmlabError(
                "this Generation has run already; start a new one (lm.stream or lm.generate) for another call."
            )
        self._started = True
        dev = self.lm.device
        sampler = Sampler(self.params, self.lm.config.vocab_size, dev)
        st = self.stats
        t0 = time.perf_counter()
        batch, logits = self._prefill()
        pending = []  # per step not yet read back: (ids, logprobs, entropy, alternatives) of the live rows
        step = 0
        try:
            while True:
                next_ids, logprobs = sampler(logits, batch.history.counts, batch.history.ids)
                if step == 0:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    st.prefill_s = st.ttft_s = time.perf_counter() - t0
                    t_decode = st.decode_started = time.perf_counter()
                step += 1
                alts = top_alternatives(logits, self.alternatives) if self.alternatives else None
                pending.append((next_ids, logprobs, entropy(logits), alts))
                batch.history.add(next_ids)
                # read back every check_every steps (and at the last): ids, text, stops
                if len(pending) >= self.check_every or step >= self.max_new_tokens:
                    finished, chunk, pending = set(), pending, []
                    yield from self._read_back(chunk, batch.rows.tolist(), finished)
                    if len(finished) == len(batch.rows):
                        break
                    if finished:
                        next_ids = self._drop_finished(batch, finished, next_ids)
                logits = self._decode_step(batch, next_ids)
                st.decode_steps += 1
        except KeyboardInterrupt:
            if pending:  # what was sampled but not yet read back is generated too: hand it over
                yield from self._read_back(pending, batch.rows.tolist(), set())
            raise
        st.decode_s = time.perf_counter() - t_decode
        st.peak_memory_bytes = peak_memory_bytes(dev)

    def _prefill(self) -> tuple[_Batch, torch.Tensor]:
        """Left-pad the prompts into one batch, set up the cache and history, and run the prompts:
        the batch, and the logits (B, V) of each prompt's last token."""
        lm, cfg, dev = self.lm, self.lm.config, self.lm.device
        B = len(self.prompt_ids)
        lens = torch.tensor([len(x) for x in self.prompt_ids], device=dev)
        T0 = int(lens.max())
        total = T0 + self.max_new_tokens
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        ids = torch.full((B, T0), pad, dtype=torch.long, device=dev)
        for i, p in enumerate(self.prompt_ids):
            ids[i, T0 - len(p) :] = torch.tensor(p, device=dev)
        key_mask = torch.ones(B, total, dtype=torch.bool, device=dev)
        key_mask[:, :T0] = torch.arange(T0, device=dev)[None] >= (T0 - lens)[:, None]
        positions = (key_mask[:, :T0].long().cumsum(-1) - 1).clamp(min=0)  # (B, T0), 0 at each prompt's first token
        padded = bool((lens != T0).any())
        st = self.stats
        st.prompt_tokens, st.batch, st.device = int(lens.sum()), B, str(dev)
        cache, start = None, 0
        if self.use_cache:
            if self.reuse is not None and B == 1:
                cache, start = self._reused_cache(B, total)
            if cache is None:
                cache = KVCache(cfg, B, total, kv_dtype(lm.dtype, dev), dev)
        st.cached_prompt_tokens = start
        st.kv_cache_bytes = cache.nbytes if cache is not None else 0
        batch = _Batch(
            rows=torch.arange(B, device=dev),
            key_mask=key_mask,
            next_pos=lens.clone(),
            padded=padded,
            prompt_len=T0,
            cache=cache,
            all_ids=ids,
            history=TokenHistory(self.params, ids, key_mask[:, :T0], cfg.vocab_size),
        )
        # the prompt's first `start` tokens are in the cache already (one row, no padding): prefill the rest
        logits = prefill(
            lm.model, ids[:, start:], positions[:, start:], cache, key_mask[:, :T0] if padded else None, self.use_native
        )
        if B == 1 and cache is not None:  # what a next call may reuse; _read_back adds each token as it is read
            self.kv_state = KVState(list(self.prompt_ids[0]), cache)
        return batch, logits

    def _decode_step(self, batch: _Batch, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row (B,); logits (B, V) of the next."""
        model = self.lm.model
        if batch.cache is not None:
            km = batch.key_mask[:, : batch.cache.length + 1] if batch.padded else None
            logits = decode_one_token(
                model, next_ids[:, None], batch.next_pos[:, None], batch.cache, km, self.use_native
            )
        else:  # uncached: recompute the whole sequence, the reference the cache must equal
            batch.all_ids = torch.cat([batch.all_ids, next_ids[:, None]], dim=1)
            S = batch.all_ids.shape[1]
            pos = (batch.key_mask[:, :S].long().cumsum(-1) - 1).clamp(min=0)
            logits = model(
                batch.all_ids, positions=pos, key_mask=batch.key_mask[:, :S] if batch.padded else None, last_only=True
            )[:, -1]
        batch.next_pos = batch.next_pos + 1
        return logits

    def _drop_finished(self, batch: _Batch, finished: set, next_ids: torch.Tensor) -> torch.Tensor:
        """Remove the finished rows (indices into the live rows) from the batch: they stop costing
        compute. Returns next_ids of the rows that remain."""
        keep = torch.tensor([r for r in range(len(batch.rows)) if r not in finished], device=next_ids.device)
        batch.rows, batch.key_mask, batch.next_pos = batch.rows[keep], batch.key_mask[keep], batch.next_pos[keep]
        if batch.cache is not None:
            batch.cache.keep(keep)
        else:
            batch.all_ids = batch.all_ids[keep]
        batch.history.keep(keep)
        batch.padded = batch.padded and bool((~batch.key_mask[:, : batch.prompt_len]).any())
        return next_ids[keep]

    def _reused_cache(self, B: int, total: int) -> tuple[KVCache | None, int]:
        """(cache, n): the previous call's cache holding this prompt's first n tokens, grown to
        ``total`` slots if need be; (None, 0) when nothing can be reused."""
        prev, prompt = self.reuse, self.prompt_ids[0]
        n = 0
        for a, b in zip(prev.token_ids, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1, prev.cache.length)  # at least one token to prefill: it gives the logits
        cache = prev.cache
        if n <= 0 or cache.k.shape[1] != B or cache.k.device != self.lm.device:
            return None, 0
        if cache.max_len < total:  # grow: a new cache, the reused slots copied over
            grown = KVCache(self.lm.config, B, total, cache.k.dtype, cache.k.device)
            grown.k[:, :, :, :n] = cache.k[:, :, :, :n]
            grown.v[:, :, :, :n] = cache.v[:, :, :, :n]
            cache = grown
        cache.length = n  # slots after n are written again
        prev.cache = None  # the cache now belongs to this call
        return cache, n

    def _read_back(self, pending, rows: list[int], finished: set) -> Iterator[TokenEvent]:
        """Events of the sampled steps in ``pending``, in order; adds the rows that stop to ``finished``.

        A row that stops (EOS, stop string, length) at one of these steps yields nothing after it:
        tokens it sampled later, before this read-back, are dropped.
        """
        tok, st = self.lm.tokenizer, self.stats
        # (steps, rows) each: one host read for the whole chunk
        ids, lps, ents = (torch.stack([p[i] for p in pending]).tolist() for i in range(3))
        alt_list = [(a[0].tolist(), a[1].tolist()) if a is not None else None for _, _, _, a in pending]
        for j in range(len(pending)):
            for r, seq in enumerate(rows):
                if r in finished:
                    continue
                tid = ids[j][r]
                if (
                    self.kv_state is not None
                ):  # one row: its ids as read back (the last is never fed; reuse stops at cache.length)
                    self.kv_state.token_ids.append(tid)
                out_text, reason = self._seqs[seq].push(tid)
                alt = []
                if alt_list[j] is not None:
                    probs, alt_ids = alt_list[j]
                    alt = [
                        (i, tok.token_str(i) if tok is not None else str(i), pr) for i, pr in zip(alt_ids[r], probs[r])
                    ]
                ev = TokenEvent(seq, len(self._ids[seq]), tid, out_text, lps[j][r], ents[j][r], alt, reason)
                self._ids[seq].append(tid)
                self._logprobs[seq].append(ev.logprob)
                self._entropies[seq].append(ev.entropy)
                self._alts[seq].append(alt)
                st.generated_tokens += 1
                if reason:
                    self._reasons[seq] = reason
                    finished.add(r)
                yield ev

    # ------------------------------------------------------------------ results

    def results(self) -> list[GenerationResult]:
        """One result per sequence (n per prompt), from what was generated so far: after Ctrl-C the
        unfinished ones have finish_reason "interrupted"."""
        timings = self.stats.as_dict()
        return [
            GenerationResult(
                self.prompts[i],
                self.prompt_ids[i],
                self._seqs[i].handed_out,
                self._ids[i],
                self._logprobs[i],
                self._entropies[i],
                self._alts[i],
                self._reasons[i],
                timings,
            )
            for i in range(len(self.prompt_ids))
        ]

    def result(self):
        """What ``generate`` returns: one GenerationResult for one prompt and n == 1, else a list."""
        results = self.results()
        return results[0] if self.single and self.params.n == 1 else results


def generate(lm, prompts, **kw):
    """Generate for one prompt (-> GenerationResult) or a list (-> list of results, n per prompt)."""
    kw.setdefault("check_every", GPU_CHECK_EVERY if lm.device.type == "cuda" else 1)
    gen = Generation(lm, prompts, **kw)
    try:
        for _ in gen:
            pass
    except KeyboardInterrupt as e:
        e.partial = gen.results()  # type: ignore[attr-defined]  # keep what was generated
        raise
    return gen.result()


def stream(lm, prompts, **kw) -> Generation:
    """A Generation to iterate: a TokenEvent per generated token as it comes; ``.stats`` and
    ``.result()`` (after the last event) on the object."""
    return Generation(lm, prompts, **kw)
