"""The OpenAI wire format: request bodies, their checks, and the JSON the server answers with.

Request bodies are pydantic models with OpenAI's fields and vLLM's extra sampling knobs (unknown
fields are ignored, as vLLM does). Types are checked by pydantic, strictly as OpenAI's API checks
them (a number sent as a string is refused); ranges are checked here, each with a sentence that
names the field, so a client sees ``{"error": {"message", "type", "param",
"code"}}`` and knows what to fix.
"""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from lmlab.engine.sampling import SamplingParams
from lmlab.errors import LmlabError
from lmlab.tokenizer import byte_alphabet

MAX_N = 16  # choices per request, as OpenAI allows
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MIN_LOGPROB = -9999.0  # what a log-probability of -inf is sent as (JSON has no infinity), as vLLM does
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


class ApiError(Exception):
    """An error the client caused (or a server state it must wait out), sent as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# ----------------------------------------------------------------------------------------- requests


# "max_tokens": "5" or "stream": "yes" is a 400 naming the field, not a string quietly read as a
# number (an int is still a valid float).
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class Knobs(BaseModel):
    """The sampling fields both endpoints share: OpenAI's, then lmlab's others (as vLLM takes them)."""

    model_config = STRICT

    model: str | None = None
    temperature: float | None = None  # default 1.0; 0 = greedy
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # lmlab's other knobs, accepted as extra fields the way vLLM accepts them
    top_k: int | None = None  # 0 or -1 = off
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    ignore_eos: bool | None = False


class CompletionRequest(Knobs):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    # lmlab's: each choice (each streamed chunk's too) carries "lmlab": {"tokens": [...]} (serve/lab.py token_entries)
    return_token_ids: bool | None = False


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(Knobs):
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None  # default: up to the end of the context
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------------------- checks


def check_knobs(req: Knobs, max_tokens: int | None, logprobs: int | None, logprobs_field: str) -> None:
    """Range checks of the OpenAI fields, each error naming its field. (Comparisons fail on NaN.)"""
    if req.temperature is not None and not req.temperature >= 0:
        raise bad("temperature", f"temperature must be >= 0 (0 is greedy), got {req.temperature}.")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {req.top_p}; use 1 to turn it off.")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise bad("n", f"n must be between 1 and {MAX_N}, got {req.n}.")
    if max_tokens is not None and max_tokens < 0:
        raise bad("max_tokens", f"max_tokens must be >= 0, got {max_tokens}.")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(logprobs_field, f"{logprobs_field} must be between 0 and {MAX_LOGPROBS}, got {logprobs}.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2 <= value <= 2:
            raise bad(name, f"{name} must be between -2 and 2, got {value}.")


def sampling_params(req: Knobs, choice: int) -> SamplingParams:
    """The engine's SamplingParams for choice ``choice`` of a request (seed + choice when seeded)."""
    top_k = req.top_k if req.top_k is not None else 0
    fields = dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1 means off
        min_p=0.0 if req.min_p is None else req.min_p,
        typical_p=1.0 if req.typical_p is None else req.typical_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        no_repeat_ngram_size=req.no_repeat_ngram_size or 0,
        seed=None if req.seed is None else req.seed + choice,
    )
    try:
        return SamplingParams(**fields)
    except LmlabError as e:  # its message starts with the field's name
        message = str(e)
        field = message.split(" ", 1)[0]
        message = re.sub(r"; use --.*$", ".", message)  # its CLI advice does not apply over HTTP
        raise bad(field if field in fields else None, message) from None


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


# The roles a message may have, and the one the chat template gets: OpenAI's "developer" is its
# newer name for "system", which is the name the models' templates know.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(messages: list[ChatMessage] | None) -> list[dict]:
    """The messages as the chat template takes them ({'role', 'content': str})."""
    if not messages:
        raise bad("messages", "messages must be a non-empty list of {'role': ..., 'content': ...}.")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad(
                f"messages[{i}].role",
                f"role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r} (this server does not call tools).",
            )
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise bad(
                    f"messages[{i}].content",
                    "only text content parts are supported; send {'type': 'text', 'text': ...}.",
                )
            content = "".join(part.text or "" for part in content)
        out.append({"role": CHAT_ROLES[m.role], "content": content or ""})
    return out


def check_length(prompt_len: int, max_tokens: int, context: int, prompt_field: str) -> None:
    """The prompt and what is asked for must fit the model's context (both lengths named)."""
    if prompt_len > context:
        raise bad(
            prompt_field,
            f"the prompt is {prompt_len} tokens, longer than the model's context of {context} tokens; shorten it.",
        )
    if prompt_len + max_tokens > context:
        raise bad(
            "max_tokens",
            f"the prompt is {prompt_len} tokens and max_tokens asks for {max_tokens} more, beyond "
            f"the model's context of {context} tokens; ask for at most {context - prompt_len}.",
        )


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad(field, f"token id {bad_ids[0]} is out of range; this model's vocabulary has ids 0..{vocab_size - 1}.")


# ----------------------------------------------------------------------------------------- answers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(engine_reason: str | None) -> str | None:
    return FINISH_REASONS.get(engine_reason, engine_reason) if engine_reason else None


def safe_logprob(x: float | None) -> float | None:
    """A log-probability JSON can carry: -inf becomes MIN_LOGPROB."""
    if x is None:
        return None
    return x if math.isfinite(x) else MIN_LOGPROB


def log_of(p: float) -> float:
    return math.log(p) if p > 0 else MIN_LOGPROB


class TokenInfo:
    """One token with its log-probability and its top alternatives [(token id, logprob)], best first.

    ``top`` is None where no alternatives exist (the first prompt token). The token's own entry
    among the alternatives carries exactly ``logprob``, so a client's "is it the top token" check
    (lm-eval compares the token's logprob with the best alternative's) never sees two roundings.
    """

    __slots__ = ("id", "logprob", "top")

    def __init__(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None):
        self.id, self.logprob = token_id, safe_logprob(logprob)
        if top is not None:
            top = [(a, self.logprob if a == token_id else safe_logprob(lp)) for a, lp in top]
        self.top = top


def completion_logprobs(infos: list[TokenInfo], tokenizer, start_offset: int = 0) -> dict:
    """The completions endpoint's logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset.

    text_offset: where each token starts in the choice's text, counted as vLLM does (the lengths
    of the token strings before it, from ``start_offset``).
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for info in infos:
        piece = tokenizer.token_str(info.id)
        tokens.append(piece)
        token_logprobs.append(info.logprob)
        if info.top is None:
            top_logprobs.append(None)
        else:
            alternatives: dict[str, float] = {}
            for a, lp in info.top:  # best first: two ids spelled alike keep the better one
                alternatives.setdefault(tokenizer.token_str(a), lp)
            top_logprobs.append(alternatives)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(infos: list[TokenInfo], tokenizer) -> dict:
    """The chat endpoint's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def entry(token_id: int, lp: float) -> dict:
        return {"token": tokenizer.token_str(token_id), "logprob": lp, "bytes": token_bytes(tokenizer, token_id)}

    return {
        "content": [{**entry(i.id, i.logprob), "top_logprobs": [entry(a, lp) for a, lp in i.top or []]} for i in infos]
    }


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet, inverted: the character that spells a byte -> the byte."""
    return {c: b for b, c in byte_alphabet().items()}


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for (a byte of a split character included)."""
    piece = tokenizer.id_to_token(token_id)
    if piece is not None and getattr(tokenizer, "kind", "") == "byte_level" and token_id not in tokenizer.special_ids:
        inverse = _byte_of_char()
        if all(c in inverse for c in piece):
            return [inverse[c] for c in piece]
    if piece is not None and getattr(tokenizer, "kind", "") == "sentencepiece":
        m = _SP_BYTE.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
    return list(tokenizer.token_str(token_id).encode("utf-8"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(obj: Any) -> str:
    """One server-sent event carrying JSON."""
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
