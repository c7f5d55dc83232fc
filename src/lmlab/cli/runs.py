"""`lmlab runs`: list, show, diff, export and rm the runs in the local store.

Content (tables, JSON, reports) goes to stdout; counts and file paths to stderr. A run is named
by its id, any unique prefix of it, `last` (the newest run) or `last-N` (N runs before that).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from lmlab.cli.common import err, out, print_json
from lmlab.errors import LmlabError

runs_app = typer.Typer(
    name="runs",
    help="The run store: list, show, compare, export and delete recorded runs.",
    no_args_is_help=True,
    add_completion=False,
)

STATUS_STYLE = {
    "complete": "green",
    "failed": "bold red",
    "interrupted": "yellow",
    "running": "cyan",
    "incomplete": "bold yellow",
}
# Metrics worth a place in `runs list`, in order: (key, label, unit).
KEY_METRICS = (
    ("decode_tok_s", "decode", "tok/s"),
    ("tokens_per_s", "", "tok/s"),
    ("prefill_tok_s", "prefill", "tok/s"),
    ("ttft_ms", "TTFT", "ms"),
    ("perplexity", "ppl", ""),
    ("loss", "loss", ""),
    ("accuracy", "acc", ""),
    ("kl", "KL", ""),
)
MAX_CELL_CHARS = 160  # in the diff table
MAX_SHOW_CHARS = 2000  # in `runs show` (a long command line is shown whole, wrapped)
MAX_DIFF_ROWS = 25  # per section in the diff table


def register(app: typer.Typer) -> None:
    """Add the `runs` command group to the main app."""
    app.add_typer(runs_app, name="runs")


def _open_store():
    from lmlab.runs import RunStore

    return RunStore()  # raises LmlabError (StoreUnavailable or newer schema) with the fix


def _when(iso: str | None) -> str:
    if not iso:
        return "—"
    return _dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def _status_text(run: dict) -> Text:
    from lmlab.runs import status_label

    label = status_label(run)
    shown = "incomplete (never finished)" if label == "incomplete" else label
    return Text(shown, style=STATUS_STYLE.get(label, ""))


def key_metrics(run: dict, most: int = 3) -> str:
    """The few metrics that say how a run went, e.g. 'decode 41.3 tok/s · TTFT 120 ms'."""
    from lmlab.runs.report import fmt_value

    metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
    parts = []
    before, after = metrics.get("val_loss_before"), metrics.get("val_loss_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):  # a finetune run
        parts.append(f"held-out loss {fmt_value(before)} → {fmt_value(after)}")
    if isinstance(metrics.get("perplexity.merged"), (int, float)):  # a merge run, with its comparison
        inputs = [fmt_value(v) for k, v in metrics.items() if k.startswith("perplexity.") and k != "perplexity.merged"]
        parts.append(f"ppl {' / '.join(inputs)} → merged {fmt_value(metrics['perplexity.merged'])}")
    for key, label, unit in KEY_METRICS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(" ".join(x for x in (label, fmt_value(v, key), unit) if x))
    points = metrics.get("points")
    if isinstance(points, list) and points:
        best = [
            p.get("decode_tok_s")
            for p in points
            if isinstance(p, dict) and isinstance(p.get("decode_tok_s"), (int, float))
        ]
        parts.append(f"{len(points)} points" + (f", best decode {fmt_value(max(best))} tok/s" if best else ""))
    if not parts:  # no known metric: show the first plain numbers
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{k} {fmt_value(v, k)}")
    return " · ".join(parts[:most]) or "—"


def _cell(value, key: str = "", limit: int = MAX_CELL_CHARS) -> str:
    from lmlab.runs.report import fmt_value

    text = fmt_value(value, key)
    if len(text) <= limit:
        return text
    return text[:limit] + f" [{len(text) - limit} more characters: --json has them all]"  # said, not silently cut


@runs_app.command("list")
def list_runs(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", "-n", help="Show at most this many runs (0 = all)."),
    command: str = typer.Option(None, "--command", "-c", help="Only runs of this command (generate, bench, ...)."),
    model: str = typer.Option(None, "--model", "-m", help="Only runs of this model."),
    search: str = typer.Option(
        None, "--search", "-s", help="Only runs whose config, inputs, outputs or error contain this text."
    ),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List recorded runs, newest first."""
    with _open_store() as store:
        runs = store.list(limit=limit or None, command=command, model=model, search=search)
        total = store.count()
        path = store.path
    if json_out:
        return print_json(runs)
    # Long values (a model path, several metrics) wrap inside their cell, never cut: every column
    # folds what does not fit, and the id and time (fixed width) never wrap.
    from rich import box

    t = Table(title=None, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, kw in (
        ("id", {"no_wrap": True, "min_width": 12}),
        ("when", {"no_wrap": True}),
        ("command", {"overflow": "fold"}),
        ("model", {"overflow": "fold"}),
        ("status", {"overflow": "fold"}),
        ("key metrics", {"overflow": "fold"}),
        ("duration", {"justify": "right", "min_width": 7}),
    ):
        t.add_column(col, **kw)
    for r in runs:
        duration = f"{r['duration_s']:.1f} s" if r.get("duration_s") is not None else "—"
        t.add_row(
            r["id"], _when(r["created"]), r["command"], r.get("model") or "—", _status_text(r), key_metrics(r), duration
        )
    if runs:
        out.print(t)
    filtered = " matching" if (command or model or search) else ""
    if runs or filtered:
        err.print(f"{len(runs)}{filtered} of {total} runs in {path}")
    else:
        err.print(f"no runs yet in {path}; every {_recording_commands(ctx)} run lands here.")


def _records(command) -> bool:
    """Whether a command (or one of a group's) records runs: it takes --no-record."""
    if any(getattr(p, "name", None) == "no_record" for p in getattr(command, "params", [])):
        return True
    return any(_records(c) for c in getattr(command, "commands", {}).values())


def _recording_commands(ctx) -> str:
    """The commands of this lmlab that record runs, e.g. 'generate / chat / inspect / ... / bench'."""
    try:
        root = ctx.find_root()
        names = [n for n in root.command.list_commands(root) if _records(root.command.get_command(root, n))]
    except (RuntimeError, AttributeError):
        names = []
    return " / ".join(names) or "generate / chat / inspect / bench"


def _kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 2, 0, 0))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else Text(_cell(v, k, MAX_SHOW_CHARS)))
    return t


SHOW_IO_LEAVES = 40  # inputs/outputs fields printed by `runs show`; --json has them all
SHOW_LOSS_ROWS = 20  # steps of a loss curve printed by `runs show`; --json has them all
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60  # characters of a sparkline at most


def _evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), the first and the last among them (all when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def sparkline(values: list[float]) -> str:
    """Numbers as a row of block characters, lowest ▁ to highest █ (a curve in one line); a long
    series is sampled at SPARK_WIDTH evenly spaced points."""
    values = [values[i] for i in _evenly(len(values), SPARK_WIDTH)]
    lo, hi = min(values), max(values)
    return "".join(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0] for v in values)


def _loss_curve(run: dict) -> list:
    """A train or finetune run's loss curve: a sparkline per loss, then a table of its steps (all of
    them, or SHOW_LOSS_ROWS: those with a held-out loss first, the others spread evenly)."""
    from lmlab.runs.report import fmt_value, loss_points, loss_rows

    rows = loss_rows(loss_points(run))
    if not rows:
        return []
    keep = set(_evenly(len(rows), 2))
    held = [i for i, r in enumerate(rows) if "val_loss" in r]
    keep |= {held[i] for i in _evenly(len(held), SHOW_LOSS_ROWS // 2)}
    spread = _evenly(len(rows), SHOW_LOSS_ROWS)
    for i in sorted(spread, key=lambda i: min(abs(i - j) for j in keep) * -1):  # farthest from kept rows first
        if len(keep) >= SHOW_LOSS_ROWS:
            break
        keep.add(i)
    shown = [rows[i] for i in sorted(keep)]
    more = f", {len(shown)} of {len(rows)} steps shown (--json has them all)" if len(shown) < len(rows) else ""
    parts: list = [Text("loss curve (nats/token)" + more, style="bold")]
    for key, label in (("train_loss", "train"), ("val_loss", "held-out")):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            parts.append(Text(f"{label:>8} {fmt_value(values[0])} {sparkline(values)} {fmt_value(values[-1])}"))
    t = Table(header_style="bold", box=None, padding=(0, 2, 0, 0))
    for col in ("step", "train loss", "held-out loss", "lr"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in shown:
        t.add_row(*(fmt_value(r.get(k)) if k in r else "" for k in ("step", "train_loss", "val_loss", "lr")))
    return [*parts, t]


def _before_after_tables(run: dict) -> list[Table]:
    """A finetune run's held-out loss before and after, and its greedy samples side by side."""
    from lmlab.runs.report import before_after, fmt_value

    ba = before_after(run)
    if not ba:
        return []
    before, after = ba["val_loss"]
    loss = f"{fmt_value(before)} → {fmt_value(after)}"
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        loss += f" ({after - before:+.4f})"
    tables = [_kv_table("before and after fine-tuning", [("held-out loss", loss)])]
    if ba["samples"]:
        t = Table(
            title="greedy answers to the same held-out prompts",
            title_justify="left",
            title_style="dim",
            header_style="bold",
        )
        t.add_column("line", justify="right", no_wrap=True)
        for col in ("prompt", "expected", "before", "after"):
            t.add_column(col, overflow="fold")
        for x in ba["samples"]:
            t.add_row(*(Text(fmt_value(x[k])) for k in ("line", "prompt", "expected", "before", "after")))
        tables.append(t)
    return tables


def _merge_table(run: dict) -> Table | None:
    """A merge run's comparison: perplexity and greedy answers of each input and of the result."""
    from lmlab.runs.report import fmt_value, merge_comparison

    mc = merge_comparison(run)
    if not mc:
        return None
    t = Table(
        title="merge comparison: perplexity on one text, greedy answers to the same prompts",
        title_justify="left",
        title_style="bold",
        header_style="bold",
    )
    t.add_column("model", overflow="fold")
    t.add_column("perplexity", justify="right", no_wrap=True)
    t.add_column("tokens", justify="right", no_wrap=True)
    for c in mc["columns"]:
        t.add_column(c, overflow="fold")
    for r in mc["rows"]:
        answers = [Text(fmt_value(a)) for a in r.get("answers") or []]
        answers += [Text("")] * (len(mc["columns"]) - len(answers))
        t.add_row(Text(str(r.get("label"))), fmt_value(r.get("perplexity")), fmt_value(r.get("tokens")), *answers)
    return t


@runs_app.command("show")
def show(
    run_id: str = typer.Argument(..., metavar="ID", help="Run id, a unique prefix, 'last' or 'last-N'."),
    json_out: bool = typer.Option(False, "--json", help="The whole record as JSON."),
):
    """Show everything recorded about one run."""
    from lmlab.runs.store import flatten

    with _open_store() as store:
        run = store.get(run_id)
    if json_out:
        return print_json(run)
    head = [
        ("id", run["id"]),
        ("command", run["command"]),
        ("status", _status_text(run)),
        ("model", run.get("model")),
        ("model path", run.get("model_path")),
        ("model sha256", run.get("model_hash")),
        ("seed", run.get("seed")),
        ("started", run.get("created")),
        ("finished", run.get("finished")),
        ("duration", f"{run['duration_s']:.2f} s" if run.get("duration_s") is not None else None),
        ("command line", " ".join(run.get("argv") or [])),
    ]
    out.print(_kv_table(f"run {run['id']}", head))
    for section in ("config", "metrics", "timings"):
        value = run.get(section)
        if value:
            flat = flatten(value if isinstance(value, dict) else {"value": value})
            if section == "metrics" and "points" in (value if isinstance(value, dict) else {}):
                flat = {k: v for k, v in flat.items() if not k.startswith("points[")}
                flat["points"] = f"{len(value['points'])} points (`lmlab runs export {run['id']} --html` plots them)"
                if run.get("command") in ("train", "finetune"):
                    flat["points"] = f"{len(value['points'])} points (the loss curve below)"
            out.print()
            out.print(_kv_table(section, list(flat.items())))
    from lmlab.runs.report import shown_apart

    curve = _loss_curve(run)
    if curve:
        out.print()
        for part in curve:
            out.print(part)
    for table in [*_before_after_tables(run), _merge_table(run)]:
        if table is not None:
            out.print()
            out.print(table)
    apart = shown_apart(run)
    for section in ("inputs", "outputs"):
        value = run.get(section)
        if section == "outputs" and apart and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in apart}
        if value:
            out.print()
            out.print(Text(section, style="bold"))
            flat = list(flatten(value if isinstance(value, dict) else {"value": value}).items())
            short = []
            for k, v in flat[:SHOW_IO_LEAVES]:
                text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
                if "\n" in text or len(text) > 80:  # long text (a prompt, an answer) as its own block
                    if short:
                        out.print(_kv_table("", short))
                        short = []
                    out.print(Text(k, style="dim"))
                    out.print(Text(text))
                else:
                    short.append((k, text))
            if short:
                out.print(_kv_table("", short))
            if len(flat) > SHOW_IO_LEAVES:
                out.print(
                    Text(
                        f"... {len(flat) - SHOW_IO_LEAVES} more {section} fields: lmlab runs show {run['id']} --json",
                        style="dim",
                    )
                )
    if run.get("error"):
        out.print()
        out.print(Text("error", style="bold red"))
        out.print(Text(run["error"]))
    for section in ("versions", "host"):
        if run.get(section):
            out.print()
            out.print(_kv_table(section, list(flatten(run[section]).items())))


@runs_app.command("diff")
def diff(
    a: str = typer.Argument(..., metavar="A", help="The first run (the baseline)."),
    b: str = typer.Argument(..., metavar="B", help="The second run."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """What changed from run A to run B: config, inputs, outputs, metrics, versions, host."""
    from lmlab.runs.report import fmt_ratio

    with _open_store() as store:
        d = store.diff(a, b)
    if json_out:
        return print_json(d)
    n_same = sum(d["same"].values())
    if not d["changes"]:
        err.print(f"runs {d['a']} and {d['b']} record the same config, inputs, outputs and metrics.")
        return
    t = Table(header_style="bold")
    t.add_column("section", style="dim", no_wrap=True)
    t.add_column("key", overflow="fold")
    t.add_column(f"A {d['a']}", overflow="fold")
    t.add_column(f"B {d['b']}", overflow="fold")
    t.add_column("B/A", justify="right", no_wrap=True)
    shown: dict[str, int] = {}
    for c in d["changes"]:
        shown[c["section"]] = shown.get(c["section"], 0) + 1
        if shown[c["section"]] > MAX_DIFF_ROWS:  # e.g. every point of two bench sweeps
            continue
        t.add_row(
            c["section"],
            c["key"],
            Text(_cell(c["a"], c["key"]) if c["change"] != "added" else "(absent)"),
            Text(_cell(c["b"], c["key"]) if c["change"] != "removed" else "(absent)"),
            fmt_ratio(c["ratio"]),
        )
    out.print(t)
    hidden = sum(max(0, n - MAX_DIFF_ROWS) for n in shown.values())
    more = f" ({hidden} not shown: add --json to see them all)" if hidden else ""
    err.print(f"{len(d['changes'])} differences{more}, {n_same} fields the same.")


@runs_app.command("export")
def export(
    run_ids: list[str] = typer.Argument(..., metavar="ID...", help="One run, or several to compare side by side."),
    html: bool = typer.Option(False, "--html", help="A self-contained HTML report with plots (the default)."),
    md: bool = typer.Option(False, "--md", help="A Markdown report."),
    json_out: bool = typer.Option(False, "--json", help="The full records as a JSON list."),
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        help="Write here ('-' = stdout). Default: stdout for --md/--json, lmlab-report-<ids>.html for --html.",
    ),
):
    """Export runs as a shareable report (HTML or Markdown) or as JSON."""
    from lmlab.runs.report import render_html, render_markdown, report_filename

    if sum((html, md, json_out)) > 1:
        raise LmlabError("choose one format: --html, --md or --json.")
    fmt = "md" if md else "json" if json_out else "html"
    with _open_store() as store:
        runs = [store.get(i) for i in run_ids]
    if fmt == "json":
        text = json.dumps(runs, indent=2, ensure_ascii=False, default=str) + "\n"
    elif fmt == "md":
        text = render_markdown(runs)
    else:
        text = render_html(runs)
    if output is None and fmt == "html":
        output = Path(report_filename(runs))
    if output is None or str(output) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise LmlabError(f"could not write {output} ({e.strerror or e}); pass -o with a writable path.") from e
    err.print(f"wrote {fmt} report of {len(runs)} run{'s' if len(runs) > 1 else ''} to {output}")


@runs_app.command("check")
def check(
    move_aside: bool = typer.Option(
        False,
        "--move-aside",
        help="If the store is damaged: rename it, start a new one, and copy in every run that can still be read.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Check the run store for damage; with --move-aside, replace a damaged one (keeping what can be read)."""
    from lmlab.runs.store import check_store
    from lmlab.runs.store import move_aside as do_move

    report = check_store()
    moved = do_move(report["path"]) if move_aside and report["exists"] and not report["ok"] else None
    if json_out:
        return print_json({**report, "moved_aside": moved})
    path = report["path"]
    if not report["exists"]:
        out.print(f"no run store yet at {path}; the first recorded run creates it.", markup=False, highlight=False)
    elif report["ok"]:
        out.print(
            f"ok: {path} holds {report['runs']} runs (schema v{report['schema']}).", markup=False, highlight=False
        )
    else:
        problems = "; ".join(report["problems"][:3]) + (" ..." if len(report["problems"]) > 3 else "")
        out.print(f"damaged: {path} ({problems}).", markup=False, highlight=False)
        if moved is None:
            err.print(
                f"`lmlab runs check --move-aside` renames it to {Path(path).name}.damaged-<time>, starts a new store "
                "and copies in every run that can still be read (or move it yourself: mv "
                f"{path} {path}.damaged).",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(1)
        out.print(
            f"moved it to {moved['moved_to']}; a new store holds the {moved['recovered']} runs that could be read.",
            markup=False,
            highlight=False,
        )


@runs_app.command("import")
def import_runs(
    files: list[Path] = typer.Argument(
        ..., metavar="FILE...", help="Run files lmlab wrote when the store could not be used (lmlab-run-<id>.json)."
    ),
):
    """Add runs from JSON files (a run goes to one when the store cannot be written) to the store."""
    from lmlab.runs.store import import_run

    runs = []
    for f in files:
        if not f.is_file():
            raise LmlabError(f"{f} is not a file; pass the JSON file lmlab named when it could not record the run.")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LmlabError(f"{f} is not a JSON run file ({e}); pass a file that lmlab wrote.") from None
        runs += data if isinstance(data, list) else [data]  # `lmlab runs export --json` writes a list
    with _open_store() as store:
        for run in runs:
            run_id = import_run(store, run)
            err.print(f"imported run {run_id} ({run.get('command')}) into {store.path}", markup=False)


@runs_app.command("rm")
def rm(run_ids: list[str] = typer.Argument(..., metavar="ID...", help="Runs to delete.")):
    """Delete runs from the store (for good)."""
    with _open_store() as store:
        full = [store.resolve_id(i) for i in run_ids]  # check every id before deleting any
        for run_id in dict.fromkeys(full):
            store.delete(run_id)
            err.print(f"deleted run {run_id}")
