"""How inspection results look: terminal heatmaps (rich), PNG files (matplotlib, Agg) and HTML for
Jupyter (``_repr_html_`` of caches, patterns, lens tables, metrics, shape traces).

Everything here only formats; the numbers come from the other inspect modules.
"""

from __future__ import annotations

import html
import io
import math
import shutil

import torch
from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

# ----------------------------------------------------------------------------- plain text

LABEL_MAX = 24  # a token label longer than this (rare: runs of spaces in code) is cut with "…"


def as_text(obj, width: int | None = None) -> str:
    """What ``print(obj)`` shows: the terminal rendering as plain text (no colour codes), fitted to
    the terminal's width (or ``width``)."""
    buf = io.StringIO()
    width = width or shutil.get_terminal_size((100, 24)).columns
    Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False).print(obj)
    return buf.getvalue().rstrip("\n")


# ----------------------------------------------------------------------------- colours


def show_token(s: str, width: int | None = None) -> str:
    """A token as it can be printed in one cell: whitespace made visible, cut to width."""
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if s.startswith(" "):
        s = "␣" + s[1:]
    if width is not None and len(s) > width:
        s = s[: width - 1] + "…"
    return s


def _range(m: torch.Tensor, center: float | None) -> tuple[float, float]:
    finite = m[torch.isfinite(m)]
    if finite.numel() == 0:
        return 0.0, 1.0
    lo, hi = finite.min().item(), finite.max().item()
    if center is not None:
        span = max(abs(lo - center), abs(hi - center), 1e-12)
        return center - span, center + span
    if lo >= 0 and hi <= 1:  # probabilities: a fixed scale, so 0.5 always looks the same
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1e-12


def rgb(v: float, lo: float, hi: float, diverging: bool) -> tuple[int, int, int]:
    """A colour for v on [lo, hi]: white -> blue, or blue -> white -> red when diverging."""
    if not math.isfinite(v):
        return (230, 230, 230)
    t = min(1.0, max(0.0, (v - lo) / (hi - lo)))
    if diverging:
        if t < 0.5:
            a = (0.5 - t) * 2  # toward blue
            return (int(255 - 200 * a), int(255 - 150 * a), 255)
        a = (t - 0.5) * 2  # toward red
        return (255, int(255 - 170 * a), int(255 - 190 * a))
    return (int(255 - 225 * t), int(255 - 160 * t), int(255 - 60 * t))


def _cell(v: float, lo: float, hi: float) -> str:
    """A value in few characters: probabilities as whole percent, others with one decimal."""
    if not math.isfinite(v):
        return "·"
    if lo >= 0 and hi <= 1:
        return f"{round(v * 100)}"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def _ink(bg: tuple[int, int, int]) -> str:
    return "black" if sum(bg) > 380 else "white"


# ----------------------------------------------------------------------------- heatmaps


class Heatmap:
    """A terminal heatmap that fits the console: every cell as wide as the widest value or column
    label (nothing is cut), and when the columns do not fit they continue in further blocks
    below, each with the row labels. Every cell starts with a space, so the numbers stay apart
    when colours are lost (a pipe)."""

    def __init__(self, title: str, row_labels: list[str], col_labels: list[str], cells: list[list[Text]], width: int):
        self.title, self.row_labels, self.col_labels, self.cells, self.width = (
            title,
            row_labels,
            col_labels,
            cells,
            width,
        )

    def __rich_console__(self, console, options):
        label_w = max([len(r) for r in self.row_labels] + [1])
        n = len(self.col_labels)
        per = max(1, (options.max_width - label_w) // self.width)
        blocks = list(range(0, n, per)) or [0]
        if self.title:
            parts = (
                f" (in {len(blocks)} blocks of columns, to fit {options.max_width} columns)" if len(blocks) > 1 else ""
            )
            yield Text(self.title + parts, style="bold")
        for start in blocks:
            cols = range(start, min(n, start + per))
            table = Table(box=None, padding=(0, 0), show_edge=False, pad_edge=False)
            table.add_column("", justify="right", no_wrap=True, min_width=label_w)
            for j in cols:
                table.add_column(
                    Text(" " + self.col_labels[j], style="bold"), justify="left", no_wrap=True, min_width=self.width
                )
            for i, row_label in enumerate(self.row_labels):
                table.add_row(Text(row_label, style="bold"), *[self.cells[i][j] for j in cols])
            yield table


def heatmap_table(
    matrix,
    row_labels,
    col_labels,
    title: str = "",
    center: float | None = None,
    cell_text: list[list[str]] | None = None,
    cell_width: int | None = None,
) -> Heatmap:
    """A terminal heatmap: one coloured cell per value (percent for probabilities), or the given
    cell texts (e.g. tokens) coloured by the values. ``cell_width``: the least width of a cell."""
    m = torch.as_tensor(matrix).float().cpu()
    lo, hi = _range(m, center)
    numeric = cell_text is None
    if numeric:
        cell_text = [[_cell(m[i, j].item(), lo, hi) for j in range(m.shape[1])] for i in range(m.shape[0])]
        scale = " (cells: percent)" if lo >= 0 and hi <= 1 else ""
    else:
        cell_text = [[show_token(t, LABEL_MAX) for t in row] for row in cell_text]
        scale = ""
    cols = [show_token(str(c), LABEL_MAX) for c in col_labels]
    rows = [show_token(str(r), LABEL_MAX) for r in row_labels]
    # wide enough for the values and the column labels, with a space before each
    width = max([1 + len(t) for row in cell_text for t in row] + [1 + len(c) for c in cols] + [cell_width or 5])
    cells = []
    for i in range(m.shape[0]):
        row = []
        for j in range(m.shape[1]):
            bg = rgb(m[i, j].item(), lo, hi, center is not None)
            core = cell_text[i][j]
            text = " " + (core.rjust(width - 1) if numeric else core.ljust(width - 1))
            row.append(Text(text, style=Style(bgcolor=f"rgb{bg}", color=_ink(bg))))
        cells.append(row)
    return Heatmap(title + scale if title else "", rows, cols, cells, width)


def heatmap_html(
    matrix,
    row_labels,
    col_labels,
    title: str = "",
    center: float | None = None,
    cell_text: list[list[str]] | None = None,
) -> str:
    """The same heatmap as an HTML table (for Jupyter); hovering a cell shows its value."""
    m = torch.as_tensor(matrix).float().cpu()
    lo, hi = _range(m, center)
    esc = html.escape
    head = "".join(
        f"<th style='writing-mode:vertical-rl;font-weight:normal'>{esc(show_token(str(c), 16))}</th>"
        for c in col_labels
    )
    rows = []
    for i, r in enumerate(row_labels):
        tds = []
        for j in range(m.shape[1]):
            v = m[i, j].item()
            bg = rgb(v, lo, hi, center is not None)
            text = esc(show_token(cell_text[i][j], 8)) if cell_text is not None else _cell(v, lo, hi)
            tds.append(
                f"<td title='{v:.4g}' style='background:rgb{bg};color:{_ink(bg)};"
                f"padding:1px 3px;text-align:center;font-size:11px'>{text}</td>"
            )
        rows.append(
            f"<tr><th style='text-align:right;font-weight:normal'>{esc(show_token(str(r), 16))}</th>{''.join(tds)}</tr>"
        )
    cap = f"<caption style='caption-side:top'>{esc(title)}</caption>" if title else ""
    return (
        f"<table style='border-collapse:collapse;font-family:monospace'>{cap}"
        f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def save_heatmap_png(
    matrix,
    row_labels,
    col_labels,
    path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    center: float | None = None,
    cell_text: list[list[str]] | None = None,
) -> None:
    """Write the heatmap as a PNG file (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.as_tensor(matrix).float().cpu().numpy()
    lo, hi = _range(torch.as_tensor(m), center)
    rows, cols = m.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 24), min(1.5 + 0.35 * rows, 24)))
    im = ax.imshow(m, cmap="RdBu_r" if center is not None else "Blues", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(cols), [show_token(str(c), 12) for c in col_labels], rotation=90, fontsize=8)
    ax.set_yticks(range(rows), [show_token(str(r), 12) for r in row_labels], fontsize=8)
    if cell_text is not None:
        for i in range(rows):
            for j in range(cols):
                ax.text(
                    j,
                    i,
                    show_token(cell_text[i][j], 8),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if (m[i, j] - lo) / ((hi - lo) or 1) > 0.6 else "black",
                )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def html_table(headers: list[str], rows: list[list], caption: str = "") -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    cap = f"<caption style='caption-side:top'>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def rich_table(
    headers: list[str], rows: list[list], title: str = "", justify: list[str] | None = None, keep: int = 1
) -> Group:
    """A plain table; its title on its own line above it (a table title wraps to the table's width).
    Too wide for the console, its cells wrap (long ones fold) rather than being cut, except the
    first ``keep`` columns (names), which stay whole on one line."""
    table = Table()
    for i, h in enumerate(headers):
        table.add_column(
            h,
            overflow="fold",
            no_wrap=i < keep,
            justify=(justify or [])[i] if i < len(justify or []) else "left",
        )
    for r in rows:
        table.add_row(*[Text(_fmt(v)) for v in r])
    return Group(Text(title, style="bold"), table) if title else Group(table)


# ----------------------------------------------------------------------------- the cache


def cache_html(cache) -> str:
    rows = [
        [r["name"], str(r["shape"]), r["dtype"], f"{r['mb']:.3f}", r["mean"], r["std"], r["norm"]]
        for r in cache.summary()
    ]
    cap = f"{cache!r}: " + " ".join(show_token(t, 12) for t in cache.labels[:40])
    return html_table(["name", "shape", "dtype", "MB", "mean", "std", "mean norm"], rows, cap)


# ----------------------------------------------------------------------------- metrics


def _effect_rows(e) -> list[list]:
    return [
        [
            i,
            show_token(r["token"], LABEL_MAX),
            show_token(r["base_top"], LABEL_MAX),
            f"{r['base_prob']:.3f} → {r['base_prob'] + r['dprob']:.3f}",
            f"{r['dlogp']:+.3f}",
            f"{r['kl']:.4f}",
            show_token(r["modified_top"], LABEL_MAX),
        ]
        for i, r in enumerate(e.rows())
    ]


EFFECT_HEADERS = ["pos", "token", "base top", "p(base top) → modified", "Δlog p", "KL (nats)", "modified top"]
EFFECT_JUSTIFY = ["right", "left", "left", "left", "right", "right", "left"]
EFFECT_LEGEND = (
    "Δlog p: change of the base top token's log-probability (nats; -0.69 halves it); KL(base || modified) "
    "of the whole next-token distribution. Δlogit, the raw logit's change, is in --json: it can have the "
    "opposite sign, as softmax only sees logits relative to each other."
)


def effect_table(e) -> Group:
    s = e.summary()
    title = "effect of " + ("; ".join(e.interventions) or "nothing")
    p_last = s["last_base_prob"]
    line = Text(
        f"last position: p(base top {show_token(e.top[-1])}) {p_last:.3f} → {p_last + s['last_dprob']:.3f}, "
        f"Δlog p {s['last_dlogp']:+.3f}, KL {s['last_kl']:.4f} nats; over all positions: mean KL "
        f"{s['mean_kl']:.4f} nats (max {s['max_kl']:.4f}), mean Δlog p {s['mean_dlogp']:+.3f}, "
        f"top-1 token unchanged at {s['top1_agreement']:.0%} of positions"
    )
    return Group(
        rich_table(EFFECT_HEADERS, _effect_rows(e), title, EFFECT_JUSTIFY), line, Text(EFFECT_LEGEND, style="dim")
    )


def effect_html(e) -> str:
    s = e.summary()
    cap = (
        "effect of "
        + ("; ".join(e.interventions) or "nothing")
        + f" — mean KL {s['mean_kl']:.4f} nats, mean Δlog p {s['mean_dlogp']:+.3f}, "
        f"top-1 agreement {s['top1_agreement']:.0%}"
    )
    return html_table(EFFECT_HEADERS, _effect_rows(e), cap)


def generation_diff_table(d) -> Table:
    """Side by side; from the first differing token on, the text is marked."""
    k = d.first_divergence
    table = Table(
        title=f"generation, seed {d.seed}: " + ("identical" if k is None else f"differs from token {k}"),
        show_lines=True,
        expand=True,
    )
    table.add_column("unmodified", ratio=1)
    table.add_column("modified: " + "; ".join(d.interventions), ratio=1)

    def marked(tokens: list[str]) -> Text:
        t = Text()
        for i, tok in enumerate(tokens):
            t.append(tok, style="bold red" if k is not None and i >= k else "")
        return t

    table.add_row(marked(d.base_pieces), marked(d.mod_pieces))
    return table


def generation_diff_html(d) -> str:
    k = d.first_divergence
    esc = html.escape

    def marked(tokens):
        return "".join(
            f"<b style='color:#c00'>{esc(t)}</b>" if k is not None and i >= k else esc(t) for i, t in enumerate(tokens)
        )

    head = f"generation, seed {d.seed}: " + ("identical" if k is None else f"differs from token {k}")
    return (
        f"<table><caption style='caption-side:top'>{esc(head)}</caption>"
        f"<tr><th>unmodified</th><th>modified: {esc('; '.join(d.interventions))}</th></tr>"
        f"<tr><td style='white-space:pre-wrap;vertical-align:top'>{marked(d.base_pieces)}</td>"
        f"<td style='white-space:pre-wrap;vertical-align:top'>{marked(d.mod_pieces)}</td></tr></table>"
    )


# ----------------------------------------------------------------------------- logit lens


def _lens_grid(r):
    top1 = [[toks[0] for toks in row] for row in r.top_tokens]
    cols = [f"{show_token(p, 6)}→{show_token(t, 6)}" for p, t in zip(r.positions, r.targets)]
    return top1, cols


def lens_table(r) -> Group:
    top1, _ = _lens_grid(r)
    return heatmap_table(
        r.top_probs[..., 0],
        [f"L{layer}" for layer in r.layers],
        r.positions,
        title="logit lens: each layer's top-1 next token after each input token, coloured by its probability",
        cell_text=top1,
        cell_width=8,
    )


def lens_html(r) -> str:
    top1, cols = _lens_grid(r)
    return heatmap_html(
        r.top_probs[..., 0],
        [f"L{layer}" for layer in r.layers],
        cols,
        title="logit lens: top-1 token per layer (colour: its probability; columns: input → final prediction)",
        cell_text=top1,
    )


# ----------------------------------------------------------------------------- shapes


def _shape_rows(t, step: str) -> list[list]:
    return [
        [r.name, str(r.shape), r.dims, ("MISMATCH " if not r.ok else "") + r.note] for r in t.rows if r.step == step
    ]


SHAPE_HEADERS = ["point", "shape", "named dims", "note"]
SHAPE_TITLES = {
    "prefill": "prefill: the whole prompt in one forward pass, into the KV cache",
    "decode": "decode: one new token, attending to every cached one",
}


def _kv_lines(t) -> list[str]:
    kv = t.kv
    return [
        f"KV cache: k and v each {tuple(kv['shape_k_and_v_each'])} ({kv['dims']}), "
        f"{kv['allocated_bytes'] / 1024:.1f} KiB allocated",
        f"grows by {kv['bytes_per_token']} bytes per token (2 x n_layers x n_kv_heads x head_dim x dtype bytes x B)",
        f"after prefill: {kv['length_after_prefill']} tokens, {kv['used_after_prefill_bytes'] / 1024:.1f} KiB; "
        f"after one decode step: {kv['length_after_decode']} tokens, {kv['used_after_decode_bytes'] / 1024:.1f} KiB",
    ]


def shapes_renderable(t) -> Group:
    c = t.config
    head = Text(
        f"{t.model_name}: {c['family']}, n_layers={c['n_layers']} d_model={c['d_model']} n_heads={c['n_heads']} "
        f"n_kv_heads={c['n_kv_heads']} head_dim={c['head_dim']} d_ff={c['d_ff']} vocab={c['vocab_size']}"
    )
    params = rich_table(["weight", "shape", "dims"], [[n, str(s), d] for n, s, d in t.params], "weights", keep=2)
    steps = [rich_table(SHAPE_HEADERS, _shape_rows(t, step), title, keep=2) for step, title in SHAPE_TITLES.items()]
    return Group(head, params, *steps, *[Text(line) for line in _kv_lines(t)])


def shapes_html(t) -> str:
    params = html_table(["weight", "shape", "dims"], [[n, str(s), d] for n, s, d in t.params], "weights")
    steps = "".join(html_table(SHAPE_HEADERS, _shape_rows(t, step), title) for step, title in SHAPE_TITLES.items())
    return params + steps + "".join(f"<p>{html.escape(line)}</p>" for line in _kv_lines(t))


# ----------------------------------------------------------------------------- induction


def _role_rows(r, others: int = 5) -> list:
    """The named heads (induction, then previous-token), then the heads not named whose ablation
    removes most of the drop."""
    named = [*r.induction_heads, *r.previous_token_heads]
    rows = [r.ablation(h) for h in named]
    rows = [a for a in rows if a is not None]
    rows += [a for a in r.heads if (a.layer, a.head) not in named][:others]
    return rows


def _induction_rows(r) -> list[list]:
    return [
        [
            a.label,
            a.role or "-",
            f"{a.score:.3f}",
            f"{a.prev_score:.3f}",
            f"{a.removed:.1%}",
            f"{a.loss_second:.3f}",
        ]
        for a in _role_rows(r)
    ]


INDUCTION_HEADERS = ["head", "role", "induction score", "prev-token score", "drop removed (ablated)", "loss 2nd"]
INDUCTION_JUSTIFY = ["left", "left", "right", "right", "right", "right"]


def _heads_list(r, heads, key) -> str:
    if not heads:
        return "none"
    parts = []
    for h in heads:
        score = (r.scores if key == "induction" else r.prev_scores)[h].item()
        parts.append(f"{h[0]}.{h[1]} ({score:.2f})")
    return ", ".join(parts)


def induction_summary(r) -> list[str]:
    """The named heads and the circuit, in sentences."""
    induction_min, previous_min = r.thresholds
    lines = [
        f"induction heads (induction score ≥ {induction_min:g}: attend to the token after the earlier occurrence): "
        + _heads_list(r, r.induction_heads, "induction"),
        f"previous-token heads (previous-token score ≥ {previous_min:g}: attend to the token before): "
        + _heads_list(r, r.previous_token_heads, "previous"),
    ]
    # each induction head's main feeder: the earlier previous-token head whose ablation leaves the
    # least of its induction score (a link counts when it takes away at least a quarter of it)
    feeder: dict = {}
    for c in r.circuit:
        if c.kept <= 0.75 and (c.induction_head not in feeder or c.kept < feeder[c.induction_head].kept):
            feeder[c.induction_head] = c
    by_prev: dict = {}
    for c in feeder.values():
        by_prev.setdefault(c.prev_head, []).append(c)
    for prev, links in sorted(by_prev.items(), key=lambda kv: -len(kv[1])):
        links.sort(key=lambda c: -c.score)
        many = len(links) > 1
        lines.append(
            f"circuit: previous-token head {prev[0]}.{prev[1]} feeds induction head{'s' if many else ''} "
            + ", ".join(f"{c.induction_head[0]}.{c.induction_head[1]}" for c in links)
            + f"; with {prev[0]}.{prev[1]} ablated, {'their' if many else 'its'} induction score"
            + ("s fall " if many else " falls ")
            + ", ".join(f"{c.score:.2f} → {c.score_ablated:.2f}" for c in links)
        )
    if not by_prev:
        lines.append(
            "circuit: no previous-token head that the induction heads depend on was found"
            if r.induction_heads
            else "circuit: no head attends inductively in this model"
        )
    return lines


def induction_renderable(r) -> Group:
    head = Text(
        f"{r.n_seqs} sequences of {r.seq_len} random tokens, repeated: mean loss {r.loss_first:.3f} nats on the first "
        f"repeat, {r.loss_second:.3f} on the second (drop {r.drop:.3f}); {r.seconds:.1f} s"
    )
    summary = [Text(line) for line in induction_summary(r)]
    heads = rich_table(
        INDUCTION_HEADERS,
        _induction_rows(r),
        "heads by role, then the other heads whose ablation removes most of the drop (scores: mean attention "
        "from the second repeat)",
        INDUCTION_JUSTIFY,
    )
    layers = heatmap_table(
        torch.tensor([[a.removed for a in r.layers]]),
        ["removed"],
        [str(a.layer) for a in r.layers],
        title="each layer ablated (all heads zeroed): fraction of the drop removed, by layer",
        center=0.0,
    )
    return Group(head, *summary, heads, layers)


def induction_html(r) -> str:
    cap = f"loss first repeat {r.loss_first:.3f}, second {r.loss_second:.3f} nats (drop {r.drop:.3f})"
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in induction_summary(r))
    heads = html_table(INDUCTION_HEADERS, _induction_rows(r), cap)
    scores = heatmap_html(
        r.scores,
        [f"L{layer}" for layer in range(r.scores.shape[0])],
        [f"H{h}" for h in range(r.scores.shape[1])],
        title="attention induction score per head",
    )
    return summary + heads + scores
