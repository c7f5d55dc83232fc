"""Generation: prefill the prompts, then decode one token per step from a preallocated KV cache.

A batch of prompts of different lengths is left-padded into one tensor; a key mask hides the
padding and each sequence's positions start at 0, so every prompt computes what it would alone.
``stream`` yields a TokenEvent per generated token; ``generate`` collects them into results.

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
        d["prefill_tok_s"] = (self.prompt_tokens - self.cached_prompt_tokens) / self.prefill_s if self.prefill_s else 0.0
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


class Generation:
    """One call's state: prompts in, token events out. ``events()`` drives it."""

    def __init__(self, lm, prompts, *, max_new_tokens: int = 64, stop=None, alternatives: int = 0,
                 use_cache: bool = True, truncate: str | None = None, chat: bool = False,
                 add_special: bool = True, check_every: int | None = None, ignore_eos: bool = False,
                 reuse: "KVState | None" = None, **sampling):
        self.lm = lm
        self.reuse = reuse  # a previous call's KVState: its keys/values for a common prefix are not recomputed
        self.kv_state: KVState | None = None  # after events(): this call's tokens and cache, to pass as `reuse`
        self.ignore_eos = ignore_eos  # run every sequence to max_new_tokens (benchmarks)
        self.params = SamplingParams(**sampling)
        self.params.validate()
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise LmlabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}; use e.g. --max-new-tokens 64.")
        if alternatives < 0:
            raise LmlabError(f"alternatives must be >= 0, got {alternatives}.")
        self.stop = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        self.alternatives, self.use_cache = alternatives, use_cache
        self.prompts, self.prompt_ids = self._encode(prompts, chat, add_special)
        ctx = lm.config.max_seq_len
        self.max_new_tokens = max_new_tokens
        for i, ids in enumerate(self.prompt_ids):
            if len(ids) >= ctx:
                if truncate != "left":
                    raise LmlabError(f"prompt {i + 1} is {len(ids)} tokens but the model's context is {ctx}; shorten it or pass --truncate left to keep its last {ctx - max_new_tokens} tokens.")
                self.prompt_ids[i] = ids[-max(1, ctx - max_new_tokens):]
        longest = max(len(ids) for ids in self.prompt_ids)
        self.max_new_tokens = min(max_new_tokens, ctx - longest)  # never run past the context
        self.stats = GenerationStats()
        # Read sampled ids back every step on the CPU (free there) and when streaming; on a GPU a
        # read-back waits for the device, so generate() reads back every 16 steps instead.
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise LmlabError(f"check_every must be a positive integer, got {check_every!r}.")
        self.check_every = check_every or 1

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
                    raise LmlabError("the prompt is empty and this model has no BOS token to start from; give a prompt of at least one token.")
                enc = [bos]
            ids.append(enc)
        n = self.params.n
        if n > 1:  # n samples per prompt: each prompt repeated n times, adjacent
            texts = [t for t in texts for _ in range(n)]
            ids = [list(x) for x in ids for _ in range(n)]
        return texts, ids

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def events(self) -> Iterator[TokenEvent]:
        lm, model, cfg = self.lm, self.lm.model, self.lm.config
        dev = lm.device
        B = len(self.prompt_ids)
        lens = torch.tensor([len(x) for x in self.prompt_ids], device=dev)
        T0 = int(lens.max())
        total = T0 + self.max_new_tokens
        padded = bool((lens != T0).any())
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        ids = torch.full((B, T0), pad, dtype=torch.long, device=dev)
        for i, p in enumerate(self.prompt_ids):
            ids[i, T0 - len(p):] = torch.tensor(p, device=dev)
        # key_mask over every slot this call can fill: False on the left padding
        key_mask = torch.ones(B, total, dtype=torch.bool, device=dev)
        key_mask[:, :T0] = torch.arange(T0, device=dev)[None] >= (T0 - lens)[:, None]
        positions = (key_mask[:, :T0].long().cumsum(-1) - 1).clamp(min=0)  # (B, T0), 0 at each prompt's first token
        next_pos = lens.clone()  # (B,) position of each sequence's next token

        sampler = Sampler(self.params, cfg.vocab_size, dev)
        p = self.params
        want_counts = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        counts = None
        if want_counts:
            counts = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=dev)
            counts.scatter_add_(1, ids, key_mask[:, :T0].float())
        # (B, S) ids so far; left padding marked -1 so it never counts as a token
        history = torch.where(key_mask[:, :T0], ids, -1) if p.no_repeat_ngram_size else None

        st = self.stats
        st.prompt_tokens, st.batch, st.device = int(lens.sum()), B, str(dev)
        cache, start = None, 0
        if self.use_cache:
            cache, start = self._reused_cache(B, total) if self.reuse is not None and B == 1 else (None, 0)
            if cache is None:
                cache = KVCache(cfg, B, total, kv_dtype(lm.dtype, dev), dev)
        st.cached_prompt_tokens = start
        st.kv_cache_bytes = cache.nbytes if cache is not None else 0
        tok = lm.tokenizer
        self._tok = tok
        self._decoders = [tok.incremental_decoder() if tok is not None else None for _ in range(B)]
        self._texts, self._emitted, self._n_out = [""] * B, [0] * B, [0] * B
        rows = torch.arange(B, device=dev)  # original sequence index of each live row
        all_ids = ids  # uncached path: the whole sequence so far
        pending = []  # per step not yet read back: (ids, logprobs, entropy, alternatives) of the live rows

        t0 = time.perf_counter()
        # the prompt's first `start` tokens are in the cache already (one row, no padding): prefill the rest
        logits = model(ids[:, start:], positions=positions[:, start:], cache=cache, key_mask=key_mask[:, :T0] if padded else None,
                       last_only=True)[:, -1]
        if B == 1 and cache is not None:  # what a next call may reuse; _read_back adds each token as it is read
            self.kv_state = KVState(list(self.prompt_ids[0]), cache)
        step = 0
        try:
            while True:
                next_ids, logprobs = sampler(logits, counts, history)
                if step == 0:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    st.prefill_s = st.ttft_s = time.perf_counter() - t0
                    t_decode = st.decode_started = time.perf_counter()
                step += 1
                alts = top_alternatives(logits, self.alternatives) if self.alternatives else None
                pending.append((next_ids, logprobs, entropy(logits), alts))
                if counts is not None:
                    update_counts(counts, next_ids)
                if history is not None:
                    history = torch.cat([history, next_ids[:, None]], dim=1)

                # ---- read back every check_every steps (and at the last): ids, text, stops
                if len(pending) >= self.check_every or step >= self.max_new_tokens:
                    finished, chunk, pending = set(), pending, []
                    yield from self._read_back(chunk, rows.tolist(), finished)
                    n_live = len(rows)
                    if len(finished) == n_live:
                        break
                    if finished:
                        keep = torch.tensor([r for r in range(n_live) if r not in finished], device=dev)
                        rows, next_ids = rows[keep], next_ids[keep]
                        key_mask, next_pos = key_mask[keep], next_pos[keep]
                        if cache is not None:
                            cache.keep(keep)
                        else:
                            all_ids = all_ids[keep]
                        if counts is not None:
                            counts = counts[keep]
                        if history is not None:
                            history = history[keep]
                        padded = padded and bool((~key_mask[:, :T0]).any())

                # ---- next step
                if cache is not None:
                    km = key_mask[:, : cache.length + 1] if padded else None
                    logits = model(next_ids[:, None], positions=next_pos[:, None], cache=cache, key_mask=km, last_only=True)[:, -1]
                else:  # uncached: recompute the whole sequence, the reference the cache must equal
                    all_ids = torch.cat([all_ids, next_ids[:, None]], dim=1)
                    S = all_ids.shape[1]
                    pos = (key_mask[:, :S].long().cumsum(-1) - 1).clamp(min=0)
                    logits = model(all_ids, positions=pos, key_mask=key_mask[:, :S] if padded else None, last_only=True)[:, -1]
                next_pos = next_pos + 1
                st.decode_steps += 1
        except KeyboardInterrupt:
            if pending:  # what was sampled but not yet read back is generated too: hand it over
                yield from self._read_back(pending, rows.tolist(), set())
            raise
        st.decode_s = time.perf_counter() - t_decode
        st.peak_memory_bytes = peak_memory_bytes(dev)

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
        cfg, tok, st = self.lm.config, self._tok, self.stats
        texts, emitted, n_out, decoders = self._texts, self._emitted, self._n_out, self._decoders
        # (steps, rows) each: one host read for the whole chunk
        ids, lps, ents = (torch.stack([p[i] for p in pending]).tolist() for i in range(3))
        alt_list = [(a[0].tolist(), a[1].tolist()) if a is not None else None for _, _, _, a in pending]
        eos = self._eos_set(cfg)
        for j in range(len(pending)):
            for r, seq in enumerate(rows):
                if r in finished:
                    continue
                tid = ids[j][r]
                if self.kv_state is not None:  # one row: its ids as read back (the last is never fed; reuse stops at cache.length)
                    self.kv_state.token_ids.append(tid)
                n_out[seq] += 1
                reason = None
                if tid in eos:
                    reason = "eos"  # the end-of-sequence token ends the text; its own text is not part of it
                elif decoders[seq] is not None:
                    texts[seq] += decoders[seq].push(tid)
                if reason is None and n_out[seq] >= self.max_new_tokens:
                    reason = "length"
                cut = len(texts[seq])
                if self.stop:
                    hit = [texts[seq].find(s) for s in self.stop]
                    hit = [h for h in hit if h >= 0]
                    if hit:
                        cut, reason = min(hit), "stop"
                if reason and reason != "stop" and decoders[seq] is not None:
                    texts[seq] += decoders[seq].flush()
                    cut = len(texts[seq])
                    if self.stop:  # the flushed tail may complete a stop string
                        hit = [h for h in (texts[seq].find(s) for s in self.stop) if h >= 0]
                        if hit:
                            cut, reason = min(hit), "stop"
                if reason:
                    texts[seq] = texts[seq][:cut]
                    safe = cut
                else:  # hold back text that might be the start of a stop string
                    hold = max((len(s) - 1 for s in self.stop), default=0)
                    safe = max(emitted[seq], len(texts[seq]) - hold)
                out_text = texts[seq][emitted[seq]:safe]
                emitted[seq] = safe
                alt = []
                if alt_list[j] is not None:
                    probs, alt_ids = alt_list[j]
                    alt = [(i, tok.token_str(i) if tok is not None else str(i), pr) for i, pr in zip(alt_ids[r], probs[r])]
                st.generated_tokens += 1
                if reason:
                    finished.add(r)
                yield TokenEvent(seq, n_out[seq] - 1, tid, out_text, lps[j][r], ents[j][r], alt, reason)

    def _eos_set(self, cfg) -> set[int]:
        if not hasattr(self, "_eos"):
            self._eos = set() if self.ignore_eos else set(cfg.eos_token_ids)
            if self.lm.tokenizer is not None and not self.ignore_eos:
                self._eos |= set(self.lm.tokenizer.eos_ids)
        return self._eos


def generate(lm, prompts, **kw):
    """Generate for one prompt (-> GenerationResult) or a list (-> list of results, n per prompt)."""
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
    kw.setdefault("check_every", GPU_CHECK_EVERY if lm.device.type == "cuda" else 1)
    gen = Generation(lm, prompts, **kw)
    B = len(gen.prompt_ids)
    ids = [[] for _ in range(B)]
    lps, ents, alts = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)]
    texts, reasons = [""] * B, ["interrupted"] * B
    try:
        for ev in gen.events():
            ids[ev.seq].append(ev.id)
            lps[ev.seq].append(ev.logprob)
            ents[ev.seq].append(ev.entropy)
            alts[ev.seq].append(ev.alternatives)
            texts[ev.seq] += ev.text
            if ev.finish_reason:
                reasons[ev.seq] = ev.finish_reason
    except KeyboardInterrupt as e:
        # keep what was generated: the caller gets the partial results on the exception
        e.partial = _results(gen, texts, ids, lps, ents, alts, reasons)  # type: ignore[attr-defined]
        raise
    results = _results(gen, texts, ids, lps, ents, alts, reasons)
    return results[0] if single and gen.params.n == 1 else results


def _results(gen, texts, ids, lps, ents, alts, reasons):
    timings = gen.stats.as_dict()
    return [
        GenerationResult(gen.prompts[i], gen.prompt_ids[i], texts[i], ids[i], lps[i], ents[i], alts[i], reasons[i], timings)
        for i in range(len(gen.prompt_ids))
    ]


def stream(lm, prompts, **kw) -> Iterator[TokenEvent]:
    """Token events as they are generated; ``.stats`` of the run are on the generator's Generation."""
    return Generation(lm, prompts, **kw).events()
