"""The server: OpenAI's completions and chat endpoints on lmlab's continuous-batching engine.

    app = create_app({"smollm2-135m": lambda: lmlab.load("smollm2-135m")}, max_batch=8)
    uvicorn.run(app)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed with
``"stream": true``), ``GET /v1/models``, vLLM's ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` (lm-eval's remote tokenizer reads them), ``GET /health`` (503 while the
models load, 200 after) and ``GET /metrics`` (Prometheus text). The playground: its page at ``/``
and lmlab's own JSON endpoints under ``/lab`` (serve/lab.py); a completion with
``"return_token_ids": true`` carries ``"lmlab": {"tokens": [...]}`` per choice, and one sent with
the header ``X-Lmlab-Client: playground`` is recorded as its own ``generate`` run.

How a request flows: the handler checks the body and tokenizes the prompt on the event loop,
then submits one ``BatchRequest`` per choice (prompt × n) to the model's ``BatchEngine``. The
engine's worker thread calls back with each event; the callback hands it to the event loop
(``call_soon_threadsafe``), so the loop never waits on the model. A client that goes away
cancels its sequences, which leave the batch at the next step.

Errors are OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``, with the field
named in ``param``: 400 for a bad value (FastAPI's validation errors too), 401 without the
``--api-key``, 404 for a model this server does not serve, 413 for a body over
``max_body_bytes``, 429 with Retry-After when the queue is full, 503 while loading or draining.
Requests only pick among the models given at start; nothing a request says is opened as a file.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.engine.batch import BatchEngine, BatchRequest, PromptLogprobs, QueueFull, RequestEnd
from lmlab.engine.generate import TokenEvent
from lmlab.errors import LmlabError
from lmlab.serve import lab
from lmlab.serve import protocol as P
from lmlab.serve.metrics import ServerMetrics

MAX_BODY_BYTES = 8 * 2**20  # larger request bodies get 413
DRAIN_BODY_BYTES = 64 * 2**20  # an oversized body is read (and dropped) up to this, so the client sees the 413
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key
DRAIN_TIMEOUT_S = 60.0  # at shutdown, how long running sequences get to finish (s)
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ServedModel:
    name: str
    lm: Any
    engine: BatchEngine
    created: int = field(default_factory=P.now)

    @property
    def context(self) -> int:
        return self.lm.config.max_seq_len

    @property
    def tokenizer(self):
        return self.lm.tokenizer


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Record:
    """What is recorded about one generation request (a row of the run's serve_requests)."""

    endpoint: str
    stream: bool = False
    model: str | None = None
    request_id: str | None = None
    created: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    params: dict | None = None  # the fields the client set, but the prompt or messages
    prompt: Any = None  # the prompt or messages as sent
    prompt_tokens: int = 0  # each prompt counted once (not per choice), as usage counts it
    lab: Any = None  # a lab.GenerateRun: the playground's request, recorded as its own run


# ------------------------------------------------------------------------------------ the engine side


@dataclass
class Choice:
    """What came back so far for one sequence of a request."""

    prompt: PromptLogprobs | None = None
    tokens: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    end: RequestEnd | None = None
    t_last: float | None = None  # when its last token arrived (perf_counter s)


class Job:
    """One HTTP request's sequences in the engine, and their events on the way to the event loop."""

    def __init__(self, server: "Server", served: ServedModel, n_sequences: int, t0: float):
        self.server, self.served, self.t0 = server, served, t0
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice() for _ in range(n_sequences)]
        self.handles: list = []
        self.open = n_sequences  # sequences whose RequestEnd has not arrived

    def _callback(self, index: int) -> Callable:
        def on_event(event) -> None:  # runs in the engine's worker thread
            t = time.perf_counter()
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, t, event))
            except RuntimeError:  # the event loop is closed: nobody is waiting for this any more
                pass

        return on_event

    def submit(self, requests: list[BatchRequest]) -> None:
        for i, request in enumerate(requests):
            try:
                self.handles.append(self.served.engine.submit(request, on_event=self._callback(i)))
            except QueueFull:
                self.cancel()
                raise P.ApiError(
                    429,
                    "the server is busy: its batch and its queue are full; retry after a second.",
                    code="queue_full",
                    type="rate_limit_error",
                    headers={"Retry-After": "1"},
                ) from None
            except LmlabError as e:
                self.cancel()
                if self.server.status != "ready":
                    raise self.server.not_ready() from None
                raise P.ApiError(400, str(e), param="prompt") from None

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def next(self) -> tuple[int, Any]:
        """The next event of any sequence, after noting it in its Choice and in the metrics."""
        index, t, event = await self.events.get()
        choice, metrics, model = self.choices[index], self.server.metrics, self.served.name
        if isinstance(event, PromptLogprobs):
            choice.prompt = event
        elif isinstance(event, TokenEvent):
            if choice.t_last is None:
                metrics.first_token(model, t - self.t0)
            else:
                metrics.next_token(model, t - choice.t_last)
            choice.t_last = t
            choice.tokens.append(event)
            choice.text += event.text
        elif isinstance(event, RequestEnd):
            choice.end = event
            self.open -= 1
            metrics.tokens(model, event.prompt_tokens, event.completion_tokens)
        return index, event

    async def wait(self, request: Request) -> None:
        """Gather every event; raise ClientGone (after cancelling) if the client disconnects."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while self.open:
                event = asyncio.ensure_future(self.next())
                await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client left first
                    event.cancel()
                    self.cancel()
                    raise ClientGone()
        finally:
            gone.cancel()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the RequestEnd of every sequence, e.g. after a cancel."""
        deadline = time.perf_counter() + timeout
        while self.open and time.perf_counter() < deadline:
            try:
                await asyncio.wait_for(self.next(), max(0.01, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                break

    def errors(self) -> list[str]:
        return [c.end.error or "the engine failed" for c in self.choices if c.end and c.end.finish_reason == "error"]

    def timings(self) -> dict:
        ends = [c.end for c in self.choices if c.end is not None]
        firsts = [e.timings.get("ttft_ms") for e in ends if e.timings.get("ttft_ms") is not None]
        out = {"total_ms": round((time.perf_counter() - self.t0) * 1e3, 3)}
        if firsts:
            out["ttft_ms"] = round(min(firsts), 3)
        out["engine"] = [e.timings for e in ends]
        return out


# ------------------------------------------------------------------------------------ the server


class Server:
    """The models, their engines, the metrics and the request log behind one app."""

    def __init__(
        self,
        models: dict,
        *,
        max_batch: int,
        max_queue: int,
        log=None,
        on_ready: Callable[[], None] | None = None,
        on_load_error: Callable[[BaseException], None] | None = None,
    ):
        if not models:
            raise LmlabError("serve needs at least one model; pass -m MODEL.")
        self.sources = dict(models)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.log = log
        self.on_ready, self.on_load_error = on_ready, on_load_error
        self.models: dict[str, ServedModel] = {}
        self.status = "loading"  # -> "ready" -> "draining"; or "failed"
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics()
        self._finishing: set[asyncio.Task] = set()  # records waiting for cancelled sequences to end
        self._loader: threading.Thread | None = None

    # -- life

    def start(self) -> None:
        """Load the models in a thread (so /health answers 503 meanwhile) and start their engines."""
        loop = asyncio.get_running_loop()
        # No torch work on this thread (the event loop's): OpenMP keeps a thread team per thread
        # that ever ran a parallel region, and once its runtime manages more threads than there
        # are cores it stops spinning between regions, which made the engine's decoding ~22%
        # slower (SmolLM2 fp32, 2 cores: 37.7 against 48.5 tok/s). The loader's team goes when
        # the loader thread ends, so the engine thread's team is then the only one.
        self._loader = threading.Thread(target=self._load, args=(loop,), name="lmlab-serve-load", daemon=True)
        self._loader.start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        served = {}
        try:
            for name, source in self.sources.items():
                if self.status != "loading":
                    return  # shut down while loading
                lm = source if hasattr(source, "tokenizer") else source()
                if lm.tokenizer is None:
                    raise LmlabError(f"{name} has no tokenizer; serve a model that comes with one.")
                engine = BatchEngine(lm, max_batch=self.max_batch, max_queue=self.max_queue)
                engine.start()
                served[name] = ServedModel(name, lm, engine)
        except BaseException as e:  # noqa: BLE001  (told to the CLI, which stops the server)
            for s in served.values():
                s.engine.stop(drain=False, timeout=5)
            _call_soon(loop, self._failed, e)
            return
        _call_soon(loop, self._loaded, served)

    def _loaded(self, served: dict) -> None:
        self.models = served
        if self.status != "loading":  # shut down while loading
            for s in served.values():
                s.engine.stop(drain=False, timeout=5)
            return
        self.status = "ready"
        if self.on_ready is not None:
            self.on_ready()

    def _failed(self, error: BaseException) -> None:
        self.status, self.load_error = "failed", error
        if self.on_load_error is not None:
            self.on_load_error(error)

    def loading(self) -> bool:
        """Whether the loader thread is still at work (the server stopped before its models were in)."""
        return self._loader is not None and self._loader.is_alive()

    def begin_drain(self) -> None:
        """Take no new requests (503); the running ones go on."""
        if self.status in ("ready", "loading"):
            self.status = "draining"

    async def stop(self) -> None:
        """Let every engine finish what it runs, then wait for the records of cancelled requests."""
        self.begin_drain()
        for s in self.models.values():
            await asyncio.to_thread(s.engine.stop, True, DRAIN_TIMEOUT_S)
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=10)

    def in_flight(self) -> int:
        """Sequences decoding or waiting, over every model."""
        stats = [s.engine.stats() for s in self.models.values()]
        return sum(st["active"] + st["queued"] for st in stats)

    # -- requests

    def not_ready(self) -> P.ApiError:
        if self.status == "loading":
            return P.ApiError(
                503,
                "the server is still loading its models; retry in a few seconds.",
                code="loading",
                headers={"Retry-After": "2"},
            )
        if self.status == "failed":
            return P.ApiError(503, f"the server could not load its models ({self.load_error}).", code="load_failed")
        return P.ApiError(503, "the server is shutting down and takes no new requests.", code="shutting_down")

    def model_for(self, name: str | None) -> ServedModel:
        if self.status != "ready":
            raise self.not_ready()
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise P.bad("model", f"model is required; this server serves: {', '.join(self.models)}.")
        served = self.models.get(name)
        if served is None:
            raise P.ApiError(
                404,
                f"model {name!r} is not served here; this server serves: {', '.join(self.models)}.",
                param="model",
                code="model_not_found",
            )
        return served

    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    def finish(
        self, rec: Record, status: int, job: Job | None = None, outputs: list | None = None, error: str | None = None
    ) -> None:
        """Count the request in the metrics and queue its row for the run store."""
        self.metrics.request_done(rec.model, rec.endpoint, status, time.perf_counter() - rec.t0)
        if rec.lab is not None:
            rec.lab.finish(status, job, error)
        if self.log is None:
            return
        ends = [c.end for c in job.choices] if job is not None else []
        self.log.add(
            {
                "request_id": rec.request_id,
                "created": rec.created,
                "endpoint": rec.endpoint,
                "model": rec.model,
                "status": status,
                "stream": rec.stream,
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": sum(e.completion_tokens for e in ends if e),
                "finish_reasons": [e.finish_reason if e else None for e in ends] or None,
                "params": rec.params,
                "timings": job.timings() if job is not None else None,
                "prompt": rec.prompt,
                "output": outputs,
                "error": error,
            }
        )

    def finish_later(self, rec: Record, job: Job) -> None:
        """Record a request whose client left, once its cancelled sequences have ended."""

        async def wait_then_record():
            await job.drain(timeout=DRAIN_TIMEOUT_S)
            self.finish(rec, 499, job, [c.text for c in job.choices], error="the client disconnected")

        task = asyncio.get_running_loop().create_task(wait_then_record())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def error_response(self, e: P.ApiError, rec: Record | None = None) -> JSONResponse:
        if rec is not None:
            self.finish(rec, e.status, error=e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn(*args) on the event loop, from another thread; nothing if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


# ------------------------------------------------------------------------------------ the endpoints


def _prompts(prompt, tokenizer, vocab_size: int) -> list[tuple[str, list[int]]]:
    """(echo text, token ids) per prompt of a completions request."""
    if prompt is None:
        raise P.bad(
            "prompt", "prompt is required: a string, a list of strings, a list of token ids or a list of those."
        )
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise P.bad("prompt", "prompt is an empty list; send at least one prompt.")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item, add_special=True)
            text = item
        else:
            P.check_token_ids(item, vocab_size, "prompt")
            ids, text = list(item), tokenizer.decode(item)
        if not ids:
            raise P.bad("prompt", "the prompt is empty; send at least one token of text.")
        out.append((text, ids))
    return out


def _completion_infos(choice: Choice, tokens: list[TokenEvent], with_prompt: bool) -> list[P.TokenInfo]:
    infos = []
    if with_prompt and choice.prompt is not None:
        pl = choice.prompt
        infos += [
            P.TokenInfo(t, lp, None if i == 0 else pl.top[i])
            for i, (t, lp) in enumerate(zip(pl.token_ids, pl.logprobs))
        ]
    for ev in tokens:
        infos.append(P.TokenInfo(ev.id, ev.logprob, [(a, P.log_of(p)) for a, _piece, p in ev.alternatives]))
    return infos


def _params(body, exclude: set[str]) -> dict:
    return {k: v for k, v in body.model_dump(exclude_unset=True).items() if k not in exclude}


def create_app(
    models: dict,
    *,
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log=None,
    on_ready: Callable[[], None] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``models``: name -> an ``lmlab.LM``, or a function that loads one.

    Loading starts with the app (in a thread) and ``on_ready()`` is called on the event loop
    when every model is served; ``on_load_error(exc)`` if one fails. ``log``: a
    ``serve.recording.RequestLog`` that records each generation request. ``app.state.server``
    is the ``Server`` (its ``begin_drain()`` turns new requests away before a shutdown).
    """
    server = Server(
        models, max_batch=max_batch, max_queue=max_queue, log=log, on_ready=on_ready, on_load_error=on_load_error
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        await server.stop()

    app = FastAPI(
        title="lmlab serve", description="OpenAI-compatible API on lmlab's batching engine.", lifespan=lifespan
    )
    app.state.server = server
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=server.metrics)
    app.include_router(lab.router)

    # -- errors, always OpenAI's JSON

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        err = errors[0] if errors else {}
        param = _param_of(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", "parse error")
            e = P.ApiError(400, f"the request body is not valid JSON ({reason}).")
        elif err.get("type") == "missing" and param is None:
            e = P.ApiError(400, "the request has no JSON body; send one with Content-Type: application/json.")
        elif len({_param_of(x.get("loc", ())) for x in errors}) == 1 and len(errors) > 1:  # no member of a union fit
            e = P.ApiError(400, f"{param} has the wrong type; see the API reference for what it takes.", param=param)
        else:
            e = P.ApiError(400, f"{param}: {err.get('msg', 'invalid value')}.", param=param)
        path = request.url.path
        return server.error_response(e, Record(path) if path in GENERATION_ENDPOINTS else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {
            404: f"there is no endpoint {request.url.path}; see /docs for the ones this server has.",
            405: f"{request.method} is not allowed on {request.url.path}.",
        }.get(exc.status_code, str(exc.detail))
        return JSONResponse(
            P.error_body(message, "invalid_request_error", None, exc.status_code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, exc: P.ApiError):  # raised by the /lab endpoints
        return server.error_response(exc)

    @app.exception_handler(LmlabError)
    async def lmlab_error(request: Request, exc: LmlabError):
        return JSONResponse(P.error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        sys.stderr.write(f"lmlab serve: {request.url.path} failed: {type(exc).__name__}: {exc}\n")
        return JSONResponse(
            P.error_body(f"the server failed: {type(exc).__name__}: {exc}", "server_error"), status_code=500
        )

    # -- health, models, metrics

    @app.get("/health")
    async def health():
        if server.status == "ready":
            return {"status": "ok", "models": list(server.models)}
        return JSONResponse({"status": server.status}, status_code=503)

    @app.get("/v1/models")
    async def list_models():
        if server.status != "ready":
            return server.error_response(server.not_ready())
        return {"object": "list", "data": [_model_card(s) for s in server.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        try:
            return _model_card(server.model_for(name))
        except P.ApiError as e:
            return server.error_response(e)

    @app.get("/metrics")
    async def metrics():
        text = server.metrics.render({name: s.engine for name, s in server.models.items()})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- vLLM's tokenizer endpoints

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        try:
            served = server.model_for(body.model)
            tok = served.tokenizer
            if body.messages is not None:
                text = tok.apply_chat_template(
                    P.chat_messages(body.messages), add_generation_prompt=body.add_generation_prompt
                )
                add_special = bool(body.add_special_tokens)  # the template wrote the special tokens
            elif body.prompt is not None:
                text = body.prompt
                add_special = True if body.add_special_tokens is None else body.add_special_tokens
            else:
                raise P.bad("prompt", "send a prompt (text) or messages to tokenize.")
            ids = tok.encode(text, add_special=add_special)
        except P.ApiError as e:
            return server.error_response(e)
        return {
            "count": len(ids),
            "max_model_len": served.context,
            "tokens": ids,
            "token_strs": [tok.id_to_token(i) for i in ids] if body.return_token_strs else None,
        }

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        try:
            served = server.model_for(body.model)
            P.check_token_ids(body.tokens, served.tokenizer.vocab_size, "tokens")
        except P.ApiError as e:
            return server.error_response(e)
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        try:
            served = server.model_for(model)
        except P.ApiError as e:
            return server.error_response(e)
        tok = served.tokenizer
        info = {
            "tokenizer_class": f"lmlab.Tokenizer[{tok.kind}]",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": tok.add_bos,
            "add_eos_token": tok.add_eos,
            "model_max_length": served.context,
            "vocab_size": tok.vocab_size,
        }
        if tok.chat_template:
            info["chat_template"] = tok.chat_template
        return info

    # -- completions

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        rec = Record(
            "/v1/completions",
            stream=bool(body.stream),
            model=body.model,
            request_id=P.new_id("cmpl"),
            params=_params(body, {"prompt"}),
            prompt=body.prompt,
        )
        try:
            served = server.model_for(body.model)
            rec.model = served.name
            P.check_knobs(body, body.max_tokens, body.logprobs, "logprobs")
            prompts = _prompts(body.prompt, served.tokenizer, served.lm.config.vocab_size)
            rec.prompt_tokens = sum(len(ids) for _, ids in prompts)
            n = body.n or 1
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            if max_tokens == 0 and not body.echo:
                raise P.bad(
                    "max_tokens", "max_tokens must be >= 1 unless echo is true (then 0 scores the prompt only)."
                )
            for _, ids in prompts:
                P.check_length(len(ids), max_tokens, served.context, "prompt")
            _check_capacity(server, len(prompts) * n)
            params = [P.sampling_params(body, i) for i in range(n)]
            k = body.logprobs
            requests = [
                BatchRequest(
                    prompt_ids=ids,
                    max_new_tokens=max_tokens,
                    params=params[i],
                    stop=P.stop_strings(body.stop),
                    top_logprobs=k or 0,
                    prompt_logprobs=k if body.echo and k is not None else None,
                    ignore_eos=bool(body.ignore_eos),
                    sampled_top=(k or lab.DEFAULT_TOP) if body.return_token_ids else 0,
                )
                for _, ids in prompts
                for i in range(n)
            ]
            job = Job(server, served, len(requests), rec.t0)
            job.submit(requests)
            if request.headers.get("x-lmlab-client", "").lower() == "playground" and server.log is not None:
                rec.lab = lab.GenerateRun(server, served, body, prompts)
        except P.ApiError as e:
            return server.error_response(e, rec)
        echo = [prompts[i // n][0] if body.echo else "" for i in range(len(requests))]
        if body.stream:
            return StreamingResponse(
                _stream_completion(server, served, job, rec, body, echo, rec.prompt_tokens),
                media_type="text/event-stream",
            )
        try:
            await job.wait(request)
        except ClientGone:
            server.finish_later(rec, job)
            return JSONResponse(P.error_body("client disconnected", "invalid_request_error"), status_code=499)
        if job.errors():
            return server.error_response(P.ApiError(500, f"generation failed: {job.errors()[0]}"), rec)
        run_id = await rec.lab.ready() if rec.lab is not None else None
        choices = []
        for i, c in enumerate(job.choices):
            logprobs = None
            if k is not None:
                logprobs = P.completion_logprobs(_completion_infos(c, c.tokens, bool(body.echo)), served.tokenizer)
            choices.append(
                {
                    "index": i,
                    "text": echo[i] + c.text,
                    "logprobs": logprobs,
                    "finish_reason": P.finish_reason(c.end.finish_reason),
                }
            )
            if body.return_token_ids:
                choices[-1]["lmlab"] = {"tokens": lab.token_entries(c.tokens, served.tokenizer)}
                if run_id is not None:
                    choices[-1]["lmlab"]["run_id"] = run_id
        completion_tokens = sum(c.end.completion_tokens for c in job.choices)
        server.finish(rec, 200, job, [c["text"] for c in choices])
        return {
            "id": rec.request_id,
            "object": "text_completion",
            "created": P.now(),
            "model": served.name,
            "choices": choices,
            "usage": P.usage(rec.prompt_tokens, completion_tokens),
        }

    # -- chat

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatRequest, request: Request):
        rec = Record(
            "/v1/chat/completions",
            stream=bool(body.stream),
            model=body.model,
            request_id=P.new_id("chatcmpl"),
            params=_params(body, {"messages"}),
        )
        try:
            served = server.model_for(body.model)
            rec.model = served.name
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            k = body.top_logprobs
            if k is not None and not body.logprobs and k > 0:
                raise P.bad("top_logprobs", "top_logprobs needs logprobs: true.")
            P.check_knobs(body, max_tokens, k, "top_logprobs")
            messages = P.chat_messages(body.messages)
            rec.prompt = messages
            try:
                text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except LmlabError as e:
                raise P.bad("messages", str(e)) from None
            ids = served.tokenizer.encode(text, add_special=False)  # the template wrote BOS and the rest
            rec.prompt_tokens = len(ids)
            if max_tokens is None:
                max_tokens = max(0, served.context - len(ids))
            if max_tokens == 0:
                raise P.bad("max_tokens", "max_tokens must be >= 1 for a chat completion.")
            P.check_length(len(ids), max_tokens, served.context, "messages")
            n = body.n or 1
            _check_capacity(server, n)
            requests = [
                BatchRequest(
                    prompt_ids=ids,
                    max_new_tokens=max_tokens,
                    params=P.sampling_params(body, i),
                    stop=P.stop_strings(body.stop),
                    top_logprobs=(k or 0) if body.logprobs else 0,
                    ignore_eos=bool(body.ignore_eos),
                )
                for i in range(n)
            ]
            job = Job(server, served, n, rec.t0)
            job.submit(requests)
        except P.ApiError as e:
            return server.error_response(e, rec)
        if body.stream:
            return StreamingResponse(
                _stream_chat(server, served, job, rec, body, len(ids)), media_type="text/event-stream"
            )
        try:
            await job.wait(request)
        except ClientGone:
            server.finish_later(rec, job)
            return JSONResponse(P.error_body("client disconnected", "invalid_request_error"), status_code=499)
        if job.errors():
            return server.error_response(P.ApiError(500, f"generation failed: {job.errors()[0]}"), rec)
        choices = []
        for i, c in enumerate(job.choices):
            logprobs = None
            if body.logprobs:
                logprobs = P.chat_logprobs(_completion_infos(c, c.tokens, False), served.tokenizer)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": P.finish_reason(c.end.finish_reason),
                }
            )
        completion_tokens = sum(c.end.completion_tokens for c in job.choices)
        server.finish(rec, 200, job, [c.text for c in job.choices])
        return {
            "id": rec.request_id,
            "object": "chat.completion",
            "created": P.now(),
            "model": served.name,
            "choices": choices,
            "usage": P.usage(len(ids), completion_tokens),
        }

    return app


def _check_capacity(server: Server, sequences: int) -> None:
    if sequences > server.capacity():
        raise P.bad(
            "n",
            f"this request asks for {sequences} sequences (prompts x n), more than the server holds at "
            f"once ({server.capacity()}: --max-batch + --max-queue); send fewer prompts or a smaller n.",
        )


def _param_of(loc) -> str | None:
    """The field a validation error's location names: ('body', 'messages', 0, 'content') ->
    'messages[0].content'; the parts pydantic adds for the members of a union ('str',
    'list[int]') are left out."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            break
        else:
            out += f".{part}" if out else part
    return out or None


def _model_card(served: ServedModel) -> dict:
    return {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "lmlab",
        "max_model_len": served.context,
    }


# ------------------------------------------------------------------------------------ streaming


async def _stream_events(server: Server, job: Job, rec: Record, chunks, include_usage: bool, usage_of):
    """The SSE stream of a request: ``chunks(index, event)`` turns each event into chunk dicts.

    Ends with a usage chunk (when asked for) and ``data: [DONE]``. If the client leaves
    (the task is cancelled or the generator closed), its sequences are cancelled and the
    request is recorded once they have ended.
    """
    done = False
    try:
        for chunk in chunks(None, None):  # what goes before any event (echo, the assistant role)
            yield P.sse(chunk)
        while job.open:
            index, event = await job.next()
            if isinstance(event, RequestEnd) and event.finish_reason == "error":
                yield P.sse(P.error_body(f"generation failed: {event.error}", "server_error", None, 500))
                continue
            if isinstance(event, RequestEnd) and rec.lab is not None:
                await rec.lab.ready()  # the last chunk carries the run's id
            for chunk in chunks(index, event):
                yield P.sse(chunk)
        if include_usage:
            yield P.sse(usage_of())
        yield P.SSE_DONE
        done = True
    finally:
        if done:
            status = 500 if job.errors() else 200
            server.finish(rec, status, job, [c.text for c in job.choices], error=(job.errors() or [None])[0])
        else:  # the client went away mid-stream: free its places in the batch
            job.cancel()
            server.finish_later(rec, job)


def _stream_chunk(rec: Record, created: int, served: ServedModel, kind: str, choices: list, usage=None) -> dict:
    """One server-sent event of a stream: ``kind`` is "text_completion" or "chat.completion.chunk"."""
    out = {"id": rec.request_id, "object": kind, "created": created, "model": served.name, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def _usage_chunk(rec: Record, created: int, served: ServedModel, kind: str, job: Job, prompt_tokens: int) -> dict:
    """The last event when the client asked for usage: no choices, the tokens counted."""
    completion = sum(c.end.completion_tokens for c in job.choices if c.end)
    return _stream_chunk(rec, created, served, kind, [], P.usage(prompt_tokens, completion))


def _stream_completion(
    server: Server, served: ServedModel, job: Job, rec: Record, body, echo: list[str], prompt_tokens: int
):
    created, tok, k = P.now(), served.tokenizer, body.logprobs
    offsets = [0] * len(job.choices)
    want_ids = bool(body.return_token_ids)

    def chunk(index: int, text: str, infos=None, reason=None, events=()) -> dict:
        logprobs = None
        if infos is not None:
            logprobs = P.completion_logprobs(infos, tok, offsets[index])
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if want_ids:
            choice["lmlab"] = {"tokens": lab.token_entries(events, tok)}
            if reason is not None and rec.lab is not None and rec.lab.id is not None:
                choice["lmlab"]["run_id"] = rec.lab.id
        return _stream_chunk(rec, created, served, "text_completion", [choice])

    def chunks(index, event):
        if index is None:  # the echoed prompts, unless they wait for their log-probs
            return [chunk(i, echo[i]) for i in range(len(job.choices)) if body.echo and k is None]
        if isinstance(event, PromptLogprobs):
            return [chunk(index, echo[index], _completion_infos(job.choices[index], [], True))]
        if isinstance(event, TokenEvent):
            if k is None:
                return [chunk(index, event.text, events=[event])] if event.text or want_ids else []
            return [chunk(index, event.text, _completion_infos(Choice(), [event], False), events=[event])]
        if isinstance(event, RequestEnd):
            return [chunk(index, "", None, P.finish_reason(event.finish_reason))]
        return []

    def usage_chunk() -> dict:
        return _usage_chunk(rec, created, served, "text_completion", job, prompt_tokens)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _stream_events(server, job, rec, chunks, include_usage, usage_chunk)


def _stream_chat(server: Server, served: ServedModel, job: Job, rec: Record, body, prompt_tokens: int):
    created, tok = P.now(), served.tokenizer

    def chunk(index: int, delta: dict, logprobs=None, reason=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return _stream_chunk(rec, created, served, "chat.completion.chunk", [choice])

    def chunks(index, event):
        if index is None:
            return [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(job.choices))]
        if isinstance(event, TokenEvent):
            if not body.logprobs:
                return [chunk(index, {"content": event.text})] if event.text else []
            infos = _completion_infos(Choice(), [event], False)
            return [chunk(index, {"content": event.text}, P.chat_logprobs(infos, tok))]
        if isinstance(event, RequestEnd):
            return [chunk(index, {}, None, P.finish_reason(event.finish_reason))]
        return []

    def usage_chunk() -> dict:
        return _usage_chunk(rec, created, served, "chat.completion.chunk", job, prompt_tokens)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _stream_events(server, job, rec, chunks, include_usage, usage_chunk)


# ------------------------------------------------------------------------------------ the gate


class Gate:
    """ASGI middleware in front of every endpoint: the API key (401) and the body size limit (413).

    A body over the limit is still read (up to DRAIN_BODY_BYTES) and dropped, so that a client
    that is still sending sees the 413 rather than a reset connection.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        open_path = path in OPEN_PATHS or path == "/" or path.startswith("/static/")  # the page holds no secret
        if self.api_key and not open_path and not self._authorized(scope):
            self.metrics.request_done(None, path, 401)
            return await _send_json(
                send,
                401,
                P.error_body(
                    "this server needs an API key; send the header 'Authorization: Bearer KEY' with the key it was "
                    "started with (--api-key).",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                ),
                {"www-authenticate": "Bearer"},
            )
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            too_big = too_big or size > self.max_body_bytes
            if not too_big:
                chunks.append(body)
            if not message.get("more_body") or size > DRAIN_BODY_BYTES:
                break
        if too_big:
            self.metrics.request_done(None, path, 413)
            limit_mb = self.max_body_bytes / 2**20
            return await _send_json(
                send,
                413,
                P.error_body(
                    f"the request body is larger than this server's limit of {limit_mb:g} MiB; send a smaller request.",
                    "invalid_request_error",
                    None,
                    "request_too_large",
                ),
            )
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


async def _send_json(send, status: int, obj: dict, headers: dict | None = None) -> None:
    body = json.dumps(obj).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
