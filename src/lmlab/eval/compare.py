"""Compare eval runs: each run's score with its 95% interval, and a paired test of the first two.

    result = compare_runs([store.get(a), store.get(b)])
    result["runs"]         # per run: id, model, task, format, shots, metric, value, ci, n
    result["paired_test"]  # McNemar on the items both runs scored: only_a, only_b, p_value, ...
    compare_figure(result) # a matplotlib Figure: intervals, and the paired outcomes

The interval is Wilson's over the run's number of items. The paired test needs the same items in
both runs (the same task and --limit; the shots and format may differ): it counts the items only
one of the two got right, which is what tells two models apart on one item set, and gives
McNemar's exact two-sided p-value.
"""

from __future__ import annotations

from lmlab.errors import LmlabError
from lmlab.eval.run import paired_test


def compare_runs(records: list[dict]) -> dict:
    """{"runs": [row per run], "paired_test": McNemar of the first two or None} from stored 'eval run' records."""
    if not records:
        raise LmlabError("compare needs at least one eval run id; `lmlab runs list` shows them.")
    rows, correct, answers = [], [], []
    for r in records:
        if r.get("command") != "eval run":
            raise LmlabError(f"run {r['id'][:8]} is a {r.get('command')!r} run; compare takes 'eval run' runs.")
        outputs = r.get("outputs") or {}
        m = outputs.get("metrics") or {}
        key = "acc" if "acc" in m else "exact_match"
        items = outputs.get("items") or []
        correct.append([bool(it["correct"]) for it in items])
        answers.append([it.get("answer") for it in items])
        config = r.get("config") or {}
        rows.append(
            {
                "id": r["id"][:8],
                "model": r.get("model"),
                "task": config.get("task"),
                "format": config.get("format"),
                "shots": config.get("shots"),
                "metric": key,
                "value": m.get(key),
                "ci": list(m[f"{key}_ci"]) if m.get(f"{key}_ci") else None,
                "n": m.get("n"),
            }
        )
    test = None
    if len(records) >= 2:
        if rows[0]["task"] != rows[1]["task"] or answers[0] != answers[1]:
            raise LmlabError(
                f"runs {rows[0]['id']} and {rows[1]['id']} scored different items; a paired test needs the "
                "same task and --limit in both (shots and format may differ)."
            )
        a, b = correct[0], correct[1]
        test = paired_test(a, b)
        test["both_right"] = sum(x and y for x, y in zip(a, b))
        test["both_wrong"] = sum(not x and not y for x, y in zip(a, b))
        test["a"], test["b"] = rows[0]["id"], rows[1]["id"]
    return {"runs": rows, "paired_test": test}


def run_label(row: dict) -> str:
    return f"{row['id']} · {row['model']} · {row['task']} · {row['format']}, {row['shots']}-shot"


def compare_figure(result: dict):
    """A matplotlib Figure (no pyplot): each run's score with its 95% interval, and, when there is
    a paired test, the first two runs' per-item outcomes with McNemar's p-value."""
    from matplotlib.figure import Figure

    rows, test = result["runs"], result.get("paired_test")
    fig = Figure(figsize=(8.0, 1.2 + 0.45 * len(rows)) if not test else (9.0, max(3.0, 1.2 + 0.45 * len(rows))))
    axes = fig.subplots(1, 2, width_ratios=[3, 2]) if test else [fig.add_subplot()]
    ax = axes[0]
    ys = list(range(len(rows)))[::-1]  # the first run on top
    for y, r in zip(ys, rows):
        if r["value"] is None:
            continue
        lo, hi = r["ci"] or (r["value"], r["value"])
        ax.errorbar(
            [r["value"] * 100],
            [y],
            xerr=[[(r["value"] - lo) * 100], [(hi - r["value"]) * 100]],
            fmt="o",
            capsize=4,
            color="#2f5fd0",
        )
        ax.annotate(f"{r['value']:.1%}", (r["value"] * 100, y), textcoords="offset points", xytext=(0, 7), ha="center")
    ax.set_yticks(ys, [f"{r['id']} {r['model']}\n{r['task']} {r['format']} {r['shots']}-shot" for r in rows])
    ax.set_xlim(-2, 102)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    metrics = sorted({r["metric"] for r in rows})
    ax.set_xlabel(f"{' / '.join(metrics)} (%), with 95% interval (Wilson)")
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if test:
        ax2 = axes[1]
        labels = ["both right", f"only {test['a']}", f"only {test['b']}", "both wrong"]
        counts = [test["both_right"], test["only_a"], test["only_b"], test["both_wrong"]]
        bars = ax2.bar(range(4), counts, color=["#8fb3ff", "#2f5fd0", "#d0612f", "#c9ced8"])
        ax2.bar_label(bars)
        ax2.set_ylim(0, max(counts) * 1.2 + 1)  # room for the labels under the title
        ax2.set_xticks(range(4), labels, rotation=20, ha="right", fontsize=8)
        ax2.set_ylabel("items")
        ax2.set_title(f"paired (McNemar): p = {test['p_value']:.3g}", fontsize=10)
        ax2.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig
