"""`lmlab bench`: a sweep against the peers and the machine's own limits; `lmlab bench --machine`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from lmlab.cli.common import err, load_model, out, print_json
from lmlab.errors import LmlabError

DEFAULT_MODEL = "smollm2-135m"


def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _num(x, fmt: str | None = None) -> str:
    """A number for the table: '-' when absent; by default 3 significant figures or a thousands separator."""
    if x is None:
        return "-"
    if fmt:
        return fmt.format(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.2g}"


def points_table(points: list[dict], peers: list[str]):
    """The sweep as a table: one row per engine × point, lmlab's ratio against each peer. Where it
    does not fit the console (100 columns), it comes as two tables, speed (with the ratios), then
    latency, memory and roofline, each with the point's columns, so no figure is cut.

    "prefill % FLOP" is prefill FLOP/s as a % of the machine's GEMM peak in that dtype (the
    FLOP/s themselves are in --json as prefill_tflops)."""
    return _PointsTable(points, peers)


class _PointsTable:
    SPEED = ("TTFT\nms", "prefill\ntok/s", "decode\ntok/s", "decode\nmedian")
    MEMORY = ("p50/p95\nms", "peak\nmem", "KV\ncache", "GB/s", "%\nBW", "prefill\n% FLOP")

    def __init__(self, points: list[dict], peers: list[str]):
        self.points, self.peers = points, peers

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        whole = self.table(self.SPEED + self.MEMORY, True, "lmlab bench")
        # measured unclamped: Measurement.get clamps to the width it is given
        if Measurement.get(console, options.update_width(10_000), whole).maximum <= options.max_width:
            yield whole
            return
        yield self.table(self.SPEED, True, "lmlab bench: speed")
        yield self.table(self.MEMORY, False, "lmlab bench: latency, memory and roofline")

    def table(self, measures: tuple[str, ...], with_peers: bool, title: str):
        from rich import box
        from rich.table import Table

        from lmlab.bench.sweep import peer_key

        several_new = len({p["new_tokens"] for p in self.points}) > 1
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        cols = ["engine", "dtype", "batch", "prompt"] + (["new"] if several_new else []) + list(measures)
        cols += [f"×\n{p}" for p in self.peers] if with_peers else []
        for c in cols:
            left = c in ("engine", "dtype")
            t.add_column(c, justify="left" if left else "right", no_wrap=True)
        for p in self.points:
            row = [
                p["engine"],
                p["dtype"] + ("" if p.get("quant") in (None, "none") else f" {p['quant']}"),
                str(p["batch"]),
                str(p["prompt_len"]),
            ] + ([str(p["new_tokens"])] if several_new else [])
            cells = {
                "TTFT\nms": _num(p["ttft_ms"]),
                "prefill\ntok/s": _num(p["prefill_tok_s"]),
                "decode\ntok/s": _num(p["decode_tok_s"]),
                "decode\nmedian": _num(p["decode_tok_s_median"]),
                "p50/p95\nms": f"{_num(p['p50_ms'])}/{_num(p['p95_ms'])}",
                "peak\nmem": _mb(p["peak_mem_bytes"]),
                "KV\ncache": _mb(p["kv_cache_bytes"]),
                "GB/s": _num(p["bandwidth_gb_s"]),
                "%\nBW": _num(p["bandwidth_pct"], "{:.0f}%"),
                "prefill\n% FLOP": _num(p["flops_pct"], "{:.1f}%"),
            }
            row += [cells[m] for m in measures]
            if with_peers:
                for peer in self.peers:
                    r = p.get(f"ratio_vs_{peer_key(peer)}")
                    row.append("" if p["engine"] != "lmlab" else _num(r, "{:.2f}×"))
            t.add_row(*row, style=None if p["engine"] == "lmlab" else "dim")
        return t


def machine_table(entry: dict):
    from rich.table import Table

    h = entry["host"]
    t = Table(title="this machine", title_justify="left", show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row(
        "cpu",
        f"{h['cpu']} ({h['physical_cores']} cores, {h['logical_cpus']} logical; "
        f"{', '.join(h.get('cpu_flags') or []) or '-'})",
    )
    t.add_row("device", str(h["device"]))
    t.add_row("threads", str(entry["threads"]))
    t.add_row("memory", _mb(h.get("ram_bytes")))
    t.add_row("torch", h["torch"])
    t.add_row(
        "bandwidth (fp32 mat-vec, fastest kernel)",
        f"{entry['bandwidth_gb_s']:.1f} GB/s over {entry['bandwidth_test_bytes'] / 2**30:.0f} GiB",
    )
    t.add_row("  BLAS torch.mv", f"{entry['matvec_gb_s']:.1f} GB/s")
    if entry.get("onednn_matvec_gb_s"):
        t.add_row("  oneDNN, prepacked", f"{entry['onednn_matvec_gb_s']:.1f} GB/s")
    if entry.get("native_matvec_gb_s"):
        t.add_row("  lmlab native kernel", f"{entry['native_matvec_gb_s']:.1f} GB/s")
    t.add_row("copy (read + write)", f"{entry['copy_gb_s']:.1f} GB/s")
    t.add_row("read (sum)", f"{entry['read_gb_s']:.1f} GB/s")
    for name, g in entry["matmul_gflops"].items():
        t.add_row(f"matmul peak {name}", "-" if g is None else f"{g:,.0f} GFLOP/s")
    t.add_row("measured", entry["measured_at"])
    if h["device"] == "cpu":
        from lmlab import native

        t.add_row(
            "decoding step",
            "native (lmlab.native): " + native.status()
            if native.available()
            else "PyTorch (model.py): native code " + native.status(),
        )
    return t


def bench(
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="Model name or path."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, comma-separated (e.g. 1,4,16)."),
    prompt_len: str = typer.Option("64", "--prompt-len", help="Prompt lengths in tokens, comma-separated."),
    new_tokens: str = typer.Option("128", "--new-tokens", help="Tokens to generate per sequence, comma-separated."),
    dtype: str = typer.Option("float32", "--dtype", help="Dtypes, comma-separated: float32,bfloat16,float16."),
    quant: str = typer.Option(
        "none",
        "--quant",
        help="Weight quantizations, comma-separated: none (the --dtype rows), native (a GGUF file's blocks), q8, q4.",
    ),
    peer: list[str] = typer.Option(
        None,
        "--peer",
        help="Also time a peer on the same weights: hf, llama.cpp (repeatable); with --serve: llamacpp-server.",
    ),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per point (best and median reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per point before the timed ones."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for lmlab and every peer (default: torch's)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    machine: bool = typer.Option(
        False, "--machine", help="Measure this machine's bandwidth and matmul peak, cache them, print them."
    ),
    serve: str = typer.Option(
        None, "--serve", help="Load-test an OpenAI-compatible server at this URL instead (lmlab serve, vLLM...)."
    ),
    concurrency: str = typer.Option("1,4,8,16", "--concurrency", help="With --serve: clients per level."),
    api_key: str = typer.Option(None, "--api-key", help="With --serve: the server's bearer key."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plots: Path = typer.Option(None, "--plots", "--png", help="Write the plots (PNG and SVG) into this folder."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record this run in the run store."),
    wandb: bool = typer.Option(False, "--wandb", help="Mirror the run to wandb."),
):
    """Benchmark a model: TTFT, prefill and decode tokens/s, latency, memory, bandwidth, against the peers.

    Each figure is set against the machine's limits (memory bandwidth, matmul peak) and beside HF
    transformers and llama.cpp on the same weights.
    """
    from lmlab.bench.sweep import SweepSpec, parse_dtype_list, parse_int_list, parse_peers
    from lmlab.runs import record_run

    if machine:
        return _machine(device, threads, json_out, no_record)
    if serve:
        levels = parse_int_list("--concurrency", concurrency)
        serve_peers = list(peer or [])
        if any(p != "llamacpp-server" for p in serve_peers):
            raise LmlabError("with --serve the only peer is llamacpp-server (llama-cpp-python's own server).")
        return _serve_load(
            serve,
            None if model == DEFAULT_MODEL else model,
            levels,
            new_tokens,
            api_key,
            json_out,
            no_record,
            peer_model=model if serve_peers else None,
            threads=threads,
        )
    spec = SweepSpec(
        model=model,
        batches=parse_int_list("--batch", batch),
        prompt_lens=parse_int_list("--prompt-len", prompt_len),
        new_tokens=parse_int_list("--new-tokens", new_tokens),
        dtypes=parse_dtype_list(dtype),
        quant=quant,
        peers=parse_peers(peer),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        device=device,
    )
    from lmlab.bench.peers import peer_check

    for p in spec.peers:
        peer_check(p)
    from lmlab.loading.resolve import resolve

    resolved = resolve(model)  # an unknown model fails here, before the machine is measured
    config = {k: v for k, v in spec.__dict__.items() if k != "model"}
    t0 = time.perf_counter()
    with record_run(
        "bench",
        model=model,
        model_path=str(resolved.path),
        config=config,
        seed=None,
        inputs={
            "prompts": "Python standard library source, cut to each prompt length (random ids without a tokenizer)"
        },
        record=not no_record,
        wandb=wandb or None,
    ) as run:
        result = _sweep_with_progress(spec, run)
        run.timings = {"wall_s": time.perf_counter() - t0}
        written = []
        if plots is not None:
            from lmlab.bench.plots import write_plots

            written = write_plots(result["points"], result["machine"], plots, title=Path(model).name)
            run.outputs = {"plots": [str(p) for p in written]}
        if json_out:
            print_json(
                {
                    "model": model,
                    "host": result["host"],
                    "machine": result["machine"],
                    "points": result["points"],
                    "notes": result["notes"],
                    "plots": [str(p) for p in written],
                    "run_id": getattr(run, "id", None),
                }
            )
            return
        out.print(points_table(result["points"], spec.peers))
        m = result["machine"]
        peaks = ", ".join(f"{k} {v:,.0f}" for k, v in m["matmul_gflops"].items() if v)
        err.print(
            f"[dim]machine: {m['bandwidth_gb_s']:.1f} GB/s (fp32 mat-vec), matmul peak GFLOP/s {peaks}; "
            f"{result['host']['threads']} threads · rates: best of {spec.repeats} after {spec.warmup} warm-up "
            f"(decode median beside it) · {' · '.join(n.rstrip('.') for n in result['notes'])}[/]"
        )
        for p in written:
            if p.suffix == ".png":
                err.print(f"[dim]wrote {p} (+ .svg)[/]")


def _sweep_with_progress(spec, run) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmlab.bench.sweep import run_sweep

    points: list[dict] = []
    state: dict = {}

    def on_point(pt):
        from lmlab.bench.machine import cached_machine

        points.append(pt)
        if "machine" not in state:
            state["machine"] = cached_machine(spec.device if spec.device != "auto" else pt["device"], pt["threads"])
        run.metrics = {"points": list(points), "machine": state["machine"]}
        run.checkpoint()  # a crash or Ctrl-C keeps every point measured so far

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("bench", total=None)

        def progress(total=None, advance=None, description=None):
            if total is not None:
                bar.update(task, total=total)
            if description is not None:
                bar.update(task, description=description)
            if advance:
                bar.advance(task, advance)

        def load(dtype, quant=None):
            bar.update(task, description=f"loading {spec.model} ({quant or dtype})")
            return load_model(spec.model, dtype, spec.device, quiet=True, quant=quant)

        def log(msg):
            bar.console.print(f"[dim]{msg}[/]")

        result = run_sweep(spec, progress=progress, on_point=on_point, log=log, load=load)
    run.metrics = {
        "points": result["points"],
        "machine": result["machine"],
        "host": result["host"],
        "notes": result["notes"],
    }
    return result


def _machine(device: str, threads: int | None, json_out: bool, no_record: bool) -> None:
    import torch

    from lmlab.bench.machine import MACHINE_FILE, machine_limits
    from lmlab.host import lmlab_home
    from lmlab.loading import parse_device
    from lmlab.runs import record_run

    if threads is not None:
        torch.set_num_threads(threads)
    dev = parse_device(device)
    with record_run(
        "bench",
        model=None,
        model_path=None,
        config={"machine": True, "device": str(dev), "threads": threads},
        seed=None,
        inputs={},
        record=not no_record,
    ) as run:
        with err.status("measuring memory bandwidth and matmul peak (about 10 s)"):
            entry = machine_limits(dev, threads, remeasure=True)
        run.metrics = {"machine": entry}
        if json_out:
            print_json(entry)
            return
        out.print(machine_table(entry))
        err.print(f"[dim]cached in {lmlab_home() / MACHINE_FILE}; sweeps on this host use it[/]")


def _serve_load(url, model, levels, new_tokens, api_key, json_out, no_record, peer_model=None, threads=None):
    """lmlab bench --serve URL: clients at each concurrency level stream completions (lmlab.bench.load).

    With ``peer_model`` (--peer llamacpp-server), llama-cpp-python's own server is then started on
    that model's GGUF file and put under the same load in the same run."""
    import os

    from lmlab.bench.load import llamacpp_server, llamacpp_server_python, load_test
    from lmlab.bench.sweep import parse_int_list
    from lmlab.runs import record_run

    max_tokens = parse_int_list("--new-tokens", new_tokens)[0]
    gguf = None
    if peer_model is not None:
        from lmlab.loading.resolve import resolve

        resolved = resolve(peer_model)
        if resolved.kind != "gguf":
            raise LmlabError(
                f"--peer llamacpp-server runs GGUF files only and {peer_model} is not one; name a GGUF model with -m."
            )
        gguf = resolved.path
        llamacpp_server_python()  # before the load test: one sentence now if the peer cannot run
    config = {"url": url, "concurrency": levels, "max_tokens": max_tokens}
    if gguf is not None:
        config["peer"] = {"llamacpp-server": str(gguf), "threads": threads or os.cpu_count()}
    with record_run("bench", model=model, config=config, record=not no_record, inputs={"serve": url}) as run:
        rows = load_test(url, model, levels, max_tokens=max_tokens, api_key=api_key)
        peer_rows = None
        if gguf is not None:
            with llamacpp_server(gguf, alias=peer_model, threads=threads or os.cpu_count()) as peer_url:
                load_test(peer_url, peer_model, [1], requests=1, max_tokens=8)  # warm-up
                peer_rows = load_test(peer_url, peer_model, levels, max_tokens=max_tokens)
        run.outputs = {"serve_load": rows, **({"llamacpp_server": peer_rows} if peer_rows else {})}
    if json_out:
        print_json({"url": url, "levels": rows, "llamacpp_server": peer_rows, "run_id": getattr(run, "id", None)})
        return
    out.print(_load_table(f"load test of {url} · {max_tokens} new tokens per request, greedy", rows))
    if peer_rows:
        out.print(_load_table(f"llama-cpp-python's server on {gguf.name}, the same load", peer_rows))
        for a, b in zip(rows, peer_rows):
            ratio = a["aggregate_tok_s"] / b["aggregate_tok_s"] if b["aggregate_tok_s"] else float("nan")
            out.print(f"{a['concurrency']} clients: {ratio:.2f}x llamacpp-server's aggregate tokens/s")
    for r in rows + (peer_rows or []):
        if r["first_error"]:
            err.print(f"{r['errors']} errors at {r['concurrency']} clients; the first: {r['first_error']}")


def _load_table(title: str, rows: list[dict]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in (
        "clients",
        "agg tok/s",
        "per-client tok/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "errors",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["concurrency"]),
            f"{r['aggregate_tok_s']:.1f}",
            f"{r['per_client_tok_s']:.1f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p95_ms']:.0f}",
            f"{r['itl_p50_ms']:.1f}",
            f"{r['itl_p95_ms']:.1f}",
            str(r["errors"]),
        )
    return t


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
