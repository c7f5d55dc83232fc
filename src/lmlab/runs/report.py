"""Shareable reports of one run or a comparison of several: self-contained HTML and Markdown.

Both show, run by run side by side: a summary (command, model, model hash, seed, status), the
config (rows that differ are marked), metrics and timings with the ratio to the first run,
benchmark points, inputs and outputs, errors, package versions and host. When a run's metrics
hold a series (``metrics["points"]``: a list of dicts such as a bench sweep writes), the HTML
report draws it with matplotlib as inline SVG. A train or finetune run's loss curve is drawn as
``lmlab train`` draws it; a finetune run also gets its held-out loss and greedy samples before and
after training side by side, and a merge run the comparison of its inputs and result (perplexity,
greedy answers).

The HTML needs nothing from the network: no scripts, stylesheets, fonts or images are linked,
so the file can be mailed, attached to an issue or printed. All run text is escaped.
"""

from __future__ import annotations

import html
import io
import json
import re
import time
from typing import Any, Iterable

from lmlab.runs.store import flatten, iso_time, ratio, status_label

MAX_IO_FIELDS = 60  # inputs/outputs leaves shown per section per run; the JSON export has them all
MAX_VALUE_CHARS = 4000  # longer values are cut (chars)

# Series keys with a known meaning: (label, scale). When a series has none of them (a loss
# curve, say), its other numbers are plotted instead, at most MAX_OTHER_PLOTS of them.
KNOWN_MEASURES = {
    "decode_tok_s": ("decode (tokens/s)", 1.0),
    "prefill_tok_s": ("prefill (tokens/s)", 1.0),
    "ttft_ms": ("time to first token (ms)", 1.0),
    "peak_mem_bytes": ("peak memory (MiB)", 1 / 2**20),
    "bandwidth_pct": ("achieved memory bandwidth (% of measured roofline)", 1.0),
}
MAX_OTHER_PLOTS = 4
# Keys that say where a point was measured (not what was measured); text values count too.
DIMENSIONS = (
    "batch",
    "prompt_len",
    "seq_len",
    "context",
    "gen_len",
    "new_tokens",
    "threads",
    "step",
    "epoch",
    "iter",
    "engine",
    "dtype",
    "quant",
    "device",
    "compile",
    "impl",
    "peer",
    "model",
)
X_PREFERENCE = (
    "batch",
    "prompt_len",
    "seq_len",
    "context",
    "gen_len",
    "new_tokens",
    "threads",
    "step",
    "epoch",
    "iter",
)

# ---------------------------------------------------------------------------------------------
# The data both formats show


def _as_list(runs: dict | Iterable[dict]) -> list[dict]:
    runs = [runs] if isinstance(runs, dict) else list(runs)
    if not runs:
        raise ValueError("a report needs at least one run")
    return runs


def fmt_value(value: Any, key: str = "") -> str:
    """A value as a person reads it: numbers rounded, bytes in MiB/GiB, structures as JSON."""
    if value is None:
        return "—"
    if value == [] or value == {}:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and key.endswith("bytes"):
        return fmt_bytes(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def fmt_float(v: float) -> str:
    a = abs(v)
    if v != v or a == float("inf"):
        return str(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.3g}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"×{r:.2f}"


def run_title(run: dict) -> str:
    return f"{run['id']} · {run.get('command')} · {run.get('model') or 'no model'}"


def summary_rows(runs: list[dict]) -> list[tuple[str, list[str]]]:
    """(label, one text per run) for the head of the report."""

    def argv(r):
        return " ".join(r.get("argv") or []) or "—"

    return [
        ("command", [r.get("command") or "—" for r in runs]),
        ("model", [r.get("model") or "—" for r in runs]),
        ("model sha256", [(r.get("model_hash") or "—")[:12] for r in runs]),
        ("seed", [fmt_value(r.get("seed")) for r in runs]),
        ("status", [status_label(r) for r in runs]),
        ("started", [r.get("created") or "—" for r in runs]),
        ("duration", [f"{r['duration_s']:.2f} s" if r.get("duration_s") is not None else "—" for r in runs]),
        ("command line", [argv(r) for r in runs]),
    ]


def keyed_rows(runs: list[dict], section: str, skip: tuple[str, ...] = ()) -> list[tuple[str, list[Any], bool]]:
    """(key, raw value per run, differs) for a flattened section (config, versions, host)."""
    flats = [flatten(r.get(section) or {}) for r in runs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys and not k.startswith(skip)]
    rows = []
    for k in keys:
        values = [f.get(k) for f in flats]
        differs = any(
            json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
            for v in values
        )
        rows.append((k, values, differs))
    return rows


def numeric_rows(runs: list[dict], section: str) -> list[tuple[str, list[Any], list[float | None]]]:
    """(key, value per run, ratio to the first run per run) for the scalar numbers of a section."""
    rows = []
    for key, values, _ in keyed_rows(runs, section, skip=("points",)):
        if not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        rows.append((key, values, [ratio(values[0], v) for v in values]))
    return rows


def run_points(run: dict) -> list[dict]:
    points = (run.get("metrics") or {}).get("points") if isinstance(run.get("metrics"), dict) else None
    if isinstance(points, list) and points and all(isinstance(p, dict) for p in points):
        return points
    return []


def io_fields(run: dict, section: str, skip: tuple[str, ...] = ()) -> tuple[list[tuple[str, str]], int]:
    """(key, text) leaves of a run's inputs or outputs, and how many more were left out; top-level
    keys in ``skip`` (shown in a section of their own) are left out."""
    value = run.get(section)
    if isinstance(value, dict) and skip:
        value = {k: v for k, v in value.items() if k not in skip}
    if value in (None, {}, []):
        return [], 0
    flat = flatten(value if isinstance(value, dict) else {"value": value})
    items = []
    for key, v in list(flat.items())[:MAX_IO_FIELDS]:
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        if len(text) > MAX_VALUE_CHARS:
            text = text[:MAX_VALUE_CHARS] + f"… ({len(text) - MAX_VALUE_CHARS:,} more characters in the JSON export)"
        items.append((key, text))
    return items, max(0, len(flat) - MAX_IO_FIELDS)


# Fine-tuning and merging: the loss curve, the samples before and after, the merge comparison.
LOSS_COMMANDS = ("train", "finetune")


def loss_points(run: dict) -> list[dict]:
    """A train or finetune run's loss curve (points with step and train_loss and/or val_loss); a
    finetune run's held-out loss before training is added as step 0. [] for other runs."""
    points = run_points(run)
    if run.get("command") not in LOSS_COMMANDS or not any("train_loss" in p or "val_loss" in p for p in points):
        return []
    metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
    before = metrics.get("val_loss_before")
    if _is_number(before) and not any(p.get("step") == 0 and "val_loss" in p for p in points):
        points = [{"step": 0, "val_loss": before}, *points]
    return points


def loss_rows(points: list[dict]) -> list[dict]:
    """The loss curve one row per step (train loss, held-out loss and lr of the same step merged)."""
    by_step: dict[Any, dict] = {}
    for p in points:
        if _is_number(p.get("step")):
            by_step.setdefault(p["step"], {}).update(p)
    return [by_step[s] for s in sorted(by_step)]


def before_after(run: dict) -> dict | None:
    """A finetune run before and after training: {'val_loss': (before, after), 'samples': [{'line',
    'prompt', 'expected', 'before', 'after'}]} (greedy answers to the same held-out prompts; None
    where a side is missing, e.g. an interrupted run). None for a run without them."""
    outputs = run.get("outputs") if isinstance(run.get("outputs"), dict) else {}
    metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
    before = [s for s in outputs.get("samples_before") or [] if isinstance(s, dict)]
    after = [s for s in outputs.get("samples_after") or [] if isinstance(s, dict)]
    loss = (metrics.get("val_loss_before"), metrics.get("val_loss_after"))
    if run.get("command") != "finetune" or (not before and not after and loss == (None, None)):
        return None
    samples = []
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else {}
        a = after[i] if i < len(after) else {}
        samples.append(
            {
                "line": b.get("line", a.get("line")),
                "prompt": b.get("prompt", a.get("prompt")),
                "expected": b.get("expected", a.get("expected")),
                "before": b.get("output"),
                "after": a.get("output"),
            }
        )
    return {"val_loss": loss, "samples": samples}


def merge_comparison(run: dict) -> dict | None:
    """A merge run's comparison: {'columns': a heading per greedy answer (the prompt when the run
    recorded it), 'rows': [{'label', 'model', 'perplexity', 'tokens', 'answers'}]}; None otherwise."""
    outputs = run.get("outputs") if isinstance(run.get("outputs"), dict) else {}
    rows = [r for r in outputs.get("comparison") or [] if isinstance(r, dict)]
    if run.get("command") != "merge" or not rows:
        return None
    n = max(len(r.get("answers") or []) for r in rows)
    prompts = outputs.get("prompts")
    if isinstance(prompts, list) and len(prompts) == n:
        columns = [f"{p!r} →" for p in prompts]
    else:
        columns = [f"answer {i + 1}" for i in range(n)]
    return {"columns": columns, "rows": rows}


SHOWN_APART = {"finetune": ("samples_before", "samples_after"), "merge": ("comparison",)}


def shown_apart(run: dict) -> tuple[str, ...]:
    """The output keys a report shows in a section of their own (not again among the outputs)."""
    if before_after(run) or merge_comparison(run):
        return SHOWN_APART.get(run.get("command"), ())
    return ()


def _title(runs: list[dict]) -> str:
    if len(runs) == 1:
        return f"lmlab run {runs[0]['id']}"
    return f"lmlab: comparison of {len(runs)} runs"


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, inline SVG)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _point_keys(points: list[dict]) -> tuple[list[str], list[str]]:
    """(dimensions, measures) of a series: where each point was taken, and the numbers measured there.
    Measures are the known ones present or, when there are none, the other numbers."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p if k not in keys]
    dims = [
        k for k in keys if k in DIMENSIONS or all(isinstance(p.get(k), (str, bool)) or p.get(k) is None for p in points)
    ]
    numbers = [k for k in keys if k not in dims and any(_is_number(p.get(k)) for p in points)]
    known = [k for k in KNOWN_MEASURES if k in numbers]
    return dims, known or numbers


def plot_plan(runs: list[dict]) -> dict | None:
    """What to draw from the runs' points: {'x': key or None, 'groups': keys, 'measures': keys}.

    x is the first numeric dimension that varies (batch before prompt length...); every other
    varying dimension (dtype, engine...) splits the points into separate lines."""
    pts = [p for r in runs for p in run_points(r)]
    if not pts:
        return None
    dims, measures = _point_keys(pts)
    if measures and not any(k in KNOWN_MEASURES for k in measures):
        measures = measures[:MAX_OTHER_PLOTS]
    varying = [k for k in dims if len({json.dumps(p.get(k), default=str) for p in pts}) > 1]
    numeric = [k for k in varying if all(_is_number(p.get(k)) for p in pts)]
    x = next((k for k in X_PREFERENCE if k in numeric), numeric[0] if numeric else None)
    return {"x": x, "groups": [k for k in varying if k != x], "measures": measures}


def _series(runs: list[dict], plan: dict, measure: str) -> dict[str, list[tuple[float, float]]]:
    """Label -> [(x, y)] sorted by x; one line per run and per value of the other varying keys."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for i, p in enumerate(run_points(r)):
            y = p.get(measure)
            if not _is_number(y):
                continue
            x = p.get(plan["x"]) if plan["x"] else i
            parts = [r["id"]] if len(runs) > 1 else []
            parts += [f"{k}={p.get(k)}" for k in plan["groups"]]
            lines.setdefault(" ".join(parts) or measure, []).append((x, y))
    return {k: sorted(v) for k, v in lines.items()}


def _svg(fig, salt: str) -> str:
    """A matplotlib Figure as an inline <svg> element (no XML prolog, no metadata)."""
    import matplotlib

    buf = io.StringIO()
    # Text stays text (small, searchable); a different hash salt per figure keeps the SVGs'
    # internal ids unique within one page.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]


def _bench_figures(run: dict) -> list[tuple[str, str]]:
    """The bench module's own plots of a sweep (tokens/s vs batch, memory, roofline), or [] when
    the run is not a bench sweep or they cannot be drawn (the generic plots are used then)."""
    points = run_points(run)
    if run.get("command") != "bench" or not points or not all("engine" in p for p in points):
        return []
    try:
        from lmlab.bench.plots import sweep_figures

        figures = sweep_figures(points, (run.get("metrics") or {}).get("machine"))
        captions = {
            name: (fig.axes[0].get_title() if fig.axes else "") or name.replace("_", " ")
            for name, fig in figures.items()
        }
        return [(captions[name], _svg(fig, f"lmlab-bench-{name}")) for name, fig in figures.items()]
    except Exception:  # a point the bench plots do not expect must not cost the whole report
        return []


def _train_figures(runs: list[dict]) -> list[tuple[str, str]]:
    """Train and finetune runs: their loss curves overlaid in one plot (the plot of ``lmlab train
    --compare``); a finetune run's held-out loss before training is its step 0. Runs without
    points (a merge run beside a finetune run, say) are left out of it."""
    with_points = [r for r in runs if run_points(r)]
    if not with_points or not all(loss_points(r) for r in with_points):
        return []
    try:
        from lmlab.train.plots import loss_figure

        fig = loss_figure([(r["id"], loss_points(r)) for r in with_points], title="train and validation loss")
        return [("loss (nats/token) vs step: train (line) and validation (dots)", _svg(fig, "lmlab-train-loss"))]
    except Exception:  # points the loss plot does not expect must not cost the whole report
        return []


def _eval_compare_figures(run: dict) -> list[tuple[str, str]]:
    """An 'eval compare' run: each eval run's score with its 95% interval, and the paired test's
    outcomes (McNemar) for the first two (the plot of ``lmlab eval compare``)."""
    outputs = run.get("outputs") or {}
    if run.get("command") != "eval compare" or not outputs.get("runs"):
        return []
    try:
        from lmlab.eval.compare import compare_figure

        fig = compare_figure(outputs)
        caption = "score with its 95% interval per run"
        if outputs.get("paired_test"):
            caption += "; per-item outcomes of the first two runs on the same items, McNemar's exact test"
        return [(caption, _svg(fig, "lmlab-eval-compare"))]
    except Exception:  # outputs the plot does not expect must not cost the whole report
        return []


def plot_svgs(runs: list[dict]) -> list[tuple[str, str]]:
    """(caption, <svg>...</svg>) to show for the runs' series; [] when there are none.

    One bench run: the bench module's sweep plots; one eval compare run: its intervals and paired
    test. Otherwise one plot per measure with every
    run's points overlaid, one line per run and per value of the other varying dimensions."""
    if len(runs) == 1:
        figures = _bench_figures(runs[0]) or _eval_compare_figures(runs[0])
        if figures:
            return figures
    figures = _train_figures(runs)
    if figures:
        return figures
    plan = plot_plan(runs)
    if not plan or not plan["measures"]:
        return []
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    figures = []
    for i, measure in enumerate(plan["measures"]):
        label, scale = KNOWN_MEASURES.get(measure, (measure, 1.0))
        lines = _series(runs, plan, measure)
        fig = Figure(figsize=(7.0, 3.4))
        ax = fig.add_subplot()
        xs = []
        for name, pts in lines.items():
            ax.plot(
                [p[0] for p in pts], [p[1] * scale for p in pts], marker="o", linewidth=1.6, markersize=4, label=name
            )
            xs += [p[0] for p in pts]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)  # batch sizes and lengths double from point to point
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.set_xlabel(plan["x"] or "point")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if len(lines) > 1:
            ax.legend(fontsize=8, frameon=False)
        figures.append((f"{label} vs {plan['x'] or 'point'}", _svg(fig, f"lmlab-{i}")))
    return figures


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --soft: #f3f5f8; --accent: #2f5fd0; --diff: #fff4d6; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef0f4; color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 24px auto; padding: 28px 36px; background: #fff;
       border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
h4 { font-size: .95em; margin: 12px 0 4px; color: var(--muted); }
.sub { color: var(--muted); margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; white-space: nowrap; }
th.key { font-weight: 500; color: var(--muted); width: 1%; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
tr.diff td, tr.diff th { background: var(--diff); }
.ratio { color: var(--muted); font-size: .85em; margin-left: 6px; }
.st-complete { color: #1a7f37; font-weight: 600; } .st-failed { color: #cf222e; font-weight: 600; }
.st-interrupted, .st-incomplete, .st-running { color: #9a6700; font-weight: 600; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
pre { background: var(--soft); padding: 8px 10px; border-radius: 4px; margin: 2px 0 8px;
      white-space: pre-wrap; overflow-wrap: anywhere; }
.field { font-size: .85em; color: var(--muted); margin-top: 6px; }
td pre { margin: 0; padding: 2px 6px; }
figure { margin: 10px 0 18px; } figure svg { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: .9em; }
.note { color: var(--muted); font-size: .9em; }
footer { margin-top: 32px; color: var(--muted); font-size: .85em; border-top: 1px solid var(--line); padding-top: 8px; }
@media print {
  body { background: #fff; font-size: 11pt; }
  main { margin: 0; padding: 0; max-width: none; box-shadow: none; }
  h2, h3 { break-after: avoid; } figure, tr, pre { break-inside: avoid; }
}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_grid(
    runs: list[dict],
    rows: list[tuple[str, list[str]]],
    diff_flags: list[bool] | None = None,
    status_row: str | None = None,
) -> str:
    head = "".join(f"<th>{_e(r['id'])}</th>" for r in runs) if len(runs) > 1 else "<th>value</th>"
    body = []
    for i, (label, values) in enumerate(rows):
        cls = ' class="diff"' if diff_flags and diff_flags[i] else ""
        cells = []
        for v in values:
            if label == status_row:
                cells.append(f'<td><span class="st-{_e(v)}">{_e(v)}</span></td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        body.append(f'<tr{cls}><th class="key">{_e(label)}</th>{"".join(cells)}</tr>')
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_numbers(runs: list[dict], rows) -> str:
    head = "".join(f"<th>{_e(r['id'])}</th>" for r in runs) if len(runs) > 1 else "<th>value</th>"
    body = []
    for key, values, ratios in rows:
        cells = []
        for j, (v, r) in enumerate(zip(values, ratios)):
            extra = ""
            if j > 0 and r is not None:  # not coloured: higher is better for tok/s, worse for ms
                extra = f' <span class="ratio">{_e(fmt_ratio(r))}</span>'
            cells.append(f'<td class="num">{_e(fmt_value(v, key))}{extra}</td>')
        body.append(f'<tr><th class="key">{_e(key)}</th>{"".join(cells)}</tr>')
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def points_columns(points: list[dict]) -> tuple[list[str], dict[str, Any]]:
    """(columns, constants) of a points table: the dimensions that vary, then what was measured;
    dimensions with one value for every point are said once, as constants. The JSON export
    holds every field."""
    dims, measures = _point_keys(points)
    constants = {
        k: points[0].get(k)
        for k in dims
        if len(points) > 1 and len({json.dumps(p.get(k), default=str) for p in points}) == 1
    }
    return [k for k in dims if k not in constants] + measures, constants


def _constants_text(constants: dict[str, Any]) -> str:
    return "same for every point: " + ", ".join(f"{k} {fmt_value(v, k)}" for k, v in constants.items())


def _html_points(points: list[dict]) -> str:
    cols, constants = points_columns(points)
    note = f'<p class="note">{_e(_constants_text(constants))}</p>' if constants else ""
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(fmt_value(p.get(c), c))}</td>' for c in cols) + "</tr>" for p in points
    )
    return f"{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_before_after(ba: dict) -> str:
    before, after = ba["val_loss"]
    change = f" ({after - before:+.4f})" if _is_number(before) and _is_number(after) else ""
    parts = [
        "<table><thead><tr><th></th><th>before</th><th>after</th></tr></thead><tbody>"
        f'<tr><th class="key">held-out loss (nats/token)</th><td class="num">{_e(fmt_value(before))}</td>'
        f'<td class="num">{_e(fmt_value(after))}{_e(change)}</td></tr></tbody></table>'
    ]
    if ba["samples"]:
        head = "".join(f"<th>{h}</th>" for h in ("line", "prompt", "expected", "before", "after"))
        body = "".join(
            f'<tr><td class="num">{_e(fmt_value(x["line"]))}</td>'
            + "".join(f"<td><pre>{_e(fmt_value(x[k]))}</pre></td>" for k in ("prompt", "expected", "before", "after"))
            + "</tr>"
            for x in ba["samples"]
        )
        parts.append(
            '<p class="note">Greedy answers to the same held-out prompts before and after training.</p>'
            f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        )
    return "".join(parts)


def _html_merge_comparison(mc: dict) -> str:
    head = "<th>model</th><th>perplexity</th><th>tokens</th>" + "".join(f"<th>{_e(c)}</th>" for c in mc["columns"])
    body = []
    for r in mc["rows"]:
        answers = list(r.get("answers") or []) + [None] * (len(mc["columns"]) - len(r.get("answers") or []))
        body.append(
            f'<tr><th class="key">{_e(r.get("label"))}</th><td class="num">{_e(fmt_value(r.get("perplexity")))}</td>'
            f'<td class="num">{_e(fmt_value(r.get("tokens")))}</td>'
            + "".join(f"<td><pre>{_e(fmt_value(a))}</pre></td>" for a in answers)
            + "</tr>"
        )
    note = '<p class="note">Each input and the result on the same text (perplexity) and prompts (greedy answers).</p>'
    return f"{note}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_io(run: dict) -> str:
    parts = []
    apart = shown_apart(run)
    for section in ("inputs", "outputs"):
        fields, more = io_fields(run, section, skip=apart if section == "outputs" else ())
        parts.append(f"<h4>{section}</h4>")
        if section == "outputs" and apart:
            parts.append(f'<p class="note">{_e(", ".join(apart))}: shown above.</p>')
        if not fields:
            parts.append('<p class="note">none recorded</p>')
        for key, text in fields:
            parts.append(f'<div class="field">{_e(key)}</div><pre>{_e(text)}</pre>')
        if more:
            parts.append(
                f'<p class="note">… {more} more fields: <code>lmlab runs export {_e(run["id"])} --json</code></p>'
            )
    return "".join(parts)


def render_html(runs: dict | Iterable[dict]) -> str:
    """A self-contained HTML page for one run or a side-by-side comparison of several."""
    runs = _as_list(runs)
    from lmlab import __version__

    s = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(_title(runs))}</title><style>{CSS}</style></head><body><main>"
    ]
    s.append(f"<header><h1>{_e(_title(runs))}</h1>")
    s.append("".join(f'<p class="sub">{_e(run_title(r))}</p>' for r in runs) + "</header>")
    if len(runs) > 1:
        s.append(
            f'<p class="note">Ratios (×) compare each run with the first, {_e(runs[0]["id"])}. '
            "Highlighted config rows differ between runs.</p>"
        )

    s.append("<section><h2>Summary</h2>")
    s.append(_html_grid(runs, summary_rows(runs), status_row="status"))
    s.append("</section>")

    config = keyed_rows(runs, "config")
    if config:
        s.append("<section><h2>Config</h2>")
        s.append(
            _html_grid(
                runs,
                [(k, [fmt_value(v) for v in vals]) for k, vals, _ in config],
                diff_flags=[d for *_, d in config] if len(runs) > 1 else None,
            )
        )
        s.append("</section>")

    for section, title in (("metrics", "Metrics"), ("timings", "Timings")):
        rows = numeric_rows(runs, section)
        if rows:
            s.append(f"<section><h2>{title}</h2>{_html_numbers(runs, rows)}</section>")

    plots = plot_svgs(runs)
    if plots:
        s.append("<section><h2>Plots</h2>")
        for caption, svg in plots:
            s.append(f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>")
        s.append("</section>")

    tuned = [(r, before_after(r)) for r in runs]
    if any(ba for _, ba in tuned):
        s.append("<section><h2>Before and after fine-tuning</h2>")
        for r, ba in tuned:
            if ba:
                s.append(f"<h3>{_e(run_title(r))}</h3>{_html_before_after(ba)}")
        s.append("</section>")
    merged = [(r, merge_comparison(r)) for r in runs]
    if any(mc for _, mc in merged):
        s.append("<section><h2>Merge comparison</h2>")
        for r, mc in merged:
            if mc:
                s.append(f"<h3>{_e(run_title(r))}</h3>{_html_merge_comparison(mc)}")
        s.append("</section>")

    with_points = [r for r in runs if run_points(r)]
    if with_points:
        s.append("<section><h2>Measured points</h2>")
        for r in with_points:
            s.append(f"<h3>{_e(run_title(r))}</h3>{_html_points(run_points(r))}")
        s.append("</section>")

    s.append("<section><h2>Inputs and outputs</h2>")
    for r in runs:
        s.append(f"<h3>{_e(run_title(r))}</h3>{_html_io(r)}")
    s.append("</section>")

    failed = [r for r in runs if r.get("error")]
    if failed:
        s.append("<section><h2>Errors</h2>")
        for r in failed:
            s.append(f"<h3>{_e(run_title(r))}</h3><pre>{_e(r['error'])}</pre>")
        s.append("</section>")

    for section, title in (("versions", "Package versions"), ("host", "Host")):
        rows = keyed_rows(runs, section)
        if rows:
            s.append(f"<section><h2>{title}</h2>")
            s.append(
                _html_grid(
                    runs,
                    [(k, [fmt_value(v, k) for v in vals]) for k, vals, _ in rows],
                    diff_flags=[d for *_, d in rows] if len(runs) > 1 else None,
                )
            )
            s.append("</section>")

    s.append(
        f"<footer>Made by lmlab {_e(__version__)} on {_e(iso_time(time.time()))} from the local run store "
        f"(<code>lmlab runs export {' '.join(_e(r['id']) for r in runs)} --html</code>).</footer>"
    )
    s.append("</main></body></html>\n")
    return "".join(s)


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: Any) -> str:
    text = html.escape(str(value), quote=False)  # GitHub renders raw HTML in tables: escape it
    return text.replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ") or " "


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md_fence(text: str) -> str:
    """A fenced code block whose fence is longer than any run of backticks inside (so text can't escape)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}\n"


def render_markdown(runs: dict | Iterable[dict]) -> str:
    """A Markdown report (GitHub-flavoured tables) for one run or a comparison of several."""
    runs = _as_list(runs)
    head = [""] + ([r["id"] for r in runs] if len(runs) > 1 else ["value"])
    out = [f"# {_md_cell(_title(runs))}\n"]
    out += [f"- {_md_cell(run_title(r))}\n" for r in runs]
    if len(runs) > 1:
        out.append(
            f"\nRatios (×) compare each run with the first ({runs[0]['id']}); "
            "config rows marked **≠** differ between runs.\n"
        )

    out.append("\n## Summary\n\n")
    out.append(_md_table(head, [[label] + values for label, values in summary_rows(runs)]))

    config = keyed_rows(runs, "config")
    if config:
        out.append("\n## Config\n\n")
        rows = [[(f"≠ {k}" if d and len(runs) > 1 else k)] + [fmt_value(v) for v in vals] for k, vals, d in config]
        out.append(_md_table(head, rows))

    for section, title in (("metrics", "Metrics"), ("timings", "Timings")):
        rows = numeric_rows(runs, section)
        if rows:
            out.append(f"\n## {title}\n\n")
            table = []
            for key, values, ratios in rows:
                cells = [
                    fmt_value(v, key) + (f" ({fmt_ratio(r)})" if j and r is not None else "")
                    for j, (v, r) in enumerate(zip(values, ratios))
                ]
                table.append([key] + cells)
            out.append(_md_table(head, table))

    tuned = [(r, before_after(r)) for r in runs]
    if any(ba for _, ba in tuned):
        out.append("\n## Before and after fine-tuning\n")
        for r, ba in tuned:
            if not ba:
                continue
            before, after = ba["val_loss"]
            out.append(f"\n### {_md_cell(run_title(r))}\n\n")
            out.append(_md_table(["", "before", "after"], [["held-out loss", fmt_value(before), fmt_value(after)]]))
            if ba["samples"]:
                out.append("\nGreedy answers to the same held-out prompts:\n\n")
                cols = ["line", "prompt", "expected", "before", "after"]
                out.append(_md_table(cols, [[fmt_value(x[c]) for c in cols] for x in ba["samples"]]))
    merged = [(r, merge_comparison(r)) for r in runs]
    if any(mc for _, mc in merged):
        out.append("\n## Merge comparison\n")
        for r, mc in merged:
            if not mc:
                continue
            out.append(f"\n### {_md_cell(run_title(r))}\n\n")
            rows = [
                [x.get("label"), fmt_value(x.get("perplexity")), fmt_value(x.get("tokens"))]
                + [fmt_value(a) for a in list(x.get("answers") or [])]
                + [""] * (len(mc["columns"]) - len(x.get("answers") or []))
                for x in mc["rows"]
            ]
            out.append(_md_table(["model", "perplexity", "tokens", *mc["columns"]], rows))

    with_points = [r for r in runs if run_points(r)]
    if with_points:
        out.append("\n## Measured points\n")
        for r in with_points:
            points = run_points(r)
            cols, constants = points_columns(points)
            out.append(f"\n### {_md_cell(run_title(r))}\n\n")
            if constants:
                out.append(_md_cell(_constants_text(constants)) + "\n\n")
            out.append(_md_table(cols, [[fmt_value(p.get(c), c) for c in cols] for p in points]))
        out.append(
            "\n(The HTML export draws these as plots: `lmlab runs export "
            + " ".join(r["id"] for r in runs)
            + " --html`.)\n"
        )

    out.append("\n## Inputs and outputs\n")
    for r in runs:
        out.append(f"\n### {_md_cell(run_title(r))}\n")
        apart = shown_apart(r)
        for section in ("inputs", "outputs"):
            fields, more = io_fields(r, section, skip=apart if section == "outputs" else ())
            out.append(f"\n**{section}**" + (" — none recorded\n" if not fields else "\n"))
            if section == "outputs" and apart:
                out.append(f"\n({', '.join(apart)}: shown above)\n")
            for key, text in fields:
                out.append(f"\n`{key.replace('`', '')}`\n\n{_md_fence(text)}")
            if more:
                out.append(f"\n… {more} more fields: `lmlab runs export {r['id']} --json`\n")

    failed = [r for r in runs if r.get("error")]
    if failed:
        out.append("\n## Errors\n")
        for r in failed:
            out.append(f"\n### {_md_cell(run_title(r))}\n\n{_md_fence(str(r['error']))}")

    for section, title in (("versions", "Package versions"), ("host", "Host")):
        rows = keyed_rows(runs, section)
        if rows:
            out.append(f"\n## {title}\n\n")
            out.append(_md_table(head, [[k] + [fmt_value(v, k) for v in vals] for k, vals, _ in rows]))
    return "".join(out)


def report_filename(runs: list[dict]) -> str:
    """Default file name of an HTML report: lmlab-report-<id>-<id>....html."""
    return "lmlab-report-" + "-".join(r["id"] for r in _as_list(runs)) + ".html"
