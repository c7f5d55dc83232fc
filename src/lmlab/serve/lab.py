"""The playground's server side: the page's static files and lmlab's own JSON endpoints under /lab.

    GET  /                      the page (web/static/index.html); GET /static/<file> the rest of it
    GET  /lab/models            the models served, their load state, memory and shape
    POST /lab/prompt            a prompt (base, chat template or fake chat) -> token ids and pieces
    POST /lab/inside            one generated token, inside: logit lens, attention row, sampling chain
    POST /lab/attention         every attention pattern of a short sequence
    POST /lab/intervene         a generation with heads ablated / layers skipped / a steering vector,
                                beside the same seed's baseline, with KL and delta-logit per position
    GET  /lab/runs[/{id}[/export]], /lab/bench, /lab/stats   the run store, read back

Generation itself is the OpenAI endpoint (``POST /v1/completions`` with ``return_token_ids``; see
``token_entries``): a request with the header ``X-Lmlab-Client: playground`` is also recorded as
its own ``generate`` run (``GenerateRun``).

Model work never runs on the event loop, and never beside the batch: each look inside is queued
to the model's engine (``BatchEngine.call``) and runs in its worker thread between two decoding
steps. So hooks and interventions, which change the shared model while they are registered, can
never touch a batch in flight; the batch waits for one look (milliseconds to a second on a CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lmlab.engine.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    counts_from_ids,
    min_p_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from lmlab.errors import LmlabError
from lmlab.serve import protocol as P

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a flat folder: no slashes, no leading dot

DEFAULT_TOP = 5  # alternatives per streamed token when the request sets no logprobs
CHAIN_TOP = 20  # tokens shown per sampling stage
CANDIDATES = 200  # raw logits sent for re-sampling in the browser
MAX_K = 50  # /lab/inside's k (lens tokens per layer)
MAX_ATTENTION_IDS = 512  # /lab/attention's sequence limit (tokens)
MAX_ATTENTION_CELLS = 4_000_000  # layers x heads x T x T weights in one answer (about 40 MB of JSON)
MAX_INTERVENE_TOKENS = 256  # /lab/intervene's max_tokens limit
FULL_CAPTURE_TOKENS = 1024  # /lab/inside captures in one forward up to this context (tokens); beyond, prefill + step
DECIMALS = 7  # attention weights are rounded to this many decimals (sums stay within 1e-5 of 1 below 100 keys)


# ----------------------------------------------------------------------------------------- requests


class Sampling(BaseModel):
    """The sampling settings the page uses, as the completions endpoint takes them (same defaults)."""

    model_config = ConfigDict(extra="ignore")
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    text: str = Field(description="What the user typed: the prompt (base) or the user's message (chat, fake-chat).")
    mode: Literal["base", "chat", "fake-chat"] = "base"
    system: str | None = None
    shots: list[tuple[str, str]] | None = Field(None, description="Worked examples [[question, answer], ...].")


class InsideRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    ids: list[int] = Field(description="Prompt and generated ids; ids[position] is the token looked at.")
    position: int = Field(description="The token looked at; the context that produced it is ids[:position].")
    k: int = Field(10, description="Tokens per layer in the logit lens.")
    sampling: Sampling = Field(default_factory=Sampling)


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    ids: list[int]
    layer: int | None = Field(None, description="Only this layer (the answer's layers is then 1).")


class SteerSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    positive: str
    negative: str
    layer: int
    scale: float = 0.5


class InterveneRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    ids: list[int] = Field(description="The prompt's token ids.")
    max_tokens: int = 16
    seed: int | None = 0
    sampling: Sampling = Field(default_factory=Sampling)
    ablate: list[tuple[int, int]] = Field(default_factory=list, description="[[layer, head], ...] zeroed.")
    skip_layers: list[int] = Field(default_factory=list)
    steer: SteerSpec | None = None
    ignore_eos: bool = False
    k: int = Field(10, description="Tokens per layer in the two lens columns.")


# ----------------------------------------------------------------------------------------- checks


def sampling_params(s: Sampling, seed: int | None = None, field: str = "sampling") -> SamplingParams:
    """The engine's SamplingParams for the page's settings; a bad value names ``sampling.<its field>``."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -2 <= value <= 2:
            raise P.bad(f"{field}.{name}", f"{name} must be between -2 and 2, got {value}.")
    values = s.model_dump()
    values["top_k"] = 0 if values["top_k"] == -1 else values["top_k"]
    try:
        return SamplingParams(**values, seed=seed)
    except LmlabError as e:  # its message starts with the field's name
        message = re.sub(r"; use --.*$", ".", str(e))
        name = message.split(" ", 1)[0]
        raise P.bad(f"{field}.{name}" if name in values else field, message) from None


def check_ids(served, ids: list[int], field: str = "ids", limit: int | None = None) -> None:
    if not ids:
        raise P.bad(field, f"{field} is empty; send at least one token id.")
    cap = min(limit or served.context, served.context)
    if len(ids) > cap:
        why = "this endpoint's limit" if limit and limit < served.context else "the model's context"
        raise P.bad(field, f"{field} has {len(ids)} tokens, more than {why} of {cap}; send fewer.")
    P.check_token_ids(ids, served.lm.config.vocab_size, field)


def check_k(k: int, field: str = "k") -> None:
    if not 1 <= k <= MAX_K:
        raise P.bad(field, f"{field} must be between 1 and {MAX_K}, got {k}.")


# ----------------------------------------------------------------------------------------- helpers


def server_of(request: Request):
    return request.app.state.server


async def on_engine(server, served, fn):
    """Run ``fn()`` in the model's engine thread, between two decoding steps (see the module docstring)."""
    try:
        future = served.engine.call(fn)
    except LmlabError:
        raise server.not_ready() from None
    return await asyncio.wrap_future(future)


async def json_response(obj: dict) -> Response:
    """A large answer (attention weights: up to millions of numbers) encoded off the event loop."""
    body = await asyncio.to_thread(json.dumps, obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, media_type="application/json")


def pieces_of(tokenizer, ids: list[int], before=()) -> list[str]:
    """The text each of ``ids`` adds after the tokens ``before`` (so the pieces join into the decoded
    text; a character split over byte tokens comes whole on the token that completes it)."""
    if tokenizer is None:
        return [f"{i} " for i in ids]
    dec = tokenizer.incremental_decoder()
    for t in before[-8:]:  # a few tokens of context: enough for a decoder's leading-space rule
        dec.push(t)
    dec.flush()
    out = [dec.push(t) for t in ids]
    if out:
        out[-1] += dec.flush()
    return out


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.token_str(token_id) if tokenizer is not None else str(token_id)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def token_entries(events, tokenizer) -> list[dict]:
    """The ``lmlab.tokens`` of a completion choice for these ``SampledTokenEvent``s.

    logprob, entropy and top are of the distribution the token was drawn from (every sampling stage
    applied; see ``SampledTokenEvent``), top best first with the drawn token added when it is not
    among them and impossible tokens (probability 0) left out; text is the text this token hands
    out (may be '' while a character or a possible stop string is pending), piece the token's own
    spelling (tokenizer.token_str); raw_logprob is the model's own
    (before any sampling stage), as OpenAI's logprobs are. t_ms: time.time() * 1000 at the draw.
    """
    out = []
    for ev in events:
        top = [[a, token_text(tokenizer, a), lp] for a, lp in getattr(ev, "sampled_alternatives", []) if lp > -math.inf]
        out.append(
            {
                "id": ev.id,
                "text": ev.text,
                "piece": token_text(tokenizer, ev.id),
                "logprob": getattr(ev, "sampled_logprob", ev.logprob),
                "raw_logprob": P.safe_logprob(ev.logprob),
                "entropy": getattr(ev, "sampled_entropy", ev.entropy),
                "top": top,
                "t_ms": getattr(ev, "t_wall_ms", None),
            }
        )
    return out


def _lens_column(lm, resid: dict[int, torch.Tensor], k: int) -> list[dict]:
    """resid: layer -> (C,) residual stream -> [{"layer", "top": [{"id", "text", "prob"}]}] per layer.

    Every layer goes through the final norm and the unembedding in one call (L, C) -> (L, V), so
    the unembedding matrix is read once rather than once per layer."""
    from lmlab.inspect.lens import unembed

    tok, V = lm.tokenizer, lm.config.vocab_size
    layers = sorted(resid)
    probs = unembed(lm.model, torch.stack([resid[i] for i in layers])[None]).float()[0, :, :V].softmax(-1)
    top = probs.topk(k, dim=-1)  # (L, k)
    return [
        {
            "layer": layer,
            "top": [{"id": i, "text": token_text(tok, i), "prob": p} for i, p in zip(ids, ps)],
        }
        for layer, ids, ps in zip(layers, top.indices.tolist(), top.values.tolist())
    ]


def attention_layout(cfg) -> dict:
    """The facts a drawing of attention needs: which kv head each query head reads, each layer's window."""
    return {
        "layers": cfg.n_layers,
        "heads": cfg.n_heads,
        "kv_group": [h // cfg.gqa_groups for h in range(cfg.n_heads)],
        "window": [cfg.sliding_window if t == "sliding" else None for t in cfg.layer_types],
    }


def _rounded(t: torch.Tensor) -> list:
    """A tensor of probabilities as nested lists, rounded to DECIMALS in float64 (short JSON)."""
    return t.double().round(decimals=DECIMALS).tolist()


# ----------------------------------------------------------------------------------------- the sampling chain


def sampling_chain(
    logits: torch.Tensor, context: torch.Tensor, params: SamplingParams
) -> list[tuple[str, torch.Tensor]]:
    """The sampler's stages one by one: raw logits (1, V) -> [(stage name, logits after it)].

    The same functions in the same order as ``Sampler.process`` (penalties, then unless greedy:
    temperature, top-k, top-p, min-p, and typical-p when it is on), on the same token history: the
    context (1, S), which is what the engine's row had seen when it drew the next token. So the
    last stage's softmax is the distribution the engine drew from (tests/test_lab_api.py holds
    the two equal).
    """
    x = logits.float()
    V = x.shape[-1]
    counts = counts_from_ids(context, V) if params.uses_counts else None
    seq = context if params.no_repeat_ngram_size else None
    stages = [("logits", x)]
    x = apply_penalties(x, counts, seq, params)
    stages.append(("penalties", x))
    if params.greedy:
        return stages
    x = apply_temperature(x, params.temperature)
    stages.append(("temperature", x))
    x = top_k_filter(x, params.top_k)
    stages.append(("top_k", x))
    x = top_p_filter(x, params.top_p)
    stages.append(("top_p", x))
    x = min_p_filter(x, params.min_p)
    stages.append(("min_p", x))
    if params.typical_p < 1.0:
        x = typical_filter(x, params.typical_p)
        stages.append(("typical_p", x))
    return stages


def _chain_json(stages, raw: torch.Tensor, token_id: int, tokenizer, greedy: bool) -> dict:
    out = []
    for name, x in stages:
        row = x[0]
        probs = row.softmax(-1)
        kept = int(torch.isfinite(row).sum())
        top = row.topk(min(CHAIN_TOP, kept))
        out.append(
            {
                "name": name,
                "kept": kept,
                "top": [
                    {"id": i, "text": token_text(tokenizer, i), "logit": v, "prob": float(probs[i])}
                    for i, v in zip(top.indices.tolist(), top.values.tolist())
                ],
            }
        )
    final = stages[-1][1][0]
    penalized = stages[1][1][0]
    cand = raw[0].topk(min(CANDIDATES, raw.shape[-1]))
    return {
        "stages": out,
        "greedy": greedy,
        "sampled": {
            "id": token_id,
            "text": token_text(tokenizer, token_id),
            "prob": float(final.softmax(-1)[token_id]),
            "argmax": int(final.argmax()),
        },
        "candidates": [
            {"id": i, "text": token_text(tokenizer, i), "logit": v, "penalized": _finite(float(penalized[i]))}
            for i, v in zip(cand.indices.tolist(), cand.values.tolist())
        ],
    }


# ----------------------------------------------------------------------------------------- model work


def look_inside(lm, ids: list[int], position: int, k: int, params: SamplingParams) -> dict:
    """/lab/inside's work, in the engine thread. Two forwards over the context ids[:position]:

    1. plain (no hook, the fused attention kernel), timed as forward_ms: its last logits feed the
       sampling chain;
    2. with capture, timed as capture_ms: hooks on every layer's residual stream and attention
       scores (which makes attention explicit: scores, mask, softmax) keep the last position's
       stream and query row. Up to FULL_CAPTURE_TOKENS this is one forward over the context, whose
       explicit attention holds (H, T, T) scores per layer for a moment; beyond, the context but
       its last token is prefilled into a KV cache without hooks and only the last token runs
       hooked, so memory stays (H, T) per layer whatever the length.
    """
    from lmlab.engine.cache import KVCache, kv_dtype
    from lmlab.inspect.hooks import registered

    model, cfg, dev, tok = lm.model, lm.config, lm.device, lm.tokenizer
    V = cfg.vocab_size
    context = torch.tensor([ids[:position]], device=dev)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(context, last_only=True)[:, -1, :V]  # (1, V)
        forward_ms = (time.perf_counter() - t0) * 1e3

        resid: dict[int, torch.Tensor] = {}
        rows: dict[int, torch.Tensor] = {}

        def keep_resid(layer):
            def fn(x, name):
                resid[layer] = x[0, -1].detach()  # (C,)

            return fn

        def keep_row(layer):
            def fn(x, name):  # scores (1, H, 1, S), masked with -inf: the softmax written out
                rows[layer] = x[0, :, -1].float().softmax(-1)  # (H, S)

            return fn

        pairs = [(f"blocks.{i}.resid_post", keep_resid(i)) for i in range(cfg.n_layers)]
        pairs += [(f"blocks.{i}.attn.scores", keep_row(i)) for i in range(cfg.n_layers)]
        t0 = time.perf_counter()
        if position <= FULL_CAPTURE_TOKENS:
            with registered(model, pairs):
                model(context, last_only=True)
        else:
            cache = KVCache(cfg, 1, position, kv_dtype(lm.dtype, dev), dev)
            model(context[:, :-1], cache=cache, last_only=True)
            with registered(model, pairs):
                model(context[:, -1:], cache=cache, last_only=True)
        capture_ms = (time.perf_counter() - t0) * 1e3

        t0 = time.perf_counter()
        lens = _lens_column(lm, resid, k)
        stages = sampling_chain(logits, context, params)
        chain = _chain_json(stages, logits.float(), ids[position], tok, params.greedy)
        attention = attention_layout(cfg)
        attention["rows"] = [_rounded(rows[i]) for i in range(cfg.n_layers)]
        rest_ms = (time.perf_counter() - t0) * 1e3
    return {
        "token": {"id": ids[position], "text": token_text(tok, ids[position])},
        "context": {"pieces": pieces_of(tok, ids[:position], ())},
        "lens": lens,
        "attention": attention,
        "chain": chain,
        "timing": {
            "forward_ms": round(forward_ms, 3),
            "capture_ms": round(capture_ms, 3),
            "lens_chain_ms": round(rest_ms, 3),
            "context_tokens": position,
        },
    }


def attention_weights(lm, ids: list[int], layer: int | None) -> dict:
    """/lab/attention's work, in the engine thread: one forward with every (or one) layer's scores
    caught, each row's softmax written out (float32)."""
    from lmlab.inspect.hooks import registered

    model, cfg = lm.model, lm.config
    layers = [layer] if layer is not None else list(range(cfg.n_layers))
    caught: dict[int, torch.Tensor] = {}

    def keep(i):
        def fn(x, name):  # (1, H, T, T), -inf where masked (future keys, outside a window)
            caught[i] = x[0].float().softmax(-1)

        return fn

    with torch.inference_mode(), registered(model, [(f"blocks.{i}.attn.scores", keep(i)) for i in layers]):
        model(torch.tensor([ids], device=lm.device), last_only=True)
    out = attention_layout(cfg)
    out["layers"] = len(layers)
    out["layer_index"] = layers
    out["window"] = [out["window"][i] for i in layers]
    out["weights"] = [_rounded(caught[i]) for i in layers]
    return out


def check_interventions(cfg, body: InterveneRequest) -> None:
    """Every layer and head the request names exists; the steering prompts are not empty."""
    for i, (layer, head) in enumerate(body.ablate):
        if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
            raise P.bad(
                f"ablate[{i}]",
                f"head [{layer}, {head}] is out of range; this model has layers 0..{cfg.n_layers - 1} and heads "
                f"0..{cfg.n_heads - 1}.",
            )
    for i, layer in enumerate(body.skip_layers):
        if not 0 <= layer < cfg.n_layers:
            raise P.bad(
                f"skip_layers[{i}]", f"layer {layer} is out of range; this model has layers 0..{cfg.n_layers - 1}."
            )
    s = body.steer
    if s is not None:
        if not 0 <= s.layer < cfg.n_layers:
            raise P.bad("steer.layer", f"layer {s.layer} is out of range; this model has layers 0..{cfg.n_layers - 1}.")
        if not math.isfinite(s.scale):
            raise P.bad("steer.scale", f"steer.scale must be a finite number, got {s.scale}.")
        for name in ("positive", "negative"):
            if not getattr(s, name).strip():
                raise P.bad(f"steer.{name}", f"steer.{name} is empty; give a word or a short text, e.g. 'love'.")


def _interventions(lm, body: InterveneRequest) -> list:
    """The request's interventions (checked by check_interventions); the steering vector is computed here."""
    from lmlab.inspect.interventions import AblateHeads, SkipLayers, Steer

    out = []
    if body.ablate:
        out.append(AblateHeads([tuple(p) for p in body.ablate]))
    if body.skip_layers:
        out.append(SkipLayers(sorted(set(body.skip_layers))))
    if body.steer is not None:
        s = body.steer
        try:
            out.append(Steer.from_prompts(lm, s.positive, s.negative, s.layer, s.scale))
        except LmlabError as e:
            raise P.bad("steer", str(e)) from None
    return out


def intervene(lm, body: InterveneRequest, params: SamplingParams) -> dict:
    """/lab/intervene's work, in the engine thread: baseline and intervened generation with the same
    seed, then both models scored on the baseline's tokens (one forward each) and lensed at the last
    prompt position."""
    ivs = _interventions(lm, body)
    tok, V, P_ = lm.tokenizer, lm.config.vocab_size, len(body.ids)
    gen = dict(max_new_tokens=body.max_tokens, params=params, ignore_eos=body.ignore_eos)
    t0 = time.perf_counter()
    base = lm.generate(list(body.ids), **gen)
    with lm.intervene(*ivs):
        changed = lm.generate(list(body.ids), **gen)
    gen_ms = (time.perf_counter() - t0) * 1e3
    full = torch.tensor([list(body.ids) + list(base.token_ids)], device=lm.device)
    with torch.inference_mode():
        base_logits = lm.model(full)[0, P_ - 1 : -1, :V].double()  # (N, V): what predicts each baseline token
        with lm.intervene(*ivs):
            new_logits = lm.model(full)[0, P_ - 1 : -1, :V].double()
        lp_b, lp_n = base_logits.log_softmax(-1), new_logits.log_softmax(-1)
        kl = (lp_b.exp() * (lp_b - lp_n)).sum(-1)  # KL(baseline || intervened), nats
        chosen = full[0, P_:, None]
        dlogit = (new_logits.gather(-1, chosen) - base_logits.gather(-1, chosen))[:, 0]
    lens_base = _lens_last(lm, body.ids, body.k)
    with lm.intervene(*ivs):
        lens_new = _lens_last(lm, body.ids, body.k)
    a, b = list(base.token_ids), list(changed.token_ids)
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first_diff is None and len(a) != len(b):
        first_diff = min(len(a), len(b))
    return {
        "baseline": {"ids": a, "pieces": pieces_of(tok, a, body.ids), "finish_reason": base.finish_reason},
        "intervened": {"ids": b, "pieces": pieces_of(tok, b, body.ids), "finish_reason": changed.finish_reason},
        "first_diff": first_diff,
        "per_position": [{"kl": max(0.0, x), "dlogit": d} for x, d in zip(kl.tolist(), dlogit.tolist())],
        "lens": {"baseline": lens_base, "intervened": lens_new},
        "interventions": [iv.describe() for iv in ivs],
        "timing": {"generate_ms": round(gen_ms, 3)},
    }


def _lens_last(lm, ids: list[int], k: int) -> list[dict]:
    """The logit lens at the last position of ids: one forward (with whatever interventions are on),
    each layer's residual stream kept at that position only."""
    from lmlab.inspect.hooks import registered

    resid: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(x, name):
            resid[layer] = x[0, -1].detach()

        return fn

    pairs = [(f"blocks.{i}.resid_post", keep(i)) for i in range(lm.config.n_layers)]
    with torch.inference_mode(), registered(lm.model, pairs):
        lm.model(torch.tensor([list(ids)], device=lm.device), last_only=True)
    return _lens_column(lm, resid, k)


# ----------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, body: PromptRequest) -> tuple[str, list[int], list[str]]:
    """(rendered text, ids, stop strings) for the page's prompt box.

    base: the text as typed (encoded with BOS where the tokenizer adds one), after the shots written
    "Q: ...\\nA: ...\\n\\n" when there are any (then the text is asked as one more "Q: ...\\nA:");
    chat: system, shots and the text as messages in the model's chat template;
    fake-chat: the same conversation as a transcript a base model continues (lmlab.engine.prompting).
    """
    from lmlab.engine.prompting import render

    shots = body.shots or []
    if body.mode == "base":
        text = body.text
        if shots:
            text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots) + f"Q: {body.text}\nA:"
        if body.system:
            text = body.system.rstrip() + "\n\n" + text
        return text, tokenizer.encode(text, add_special=True), []
    messages = [{"role": "system", "content": body.system}] if body.system else []
    if body.mode == "chat":
        if not tokenizer.chat_template:
            raise P.bad("mode", "this model has no chat template; use mode 'fake-chat' to prompt it as an assistant.")
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": body.text})
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except LmlabError as e:
            raise P.bad("mode", str(e)) from None
        return text, tokenizer.encode(text, add_special=False), []
    few_shot = "".join(f"User: {q.strip()}\nAssistant: {a.strip()}\n\n" for q, a in shots) if shots else None
    messages.append({"role": "user", "content": body.text})
    text, stops, add_special = render(tokenizer, messages, "fake", few_shot)
    return text, tokenizer.encode(text, add_special=add_special), stops


# ----------------------------------------------------------------------------------------- run store


def lab_state(server) -> dict:
    """What the lab keeps beside the server: a store opened for reading, the last generation's stats."""
    if not hasattr(server, "lab_state"):
        server.lab_state = {"store": None, "last": None}
    return server.lab_state


def store_of(server):
    """The run store: the serve session's own (its requests are written there), else one opened here."""
    log = getattr(server, "log", None)
    if log is not None and getattr(log, "store", None) is not None:
        return log.store
    state = lab_state(server)
    if state["store"] is None:
        from lmlab.runs import RunStore, StoreUnavailable

        try:
            state["store"] = RunStore()
        except StoreUnavailable as e:
            raise P.ApiError(503, str(e), code="store_unavailable") from None
    return state["store"]


def texts_recorded(server) -> bool:
    """False when the server runs with --no-log-text: runs then keep no prompt or output (ids neither)."""
    log = getattr(server, "log", None)
    return log is not None and getattr(log, "log_text", True)


def _record(server, command: str, served, *, config: dict, seed, inputs: dict):
    """Open a run (the 'running' row is written now) -> (context manager, Run); None when this server
    does not record (``--no-record``)."""
    from lmlab.runs import record_run

    log = getattr(server, "log", None)
    if log is None:
        return None
    if not texts_recorded(server):
        inputs = {"not_recorded": "prompts and outputs are not recorded (--no-log-text)"}
    resolved = getattr(served.lm, "resolved", None)
    cm = record_run(
        command,
        model=served.name,
        model_path=str(resolved.path) if resolved is not None else None,
        config=config,
        seed=seed,
        inputs=inputs,
        store=log.store,
        wandb=False,
        argv=["lmlab", "serve", "(playground)"],
    )
    return cm, cm.__enter__()


def _close(cm, status: str, error: str | None = None) -> None:
    """End a run opened by _record: complete, interrupted (the client left) or failed."""
    if status == "complete":
        cm.__exit__(None, None, None)
        return
    exc = KeyboardInterrupt() if status == "interrupted" else LmlabError(error or "failed")
    with contextlib.suppress(BaseException):
        cm.__exit__(type(exc), exc, None)


class GenerateRun:
    """A playground generation recorded as its own ``generate`` run. The run is opened in a thread
    while the model already generates (``ready()`` waits for it: its id goes out with the last
    chunk) and filled and closed when the server finishes the request (``finish``)."""

    def __init__(self, server, served, body, prompts: list[tuple[str, list[int]]]):
        self.server, self.id, self.cm, self.run = server, None, None, None
        config = {k: v for k, v in body.model_dump(exclude_unset=True).items() if k not in ("prompt", "model")}
        config.update(endpoint="/v1/completions", client="playground")
        inputs = {"prompt_ids": [ids for _, ids in prompts], "prompts": [text for text, _ in prompts]}
        self._opened = asyncio.ensure_future(
            asyncio.to_thread(_record, server, "generate", served, config=config, seed=body.seed, inputs=inputs)
        )

    async def ready(self) -> str | None:
        """The run's id once its row is written (None when it could not be opened)."""
        try:
            opened = await asyncio.shield(self._opened)
        except Exception:  # noqa: BLE001  (a run that cannot be recorded must not fail the generation)
            return None
        if opened is not None:
            self.cm, self.run = opened
            self.id = self.run.id
        return self.id

    def finish(self, status: int, job, error: str | None) -> None:
        """Called by Server.finish (on the event loop) for every end of the request."""
        choices = job.choices if job is not None else []
        outputs = {
            "texts": [c.text for c in choices],
            "token_ids": [[t.id for t in c.tokens] for c in choices],
            "finish_reasons": [c.end.finish_reason if c.end else None for c in choices],
        }
        if not texts_recorded(self.server):
            outputs = {"finish_reasons": outputs["finish_reasons"]}
        timings = job.timings() if job is not None else {}
        ends = [c.end for c in choices if c.end is not None]
        decode = [e.timings.get("decode_tok_s") for e in ends if e.timings.get("decode_tok_s")]
        prompt_tokens = sum(e.prompt_tokens for e in ends)
        ttft = timings.get("ttft_ms")
        metrics = {
            "ttft_ms": ttft,
            "prefill_tok_s": prompt_tokens / (ttft / 1e3) if ttft else None,
            "decode_tok_s": max(decode) if decode else None,
            "completion_tokens": sum(e.completion_tokens for e in ends),
        }
        state = "complete" if status == 200 else "interrupted" if status == 499 else "failed"
        task = asyncio.get_running_loop().create_task(self._finish(outputs, timings, metrics, state, error))
        finishing = getattr(self.server, "_finishing", None)
        if finishing is not None:  # the server waits for these at shutdown
            finishing.add(task)
            task.add_done_callback(finishing.discard)

    async def _finish(self, outputs, timings, metrics, state, error) -> None:
        if await self.ready() is None:
            return
        self.run.outputs, self.run.timings = outputs, timings
        self.run.add_metrics(**metrics)
        lab_state(self.server)["last"] = {**metrics, "run_id": self.id}
        await asyncio.to_thread(_close, self.cm, state, error)


def run_summary(run: dict) -> str:
    """One line about a run for the history list."""
    outputs, inputs = run.get("outputs") or {}, run.get("inputs") or {}
    if isinstance(outputs, dict) and outputs.get("texts"):
        prompt = (inputs.get("prompts") or [""])[0] if isinstance(inputs, dict) else ""
        text = f"{prompt!s}{outputs['texts'][0]}"
    elif isinstance(inputs, dict) and inputs:
        text = json.dumps(inputs, ensure_ascii=False, default=str)
    else:
        text = json.dumps(run.get("config") or {}, ensure_ascii=False, default=str)
    text = " ".join(str(text).split())
    return text[:117] + "..." if len(text) > 120 else text


# ----------------------------------------------------------------------------------------- the routes

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return _static_file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    return _static_file(name)


def _static_file(name: str):
    path = STATIC_DIR / name
    if not STATIC_NAME.fullmatch(name) or not path.is_file():
        where = "; the playground's page is not installed" if name == "index.html" else ""
        raise P.ApiError(404, f"there is no file {name!r} in the playground's static files{where}.", code="not_found")
    media = STATIC_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


@router.get("/lab/models", tags=["lab"])
async def lab_models(request: Request):
    """The models this server was started with: load state, memory (bytes) and shape."""
    server = server_of(request)
    out = []
    for name in server.sources:
        served = server.models.get(name)
        if served is None:
            state = "failed" if server.status == "failed" else "loading"
            out.append({"id": name, "state": state})
            continue
        lm, cfg = served.lm, served.lm.config
        out.append(
            {
                "id": name,
                "family": cfg.family,
                "params": lm.num_parameters,
                "dtype": str(lm.dtype).removeprefix("torch."),
                "device": str(lm.device),
                "state": "loaded",
                "memory_bytes": lm.weight_bytes + int(getattr(lm, "packed_bytes", 0) or 0),
                "n_layers": cfg.n_layers,
                "n_heads": cfg.n_heads,
                "n_kv_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim,
                "context": cfg.max_seq_len,
                "vocab_size": cfg.vocab_size,
                "sliding_window": [cfg.sliding_window if t == "sliding" else None for t in cfg.layer_types],
                "has_chat_template": bool(lm.tokenizer is not None and lm.tokenizer.chat_template),
            }
        )
    return {"models": out}


@router.post("/lab/prompt", tags=["lab"])
async def lab_prompt(body: PromptRequest, request: Request):
    """The prompt the page will send: rendered text, its token ids and each token's piece of text."""
    server = server_of(request)
    served = server.model_for(body.model)
    tok = served.tokenizer

    def work() -> dict:  # a long text takes a while to encode: not on the event loop
        text, ids, stops = render_prompt(tok, body)
        return {
            "ids": ids,
            "pieces": pieces_of(tok, ids, ()),
            "labels": [tok.token_str(i) for i in ids],
            "count": len(ids),
            "text": text,
            "stop": stops,
            "context": served.context,
        }

    return await asyncio.to_thread(work)


@router.post("/lab/inside", tags=["lab"])
async def lab_inside(body: InsideRequest, request: Request):
    """One generated token, inside: logit lens, attention row per layer and head, the sampling chain."""
    server = server_of(request)
    served = server.model_for(body.model)
    check_ids(served, body.ids)
    if not 1 <= body.position < len(body.ids):
        raise P.bad(
            "position",
            f"position must be between 1 and {len(body.ids) - 1} (ids[position] is the token looked at, "
            f"ids[:position] its context), got {body.position}.",
        )
    check_k(body.k)
    params = sampling_params(body.sampling)
    out = await on_engine(server, served, lambda: look_inside(served.lm, body.ids, body.position, body.k, params))
    return await json_response(out)


@router.post("/lab/attention", tags=["lab"])
async def lab_attention(body: AttentionRequest, request: Request):
    """Every attention pattern (rows sum to 1; zero above the diagonal and outside a sliding window)."""
    server = server_of(request)
    served = server.model_for(body.model)
    check_ids(served, body.ids, limit=MAX_ATTENTION_IDS)
    cfg = served.lm.config
    if body.layer is not None and not 0 <= body.layer < cfg.n_layers:
        raise P.bad("layer", f"layer {body.layer} is out of range; this model has layers 0..{cfg.n_layers - 1}.")
    n_layers = 1 if body.layer is not None else cfg.n_layers
    cells = n_layers * cfg.n_heads * len(body.ids) ** 2
    if cells > MAX_ATTENTION_CELLS:
        raise P.bad(
            "layer" if body.layer is None else "ids",
            f"{len(body.ids)} tokens x {n_layers} layers x {cfg.n_heads} heads is {cells:,} weights, over this "
            f"endpoint's {MAX_ATTENTION_CELLS:,}; ask for one layer (layer: N) or fewer tokens.",
        )
    out = await on_engine(server, served, lambda: attention_weights(served.lm, body.ids, body.layer))
    out["pieces"] = pieces_of(served.tokenizer, body.ids, ())
    return await json_response(out)


@router.post("/lab/intervene", tags=["lab"])
async def lab_intervene(body: InterveneRequest, request: Request):
    """Baseline and intervened generation with the same seed, their token diff, KL and delta-logit per
    generated position (intervened vs baseline on the baseline's tokens), and both lens columns."""
    server = server_of(request)
    served = server.model_for(body.model)
    if not 1 <= body.max_tokens <= MAX_INTERVENE_TOKENS:
        raise P.bad("max_tokens", f"max_tokens must be between 1 and {MAX_INTERVENE_TOKENS}, got {body.max_tokens}.")
    check_ids(served, body.ids)
    P.check_length(len(body.ids), body.max_tokens, served.context, "ids")
    check_k(body.k)
    check_interventions(served.lm.config, body)
    params = sampling_params(body.sampling, body.seed)
    config = body.model_dump(exclude={"ids", "model"})
    if config["steer"] is not None and not texts_recorded(server):
        config["steer"].update(positive=None, negative=None)
    inputs = {"prompt_ids": list(body.ids), "prompt": served.tokenizer.decode(body.ids)}
    opened = await asyncio.to_thread(
        _record, server, "inspect intervene", served, config=config, seed=body.seed, inputs=inputs
    )
    try:
        out = await on_engine(server, served, lambda: intervene(served.lm, body, params))
    except BaseException as e:
        if opened is not None:
            await asyncio.to_thread(_close, opened[0], "failed", str(e))
        raise
    out["run_id"] = None
    if opened is not None:
        cm, run = opened
        kept = ("baseline", "intervened") if texts_recorded(server) else ()
        run.outputs = {k: out[k] for k in (*kept, "first_diff", "per_position", "interventions")}
        run.add_metrics(max_kl=max((p["kl"] for p in out["per_position"]), default=0.0), first_diff=out["first_diff"])
        run.timings = out["timing"]
        await asyncio.to_thread(_close, cm, "complete")
        out["run_id"] = run.id
    return out


@router.get("/lab/runs", tags=["lab"])
async def lab_runs(
    request: Request, kind: str | None = None, model: str | None = None, q: str | None = None, limit: int = 50
):
    """The run history, newest first: kind is the run's command (generate, bench, inspect intervene...)."""
    if not 1 <= limit <= 1000:
        raise P.bad("limit", f"limit must be between 1 and 1000, got {limit}.")
    store = store_of(server_of(request))
    runs = await asyncio.to_thread(store.list, limit, kind or None, model or None, q or None)
    from lmlab.runs import status_label

    return {
        "runs": [
            {
                "id": r["id"],
                "kind": r["command"],
                "model": r["model"],
                "created": r["created"],
                "summary": run_summary(r),
                "status": status_label(r),
                "playground": (r.get("config") or {}).get("client") == "playground"
                if isinstance(r.get("config"), dict)
                else False,
            }
            for r in runs
        ]
    }


async def _get_run(request: Request, run_id: str) -> dict:
    store = store_of(server_of(request))
    try:
        return await asyncio.to_thread(store.get, run_id)
    except LmlabError as e:
        raise P.ApiError(404, str(e), param="id", code="run_not_found") from None


@router.get("/lab/runs/{run_id}", tags=["lab"])
async def lab_run(run_id: str, request: Request):
    """One run as the store holds it: config (the settings), seed, inputs (prompt ids and text),
    outputs (token ids and text), metrics and timings."""
    return await _get_run(request, run_id)


@router.get("/lab/runs/{run_id}/export", tags=["lab"])
async def lab_run_export(run_id: str, request: Request):
    """The run as a JSON file to download."""
    run = await _get_run(request, run_id)
    return JSONResponse(
        json.loads(json.dumps(run, default=str)),
        headers={"Content-Disposition": f'attachment; filename="lmlab-run-{run["id"]}.json"'},
    )


@router.get("/lab/bench", tags=["lab"])
async def lab_bench(request: Request, model: str | None = None, limit: int = 50):
    """Points of the bench runs in the store: decode tokens/s against batch, peak memory (bytes)
    against sequence length (prompt + new tokens); lmlab's own engine only, not the peers."""
    store = store_of(server_of(request))
    runs = await asyncio.to_thread(store.list, limit, "bench", model or None, None)
    tps, mem = [], []
    for r in runs:
        points = (r.get("metrics") or {}).get("points") if isinstance(r.get("metrics"), dict) else None
        for pt in points or []:
            if not isinstance(pt, dict) or pt.get("engine", "lmlab") != "lmlab":
                continue
            name = pt.get("model") or r["model"]
            if pt.get("decode_tok_s") is not None and pt.get("batch") is not None:
                tps.append(
                    {
                        "model": name,
                        "batch": pt["batch"],
                        "tok_s": pt["decode_tok_s"],
                        "run_id": r["id"],
                        "dtype": pt.get("dtype"),
                        "quant": pt.get("quant"),
                    }
                )
            if pt.get("peak_mem_bytes") is not None and pt.get("prompt_len") is not None:
                mem.append(
                    {
                        "model": name,
                        "seq_len": pt["prompt_len"] + (pt.get("new_tokens") or 0),
                        "peak_bytes": pt["peak_mem_bytes"],
                        "batch": pt.get("batch"),
                        "run_id": r["id"],
                    }
                )
    return {"tps_vs_batch": tps, "mem_vs_seq": mem}


@router.get("/lab/stats", tags=["lab"])
async def lab_stats(request: Request):
    """Memory per model (bytes) and the last playground generation's TTFT (ms) and rates (tokens/s)."""
    from lmlab.engine.generate import peak_memory_bytes

    server = server_of(request)
    models = {}
    for name, served in server.models.items():
        lm = served.lm
        models[name] = {
            "weight_bytes": lm.weight_bytes,
            "packed_bytes": int(getattr(lm, "packed_bytes", 0) or 0),
            "engine": served.engine.stats(),
        }
    return {
        "models": models,
        "process_peak_bytes": peak_memory_bytes(torch.device("cpu")),
        "last": lab_state(server)["last"],
    }
