"""Log-likelihood of continuations, the way lm-evaluation-harness scores multiple choice.

For a (context, continuation) pair of texts: trailing spaces of the context move to the
continuation, the whole text and the context are encoded, and the continuation's tokens are
what the whole text has beyond the context's. The model reads context + continuation (the last
``context`` tokens of it if it is too long) and the continuation's log-likelihood is the sum of
log p(token | everything before it) over its tokens; it is greedy when every one of its tokens
is the argmax at its position.

Requests are scored in ragged batches: left-padded with a key mask and their own positions, so
each computes what it would alone (the engine's batching), longest first so a batch wastes little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError

BATCH_TOKENS = 4096  # tokens per forward pass (rows x longest row): memory for logits stays bounded


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


def score_tokens(lm, requests: list[tuple[list[int], list[int]]], batch_tokens: int = BATCH_TOKENS) -> list[Scored]:
    """Score (context ids, continuation ids) pairs; the continuation must be non-empty."""
    ctx_len = lm.config.max_seq_len
    rows = []  # (index, input ids, number of continuation tokens)
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise LmlabError(f"request {i + 1} has an empty continuation; there is nothing to score.")
        if not ctx:
            ctx = [prefix_token(lm)]
        whole = (ctx + cont)[-(ctx_len + 1) :]  # keep the end, as lm-eval does
        rows.append((i, whole[:-1], whole[-len(cont) :]))
    rows.sort(key=lambda r: -len(r[1]))
    out: list[Scored | None] = [None] * len(requests)
    start = 0
    while start < len(rows):
        longest = len(rows[start][1])
        n = max(1, batch_tokens // longest)
        batch = rows[start : start + n]
        start += n
        for (i, _, _), scored in zip(batch, _score_batch(lm, batch)):
            out[i] = scored
    return out  # type: ignore[return-value]


@torch.inference_mode()
def _score_batch(lm, batch) -> list[Scored]:
    dev = lm.device
    T = max(len(ids) for _, ids, _ in batch)
    B = len(batch)
    pad = lm.config.pad_token_id or 0
    ids = torch.full((B, T), pad, dtype=torch.long, device=dev)
    key_mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    for r, (_, x, _) in enumerate(batch):
        ids[r, T - len(x) :] = torch.tensor(x, device=dev)
        key_mask[r, T - len(x) :] = True
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = bool((~key_mask).any())
    logits = lm.model(ids, positions=positions, key_mask=key_mask if padded else None)  # (B, T, V)
    logits = logits[..., : lm.config.vocab_size]
    results = []
    for r, (_, _, cont) in enumerate(batch):
        n = len(cont)
        logp = torch.log_softmax(logits[r, T - n :].float(), dim=-1)  # (n, V): the positions predicting cont
        target = torch.tensor(cont, device=dev)
        tok_lp = logp.gather(-1, target[:, None])[:, 0]
        greedy = bool((logp.argmax(-1) == target).all())
        results.append(Scored(float(tok_lp.sum()), greedy, tok_lp.tolist(), n))
    return results


def score_texts(lm, pairs: list[tuple[str, str]]) -> list[Scored]:
    """Score (context, continuation) text pairs (lm-eval's ``loglikelihood``)."""
    lm._need_tokenizer()
    return score_tokens(lm, [encode_pair(lm.tokenizer, c, x) for c, x in pairs])
