"""`lmlab serve`: an OpenAI-compatible HTTP server for the models given at start.

The names are resolved and the socket bound first, so a bad name or a port in use is one
sentence before anything starts. Then uvicorn serves the app while the models load in a thread
(``/health`` answers 503 until they are ready) and the URL is printed on stderr. The session is
one run in the store; its requests are rows of it, written in batches.

Ctrl-C or SIGTERM drains: the server stops listening, running requests (streams too) finish with
their finish_reason, the request rows are written and the run is closed; then the process exits 0.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys

import typer

from lmlab.cli.common import quant_opt
from lmlab.errors import LmlabError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16")


def say(text: str) -> None:
    """One line on stderr, at once (a supervising process reads it, e.g. for the URL)."""
    sys.stderr.write(f"lmlab serve: {text}\n")
    sys.stderr.flush()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port)."""
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:
        raise LmlabError(
            f"cannot resolve --host {host} ({e.strerror or e}); pass an address such as 127.0.0.1."
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise LmlabError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port, or stop what is using it."
        ) from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}"


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line as recorded: the API key replaced by '***'."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


@contextlib.contextmanager
def signals_taken():
    """uvicorn handles SIGINT/SIGTERM while it runs (it drains), then raises the signal again once it has
    shut down; by then the requests are recorded and the run is closed, so that repeat is taken as done."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    model: list[str] = typer.Option(
        None,
        "-m",
        "--model",
        help=f"Model to serve (repeatable); requests name it in 'model'. Default {DEFAULT_MODEL}.",
    ),
    dtype: str = typer.Option("float32", help="float32 | bfloat16"),
    quant: str = quant_opt(),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback should have --api-key."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port; the URL printed says which)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together; more wait in the queue."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait; beyond them: 429."),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="LMLAB_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every request (also $LMLAB_API_KEY).",
    ),
    adapter: str = typer.Option(
        None, "--adapter", help="A LoRA adapter folder applied, unmerged, to the one -m served (lmlab's or PEFT's)."
    ),
    no_log_text: bool = typer.Option(False, "--no-log-text", help="Record requests without their prompts and outputs."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this session in the run store."),
):
    """Serve models over OpenAI's HTTP API (completions, chat, streaming), batching concurrent requests."""
    names = list(model or [DEFAULT_MODEL])
    if len(set(names)) != len(names):
        raise LmlabError(f"a model is named twice in {names}; give each -m once.")
    if dtype not in DTYPES:
        raise LmlabError(f"--dtype must be float32 or bfloat16, got {dtype!r}.")
    if max_batch < 1:
        raise LmlabError(f"--max-batch must be at least 1, got {max_batch}.")
    if max_queue < 0:
        raise LmlabError(f"--max-queue must be 0 or more, got {max_queue}.")
    if not 0 <= port <= 65535:
        raise LmlabError(f"--port must be between 0 and 65535, got {port}.")
    if api_key is not None and not api_key.strip():
        raise LmlabError("--api-key is empty; pass a key, or leave the option out.")
    adapter_path = None
    if adapter is not None:
        if len(names) != 1:
            raise LmlabError(
                f"--adapter applies to one model but {len(names)} are served; serve its base alone with one -m."
            )
        from lmlab.finetune.adapter import check_adapter_folder

        adapter_path = str(check_adapter_folder(adapter))

    import uvicorn

    import lmlab
    from lmlab.loading.resolve import resolve
    from lmlab.runs import RunStore, StoreUnavailable, record_run
    from lmlab.serve import create_app
    from lmlab.serve.app import DRAIN_TIMEOUT_S
    from lmlab.serve.recording import RequestLog

    resolved = {name: resolve(name) for name in names}  # an unknown name fails here, before anything starts
    if not is_loopback(host) and not api_key:
        say(
            f"warning: --host {host} can be reached from other machines and there is no --api-key, so anyone who "
            "reaches it can use this server; add --api-key KEY (clients send 'Authorization: Bearer KEY')."
        )
    sock = bind(host, port)
    url = url_of(sock, host)

    store = None
    if not no_record:
        try:
            store = RunStore()
        except StoreUnavailable:
            store = None  # record_run says where the run goes instead
    first_path = next(iter(resolved.values())).path
    config = dict(
        models=names,
        dtype=dtype,
        quant=quant,
        device=device,
        host=host,
        port=sock.getsockname()[1],
        max_batch=max_batch,
        max_queue=max_queue,
        api_key=bool(api_key),
        log_text=not no_log_text,
        adapter=adapter_path,
    )
    loaders = {name: (lambda name=name: _load(lmlab, name, dtype, device, adapter_path, quant)) for name in names}
    try:
        with record_run(
            "serve",
            model=",".join(names),
            model_path=first_path,
            config=config,
            inputs={"models": names, "url": url},
            record=not no_record,
            store=store,
            argv=redacted_argv(sys.argv),
        ) as run:
            log = RequestLog(run, store, log_text=not no_log_text) if not no_record else None
            server = _run_server(
                uvicorn,
                create_app,
                loaders,
                log,
                url,
                names,
                sock,
                max_batch=max_batch,
                max_queue=max_queue,
                api_key=api_key,
                drain_timeout=DRAIN_TIMEOUT_S,
            )
            if server.load_error is not None:
                raise server.load_error
            served = log.totals["requests"] if log is not None else None
            where = f"; recorded as run {run.id} (lmlab runs show {run.id})" if run.id else ""
            say(f"stopped{f' after {served} requests' if served is not None else ''}{where}.")
    finally:
        if store is not None:
            store.close()
    if server.loading():
        # stopped while a model was still loading: that thread is inside torch, and Python's exit
        # would tear the runtime down under it ("terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _load(lmlab, name: str, dtype: str, device: str, adapter: str | None = None, quant: str | None = None):
    knobs = [dtype] + ([f"quant {quant}"] if quant else []) + [device] + ([f"adapter {adapter}"] if adapter else [])
    say(f"loading {name} ({', '.join(knobs)}) ...")
    return lmlab.load(name, dtype=dtype, device=device, adapter=adapter, quant=quant)


def _run_server(uvicorn, create_app, loaders, log, url, names, sock, *, max_batch, max_queue, api_key, drain_timeout):
    """Run uvicorn on ``sock`` until a signal (or a failed load) stops it; returns the app's Server."""

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.begin_drain()
            running = state.in_flight()
            if state.status != "failed":
                what = (
                    f"{running} running request{'s' if running != 1 else ''} finish first"
                    if running
                    else "no request is running"
                )
                say(f"stopping: {what} (Ctrl-C again stops at once).")
            await super().shutdown(sockets=sockets)

    def ready():
        if not uv.started:  # the models loaded before uvicorn finished starting: say it once it has
            return loop_call_later(0.05, ready)
        say(
            f"{', '.join(names)} ready at {url}/v1 "
            f"(OpenAI-compatible; the playground at {url}/; /health, /metrics; Ctrl-C stops)"
        )

    def failed(error: BaseException):
        uv.should_exit = True

    def loop_call_later(delay, fn):
        asyncio.get_running_loop().call_later(delay, fn)

    app = create_app(
        loaders,
        max_batch=max_batch,
        max_queue=max_queue,
        api_key=api_key,
        log=log,
        on_ready=ready,
        on_load_error=failed,
    )
    state = app.state.server
    uv = Uvicorn(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=int(drain_timeout)
        )
    )
    logging.getLogger("uvicorn.error").addFilter(_no_cancelled_tracebacks)
    if log is not None:
        log.start()
    try:
        with signals_taken():
            uv.run(sockets=[sock])
    finally:
        if log is not None:
            log.close()
        sock.close()
    if uv.force_exit:  # a second Ctrl-C: what was running was cut off, so the run is 'interrupted'
        raise KeyboardInterrupt
    return state


def _no_cancelled_tracebacks(record: logging.LogRecord) -> bool:
    """A second Ctrl-C stops at once, cancelling what runs: uvicorn would log that as a traceback."""
    cancelled = record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError)
    return not (cancelled or str(record.msg).rstrip().endswith("CancelledError"))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
