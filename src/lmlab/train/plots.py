"""Loss curves: one figure with every run's train loss (line) and validation loss (dots)."""

from __future__ import annotations


def curves(points: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one loss in a run's points."""
    pts = [(p["step"], p[key]) for p in points if isinstance(p, dict) and isinstance(p.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def loss_figure(series: list[tuple[str, list[dict]]], title: str = "loss"):
    """A matplotlib Figure overlaying each (label, points) pair's train and val loss against step."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(7.0, 3.6))
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(series):
        colour = f"C{i}"
        x, y = curves(points, "train_loss")
        if x:
            ax.plot(x, y, color=colour, linewidth=1.4, alpha=0.85, label=f"{label} train")
        x, y = curves(points, "val_loss")
        if x:
            ax.plot(x, y, color=colour, linestyle="--", marker="o", markersize=3.5, linewidth=1.2, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    return fig


def save_loss_plot(series: list[tuple[str, list[dict]]], path, title: str = "loss") -> None:
    """Write the loss figure as PNG or SVG (by the file's suffix)."""
    fig = loss_figure(series, title)
    fig.savefig(str(path), dpi=130, bbox_inches="tight")
