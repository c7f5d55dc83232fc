"""Log-likelihood of continuations, the way lm-evaluation-harness scores multiple choice.

For a (context, continuation) pair of texts: trailing spaces of the context move to the
continuation, the whole text and the context are encoded, and the continuation's tokens are
what the whole text has beyond the context's. The model reads context + continuation (the last
``context`` tokens of it if it is too long) and the continuation's log-likelihood is the sum of
log p(token | everything before it) over its tokens; it is greedy when every one of its tokens
is the argmax at its position.

Requests that share a context (the choices of one multiple-choice item) read it once: the
contexts of a batch are prefilled together into a KV cache (left-padded, each with its own
positions), the last context token's logits score every continuation's first token, and the
continuations' remaining tokens run as one batch whose rows attend to their own context's cached
keys and values (``SharedPrefixCache``). A request too long for the model's context is cut from
the left as lm-eval does, so it no longer shares its context; it and any request scored with
``share_prefix=False`` run whole, in ragged batches of context + continuation. Both ways each
row computes what it would alone (up to float rounding), longest first so a batch wastes little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.engine.cache import KVCache, kv_dtype
from lmlab.errors import LmlabError

BATCH_TOKENS = 4096  # tokens per forward pass (rows x longest row): memory for logits stays bounded
PREFIX_SLOTS = 4 * BATCH_TOKENS  # continuation rows x (context + continuation) cache slots gathered per layer


@dataclass
class Scored:
    """A continuation's score."""

    logprob: float  # sum over its tokens, nats
    is_greedy: bool  # every token was the model's top choice
    token_logprobs: list[float]  # per continuation token
    n_tokens: int


def encode_pair(tokenizer, context: str, continuation: str, add_special: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness forms them for a decoder-only model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special=add_special)
    ctx = tokenizer.encode(context, add_special=add_special)
    return ctx, whole[len(ctx) :]


def prefix_token(lm) -> int:
    """The token an empty context is conditioned on: BOS, else the first EOS (lm-eval's prefix token)."""
    cfg, tok = lm.config, lm.tokenizer
    for candidate in (cfg.bos_token_id, getattr(tok, "bos_id", None), *cfg.eos_token_ids, *getattr(tok, "eos_ids", [])):
        if candidate is not None:
            return int(candidate)
    raise LmlabError("this model has neither a BOS nor an EOS token to condition an empty context on; give a context.")


def score_tokens(
    lm,
    requests: list[tuple[list[int], list[int]]],
    batch_tokens: int = BATCH_TOKENS,
    share_prefix: bool = True,
) -> list[Scored]:
    """Score (context ids, continuation ids) pairs; the continuation must be non-empty.

    share_prefix: read each distinct context once for all its continuations (False: every
    request reads its whole context + continuation, as lm-eval's ``hf`` model does)."""
    ctx_len = lm.config.max_seq_len
    rows = []  # (index, input ids, continuation ids): requests run whole
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context -> [(index, continuation)]
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise LmlabError(f"request {i + 1} has an empty continuation; there is nothing to score.")
        if not ctx:
            ctx = [prefix_token(lm)]
        if share_prefix and len(ctx) + len(cont) <= ctx_len + 1:
            groups.setdefault(tuple(ctx), []).append((i, list(cont)))
            continue
        whole = (ctx + cont)[-(ctx_len + 1) :]  # keep the end, as lm-eval does
        rows.append((i, whole[:-1], whole[-len(cont) :]))
    out: list[Scored | None] = [None] * len(requests)
    rows.sort(key=lambda r: -len(r[1]))
    start = 0
    while start < len(rows):
        longest = len(rows[start][1])
        n = max(1, batch_tokens // longest)
        batch = rows[start : start + n]
        start += n
        for (i, _, _), scored in zip(batch, _score_batch(lm, batch)):
            out[i] = scored
    for batch in _pack_groups(sorted(groups.items(), key=lambda g: -len(g[0])), batch_tokens):
        for i, scored in _score_shared(lm, batch):
            out[i] = scored
    return out  # type: ignore[return-value]


def _pack_groups(groups, batch_tokens: int):
    """Consecutive runs of (context, [(index, continuation)]) groups, longest context first, that
    keep the prefill (contexts x longest), the continuation pass (rows x longest continuation)
    and the gathered cache (rows x slots) within their budgets; at least one group per batch."""
    batch, n_rows, longest_cont = [], 0, 0
    for ctx, conts in _split_large(groups, batch_tokens):
        rows = n_rows + len(conts)
        cont = max(longest_cont, max(len(c) for _, c in conts))
        P = len(batch[0][0]) if batch else len(ctx)  # the batch's longest context: the first
        fits = (
            (len(batch) + 1) * P <= batch_tokens
            and rows * (cont - 1) <= batch_tokens
            and rows * (P + cont) <= PREFIX_SLOTS
        )
        if batch and not fits:
            yield batch
            batch, rows, cont = [], len(conts), max(len(c) for _, c in conts)
        batch.append((ctx, conts))
        n_rows, longest_cont = rows, cont
    if batch:
        yield batch


def _split_large(groups, batch_tokens: int):
    """The groups, with one that has too many continuations for one batch's budgets cut into
    several (its context is then read once per part)."""
    for ctx, conts in groups:
        longest = max(len(c) for _, c in conts)
        per = max(1, min(PREFIX_SLOTS // (len(ctx) + longest), batch_tokens // max(1, longest - 1)))
        for k in range(0, len(conts), per):
            yield ctx, conts[k : k + per]


class SharedPrefixCache:
    """The KV cache a batch of continuations reads: row r's own context, computed once in ``prefix``
    (contexts left-padded to the same P slots), then the row's new tokens from slot P on.

    It has what the model asks of a cache (``length``, ``update``, ``advance``); ``update`` returns
    (R, K, P + T, D) keys and values made for one layer at a time, so the contexts are never copied
    per row for all layers at once."""

    def __init__(self, prefix: KVCache, rows: torch.Tensor):
        self.k, self.v = prefix.k, prefix.v  # (L, G, K, P, D) each
        self.rows = rows  # (R,) which context each continuation row reads
        self.length = prefix.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk = self.k[layer, :, :, : self.length].index_select(0, self.rows)  # (R, K, P, D)
        pv = self.v[layer, :, :, : self.length].index_select(0, self.rows)
        return torch.cat([pk, k.to(pk.dtype)], dim=2), torch.cat([pv, v.to(pv.dtype)], dim=2)

    def advance(self, n: int) -> None:
        self.length += n


def _left_padded(seqs: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), key mask (B, T)) with each sequence at the right end of its row."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long, device=dev)
    key_mask = torch.zeros(len(seqs), T, dtype=torch.bool, device=dev)
    for r, s in enumerate(seqs):
        ids[r, T - len(s) :] = torch.tensor(s, device=dev)
        key_mask[r, T - len(s) :] = True
    return ids, key_mask


def _scored(logp: torch.Tensor, cont: list[int]) -> Scored:
    """A continuation's score from its log-probabilities (n, V), row t predicting cont[t]."""
    target = torch.tensor(cont, device=logp.device)
    tok_lp = logp.gather(-1, target[:, None])[:, 0]
    greedy = bool((logp.argmax(-1) == target).all())
    return Scored(float(tok_lp.sum()), greedy, tok_lp.tolist(), len(cont))


@torch.inference_mode()
def _score_shared(lm, batch) -> list[tuple[int, Scored]]:
    """Score a batch of (context, [(index, continuation)]) groups: every context once, then every continuation."""
    dev, cfg = lm.device, lm.config
    V, pad = cfg.vocab_size, cfg.pad_token_id or 0
    ctx_ids, ctx_mask = _left_padded([list(ctx) for ctx, _ in batch], pad, dev)  # (G, P)
    G, P = ctx_ids.shape
    positions = (ctx_mask.long().cumsum(-1) - 1).clamp(min=0)
    prefix = KVCache(cfg, G, P, kv_dtype(lm.dtype, dev), dev)
    padded = bool((~ctx_mask).any())
    last = lm.model(ctx_ids, positions=positions, cache=prefix, key_mask=ctx_mask if padded else None, last_only=True)
    first_logp = torch.log_softmax(last[:, -1, :V].float(), dim=-1)  # (G, V): predicts each continuation's first token

    owners, conts, index = [], [], []
    for g, (_, group) in enumerate(batch):
        for i, cont in group:
            owners.append(g)
            conts.append(cont)
            index.append(i)
    T = max(len(c) for c in conts) - 1  # tokens each continuation row feeds: all but its last
    logits = None
    if T > 0:
        rows = torch.tensor(owners, device=dev)
        ids = torch.full((len(conts), T), pad, dtype=torch.long, device=dev)  # right-padded: causal attention
        for r, c in enumerate(conts):  # never lets a real token see the padding after it
            if len(c) > 1:
                ids[r, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
        ctx_lens = ctx_mask.sum(-1)[rows]  # (R,)
        cont_pos = ctx_lens[:, None] + torch.arange(T, device=dev)[None, :]  # (R, T)
        cont_pos = cont_pos.clamp(max=cfg.max_seq_len - 1)  # only a padding slot can pass the end
        key_mask = torch.cat([ctx_mask[rows], torch.ones(len(conts), T, dtype=torch.bool, device=dev)], dim=1)
        cache = SharedPrefixCache(prefix, rows)
        logits = lm.model(ids, positions=cont_pos, cache=cache, key_mask=key_mask)  # (R, T, V)
    results = []
    for r, (g, cont, i) in enumerate(zip(owners, conts, index)):
        logp = first_logp[g : g + 1]
        if len(cont) > 1:
            rest = torch.log_softmax(logits[r, : len(cont) - 1, :V].float(), dim=-1)  # (n - 1, V)
            logp = torch.cat([logp, rest])
        results.append((i, _scored(logp, cont)))
    return results


@torch.inference_mode()
def _score_batch(lm, batch) -> list[Scored]:
    """Score (index, input ids, continuation) rows read whole: context + continuation but its last token."""
    ids, key_mask = _left_padded([x for _, x, _ in batch], lm.config.pad_token_id or 0, lm.device)
    T = ids.shape[1]
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = bool((~key_mask).any())
    logits = lm.model(ids, positions=positions, key_mask=key_mask if padded else None)  # (B, T, V)
    logits = logits[..., : lm.config.vocab_size]
    results = []
    for r, (_, _, cont) in enumerate(batch):
        n = len(cont)
        logp = torch.log_softmax(logits[r, T - n :].float(), dim=-1)  # (n, V): the positions predicting cont
        results.append(_scored(logp, cont))
    return results


def score_texts(lm, pairs: list[tuple[str, str]], share_prefix: bool = True) -> list[Scored]:
    """Score (context, continuation) text pairs (lm-eval's ``loglikelihood``)."""
    lm._need_tokenizer()
    return score_tokens(lm, [encode_pair(lm.tokenizer, c, x) for c, x in pairs], share_prefix=share_prefix)
