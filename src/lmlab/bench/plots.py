"""Plots of a sweep, as PNG and SVG: tokens/s vs batch size, memory vs sequence length, and a
roofline with every measured point placed against the machine's limits.

Built on ``matplotlib.figure.Figure`` (no pyplot, no global backend): safe in a server or a
test, and the report module can embed the same figures.
"""

from __future__ import annotations

from pathlib import Path

ENGINE_COLORS = {"lmlab": "#1f77b4", "hf": "#ff7f0e", "llama.cpp": "#2ca02c"}
DTYPE_STYLES = {"float32": "-", "bfloat16": "--", "float16": ":"}
PEAK_STYLES = {"float32": ("#444444", "-"), "bfloat16": ("#444444", "--"), "float16": ("#444444", ":")}


def _series_label(p: dict, with_prompt: bool, with_batch: bool = False) -> str:
    parts = [p["engine"], p["dtype"]]
    if p.get("quant") not in (None, "none"):
        parts.append(p["quant"])
    if with_prompt:
        parts.append(f"prompt {p['prompt_len']}")
    if with_batch:
        parts.append(f"batch {p['batch']}")
    return " · ".join(str(x) for x in parts)


def _color(p: dict, palette: dict) -> str:
    key = (p["engine"], p["dtype"])
    if key not in palette:
        base = ENGINE_COLORS.get(p["engine"])
        extra = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#d62728"]
        palette[key] = base if base and base not in palette.values() else extra[len(palette) % len(extra)]
    return palette[key]


def _group(points, key):
    groups: dict = {}
    for p in points:
        groups.setdefault(key(p), []).append(p)
    return groups


def tokens_vs_batch(points: list[dict], title: str = ""):
    """Aggregate decode tokens/s against batch size, a line per engine × dtype (× prompt length)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    several_prompts = len({p["prompt_len"] for p in points}) > 1
    palette: dict = {}
    for key, pts in _group(
        points, lambda p: (p["engine"], p["dtype"], p.get("quant"), p["prompt_len"], p["new_tokens"])
    ).items():
        pts = sorted(pts, key=lambda p: p["batch"])
        ax.plot(
            [p["batch"] for p in pts],
            [p["decode_tok_s"] for p in pts],
            marker="o",
            color=_color(pts[0], palette),
            linestyle=DTYPE_STYLES.get(pts[0]["dtype"], "-"),
            alpha=1.0 if not several_prompts or pts[0]["prompt_len"] == min(q["prompt_len"] for q in points) else 0.6,
            label=_series_label(pts[0], several_prompts),
        )
    batches = sorted({p["batch"] for p in points})
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(title or "decode throughput vs batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def memory_vs_length(points: list[dict], title: str = ""):
    """Peak memory (left) and KV-cache bytes (right) against sequence length (prompt + new tokens);
    colour = engine × dtype, marker = batch size."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax_peak, ax_kv = fig.subplots(1, 2)
    palette: dict = {}
    batches = sorted({p["batch"] for p in points})
    markers = dict(zip(batches, "osD^vP*X" * 4))
    lengths = sorted({p["prompt_len"] + p["new_tokens"] for p in points})
    for key, pts in _group(points, lambda p: (p["engine"], p["dtype"], p.get("quant"), p["batch"])).items():
        pts = sorted(pts, key=lambda p: p["prompt_len"] + p["new_tokens"])
        xs = [p["prompt_len"] + p["new_tokens"] for p in pts]
        color = _color(pts[0], palette)
        style = dict(
            marker=markers[pts[0]["batch"]],
            color=color,
            linestyle=DTYPE_STYLES.get(pts[0]["dtype"], "-"),
            label=_series_label(pts[0], False, len(batches) > 1),
        )
        ax_peak.plot(xs, [p["peak_mem_bytes"] / 2**20 for p in pts], **style)
        ax_kv.plot(xs, [p["kv_cache_bytes"] / 2**20 for p in pts], **style)
    for ax, what in ((ax_peak, "peak memory (MiB)"), (ax_kv, "KV cache (MiB)")):
        if len(lengths) > 1 and lengths[-1] / lengths[0] >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (prompt + new tokens)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    ax_peak.set_title("peak memory (RSS on CPU, max allocated on CUDA)", fontsize="medium")
    ax_kv.set_title("KV cache", fontsize="medium")
    ax_kv.legend(fontsize="x-small")
    fig.suptitle(title or "memory vs sequence length")
    return fig


def roofline(points: list[dict], machine: dict | None, title: str = ""):
    """Achieved FLOP/s against arithmetic intensity (FLOP/byte), under the machine's bandwidth
    slope and matmul-peak ceilings; decode points are circles, prefill points triangles."""
    import math

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    palette: dict = {}
    xs, ys = [], []
    for p in points:
        color = _color(p, palette)
        for kind, marker in (("decode", "o"), ("prefill", "^")):
            x, y = p.get(f"{kind}_intensity"), (p.get(f"{kind}_tflops") or 0) * 1e3  # GFLOP/s
            if x and y:
                ax.scatter([x], [y], color=color, marker=marker, s=28, zorder=3)
                if len(points) <= 12:  # beyond that the labels only cover each other
                    ax.annotate(
                        f"b{p['batch']}·p{p['prompt_len']}",
                        (x, y),
                        fontsize=6,
                        alpha=0.7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
                xs.append(x)
                ys.append(y)
    bw = (machine or {}).get("bandwidth_gb_s")
    peaks = {k: v for k, v in ((machine or {}).get("matmul_gflops") or {}).items() if v}
    dtypes = {p["dtype"] for p in points}
    shown = {k: v for k, v in peaks.items() if k in dtypes} or peaks
    lo = min(xs + [0.1]) / 2
    hi = max(xs + [10.0] + [v / bw for v in shown.values()] if bw else xs + [10.0]) * 2
    if bw:
        # the slanted roof rises until it meets the highest matmul ceiling shown
        top = max(shown.values()) if shown else max(ys + [1.0]) * 2
        x_line = [lo, min(hi, top / bw)]
        ax.plot(
            x_line,
            [bw * x for x in x_line],
            color="#444444",
            linewidth=1.2,
            label=f"bandwidth {bw:.1f} GB/s (fp32 mat-vec)",
        )
    for name, peak in sorted(shown.items()):
        color, style = PEAK_STYLES.get(name, ("#444444", "-."))
        ridge = peak / bw if bw else lo
        ax.plot(
            [ridge, hi],
            [peak, peak],
            color=color,
            linestyle=style,
            linewidth=1.2,
            label=f"{name} matmul peak {peak:,.0f} GFLOP/s",
        )
    # legend entries for the engines and the two kinds of point
    for (engine, dtype), color in palette.items():
        ax.scatter([], [], color=color, marker="s", label=f"{engine} {dtype}")
    ax.scatter([], [], color="black", marker="o", facecolors="none", label="decode")
    ax.scatter([], [], color="black", marker="^", facecolors="none", label="prefill")
    ax.set_xlim(lo, hi)
    if ys or shown:
        ymin = min(ys + [bw * lo if bw else 1.0]) / 2
        ymax = max(ys + list(shown.values()) + [1.0]) * 2
        ax.set_ylim(max(ymin, 1e-3), ymax)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title or "roofline: every point against the machine's limits")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize="x-small", loc="upper left")
    if not math.isfinite(lo):
        ax.set_xlim(auto=True)
    return fig


def sweep_figures(points: list[dict], machine: dict | None, title: str = "") -> dict:
    """name -> matplotlib Figure for the three plots of a sweep."""
    prefix = f"{title}: " if title else ""
    return {
        "tokens_vs_batch": tokens_vs_batch(points, prefix + "decode tokens/s vs batch size"),
        "memory_vs_length": memory_vs_length(points, prefix + "memory vs sequence length"),
        "roofline": roofline(points, machine, prefix + "roofline"),
    }


def write_plots(points: list[dict], machine: dict | None, out_dir, title: str = "") -> list[Path]:
    """Write each plot as PNG and SVG into ``out_dir``; returns the paths written."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in sweep_figures(points, machine, title).items():
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=130 if ext == "png" else None)
            paths.append(path)
    return paths
