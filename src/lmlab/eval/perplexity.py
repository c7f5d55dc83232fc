"""Perplexity of a text, in windows no longer than the model's context.

Two ways to cut a long text, and the result says which was used:

- **strided** (``stride < window``), the transformers docs' method: windows of ``window`` tokens
  start every ``stride`` tokens; each scores only the tokens the previous window did not, so
  every token but the first is predicted with at least ``window - stride`` tokens before it.
- **disjoint** (``stride == window``), what lm-evaluation-harness's rolling log-likelihood does:
  the first token is predicted from the prefix token (BOS), then each window predicts the next
  ``window`` tokens with one token of context before them. Cheaper; each window starts cold.

Reported as lm-eval does: token perplexity exp(mean loss), word perplexity exp(-sum / words),
byte perplexity exp(-sum / bytes) and bits per byte (-sum / bytes / ln 2).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from lmlab.errors import LmlabError
from lmlab.eval.loglik import prefix_token


@dataclass
class PerplexityResult:
    method: str  # "strided" | "disjoint"
    window: int
    stride: int
    tokens: int  # tokens scored
    loglikelihood: float  # sum over scored tokens, nats
    words: int
    bytes: int
    seconds: float
    token_ids: list[int] = field(repr=False, default_factory=list)  # the scored tokens, in order
    losses: list[float] = field(repr=False, default_factory=list)  # -log p of each, nats

    @property
    def perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {
            "method": self.method,
            "window": self.window,
            "stride": self.stride,
            "tokens": self.tokens,
            "loglikelihood": self.loglikelihood,
            "perplexity": self.perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "words": self.words,
            "bytes": self.bytes,
            "tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds,
        }

    def most_surprising(self, tokenizer, k: int = 10) -> list[tuple[int, str, float]]:
        """The k tokens with the highest loss: (index among scored tokens, token text, loss in nats)."""
        order = sorted(range(len(self.losses)), key=lambda i: -self.losses[i])[:k]
        return [(i, tokenizer.decode([self.token_ids[i]]), self.losses[i]) for i in sorted(order)]


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window over token indices: input is tokens[begin:end], the last
    ``scored`` of its positions are scored. Strided: the HF method. Disjoint: lm-eval's rolling
    windows, where begin = -1 stands for the prefix token before the text."""
    out = []
    if stride >= window:  # disjoint, lm-eval: first window predicts tokens[0:window] from [prefix] + tokens[:window-1]
        first = min(window, n_tokens)
        out.append((-1, first - 1, first))
        done = first
        while done < n_tokens:
            end = min(n_tokens, done + window)
            out.append((end - window - 1, end - 1, end - done))
            done = end
        return out
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = end - max(prev_end, begin + 1) if begin == 0 else end - prev_end
        out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(lm, text: str, window: int | None = None, stride: int | None = None) -> PerplexityResult:
    """Perplexity of ``text`` under ``lm``; window defaults to the model's context, stride to half of it."""
    lm._need_tokenizer()
    if not text.strip():
        raise LmlabError("the text is empty; give a file with some text to score.")
    ctx = lm.config.max_seq_len
    window = window or min(ctx, 1024)
    if not 2 <= window <= ctx:
        raise LmlabError(f"--window must be between 2 and the model's context ({ctx}), got {window}.")
    stride = stride or window // 2
    if not 1 <= stride <= window:
        raise LmlabError(f"--stride must be between 1 and --window ({window}), got {stride}.")
    ids = lm.tokenizer.encode(text, add_special=False)
    if len(ids) < 2:
        raise LmlabError("the text is a single token; give a longer text.")
    disjoint = stride >= window
    dev = lm.device
    t0 = time.perf_counter()
    scored_ids: list[int] = []
    losses: list[float] = []
    for begin, end, n in windows(len(ids), window, stride):
        if begin < 0:  # lm-eval's first window: the prefix token stands before the text
            inp, targets = [prefix_token(lm)] + ids[:end], ids[: end + 1]
        elif disjoint:  # input tokens[begin:end] predicts tokens[begin+1:end+1]
            inp, targets = ids[begin:end], ids[begin + 1 : end + 1]
        else:
            inp, targets = ids[begin:end], ids[begin + 1 : end]
            inp = inp[: len(targets)]
        x = torch.tensor([inp], device=dev)
        logits = lm.model(x)[0, :, : lm.config.vocab_size].float()  # (len(inp), V)
        logp = torch.log_softmax(logits[-n:], dim=-1)  # the last n positions predict the scored tokens
        tgt = torch.tensor(targets[-n:], device=dev)
        lp = logp.gather(-1, tgt[:, None])[:, 0]
        scored_ids += targets[-n:]
        losses += (-lp).tolist()
    seconds = time.perf_counter() - t0
    words = len(re.split(r"\s+", text.strip()))
    return PerplexityResult(
        "disjoint" if disjoint else "strided",
        window,
        stride,
        len(losses),
        -sum(losses),
        words,
        len(text.encode("utf-8")),
        seconds,
        scored_ids,
        losses,
    )


def perplexity_endpoint(backend, text: str, chunk_chars: int = 2000) -> PerplexityResult:
    """Perplexity through a server's echoed prompt log-probabilities, the text sent in pieces of
    about ``chunk_chars`` characters cut at line ends (each piece's first token is not scored)."""
    if not text.strip():
        raise LmlabError("the text is empty; give a file with some text to score.")
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > chunk_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    t0 = time.perf_counter()
    scored = backend.map(backend.prompt_logprobs, pieces)
    losses = [-lp for _, lps in scored for lp in lps if lp is not None]
    seconds = time.perf_counter() - t0
    words = len(re.split(r"\s+", text.strip()))
    return PerplexityResult(
        "endpoint",
        chunk_chars,
        chunk_chars,
        len(losses),
        -sum(losses),
        words,
        len(text.encode("utf-8")),
        seconds,
        [],
        losses,
    )
