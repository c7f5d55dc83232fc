"""HTML and Markdown reports: self-contained, escaped, side by side with ratios, plots of series."""

from __future__ import annotations

import re

import pytest

from lmlab.runs import RunStore, record_run
from lmlab.runs.report import render_html, render_markdown

HOSTILE = '<script>alert("x")</script> | `code` ```fence``` <img src="https://evil.example/x.png">'


def _bench_run(speedup: float, dtype_speed: dict) -> dict:
    points = [
        {
            "batch": b,
            "prompt_len": 128,
            "dtype": dt,
            "decode_tok_s": 20.0 * b * speedup * f,
            "prefill_tok_s": 900.0 * b,
            "ttft_ms": 15.0 * b,
            "peak_mem_bytes": 2**20 * (300 + 10 * b),
            "bandwidth_pct": 40.0 + b,
        }
        for b in (1, 2, 4, 8, 16)
        for dt, f in dtype_speed.items()
    ]
    with record_run(
        "bench",
        model="smollm2-135m",
        config={"compile": speedup > 1, "batches": [1, 2, 4, 8, 16]},
        seed=0,
        inputs={"prompt": HOSTILE},
    ) as run:
        run.outputs = {"note": HOSTILE}
        run.add_metrics(decode_tok_s=max(p["decode_tok_s"] for p in points), points=points)
    return RunStore().get(run.id)


@pytest.fixture()
def bench_runs(home):
    return [_bench_run(1.0, {"float32": 1.0, "bfloat16": 1.6}), _bench_run(1.5, {"float32": 1.0, "bfloat16": 1.6})]


def test_html_is_self_contained(bench_runs):
    page = render_html(bench_runs)
    attrs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    assert not [a for a in attrs if a.lower().startswith(("http:", "https:", "//"))]
    assert not re.search(r"<script\b", page, flags=re.I)
    assert not re.search(r"<link\b", page, flags=re.I)
    assert not re.search(r"@import|url\((?!#)", page)  # url(#clip) inside an SVG is local
    assert "<!DOCTYPE svg" not in page and "<?xml" not in page  # the SVGs are inlined, not files


def test_html_escapes_run_text(bench_runs):
    page = render_html(bench_runs)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<img" not in page


def test_html_compares_runs_side_by_side_with_ratios_and_plots(bench_runs):
    a, b = bench_runs
    page = render_html(bench_runs)
    assert a["id"] in page and b["id"] in page
    assert "×1.50" in page  # b's best decode speed over a's
    assert page.count("<svg") == 5  # decode, prefill, TTFT, memory, bandwidth
    for caption in (
        "decode (tokens/s) vs batch",
        "time to first token (ms) vs batch",
        "peak memory (MiB) vs batch",
        "achieved memory bandwidth (% of measured roofline) vs batch",
    ):
        assert caption in page
    assert f"{a['id']} dtype=bfloat16" in page  # one line per run and dtype, named in the legend
    assert '<tr class="diff"><th class="key">compile</th>' in page  # the config that differs is marked
    assert "Package versions" in page and "Host" in page and "torch" in page


def test_single_run_html_without_series_has_no_plots(home):
    with record_run("generate", model="gpt2", config={"temperature": 0.7}) as run:
        run.outputs = {"texts": ["Hello there"]}
        run.add_metrics(decode_tok_s=12.0)
    page = render_html(RunStore().get(run.id))
    assert "<svg" not in page and "Hello there" in page and f"lmlab run {run.id}" in page


def test_failed_run_shows_its_error(home):
    with pytest.raises(RuntimeError):
        with record_run("eval", model="gpt2") as run:
            raise RuntimeError("CUDA out of memory <oom>")
    r = RunStore().get(run.id)
    page, md = render_html(r), render_markdown(r)
    assert "RuntimeError: CUDA out of memory &lt;oom&gt;" in page
    assert "## Errors" in md and "RuntimeError: CUDA out of memory <oom>" in md


def test_markdown_tables_fences_and_escaping(bench_runs):
    a, b = bench_runs
    md = render_markdown(bench_runs)
    assert md.startswith("# lmlab: comparison of 2 runs")
    lines = md.splitlines()
    assert f"|   | {a['id']} | {b['id']} |" in lines
    metric = next(line for line in lines if line.startswith("| decode_tok_s |"))
    assert metric.endswith("(×1.50) |")
    assert "| ≠ compile | no | yes |" in lines
    # The user's text sits in a fence longer than any backtick run inside it, unchanged.
    assert "````text\n" + HOSTILE + "\n````" in md
    # Table cells escape pipes and HTML.
    for line in lines:
        if line.startswith("| ") and "script" in line:
            assert "<script>" not in line
    assert "## Measured points" in md and "| batch | dtype | decode_tok_s | prefill_tok_s |" in md
    assert "same for every point: prompt_len 128" in md  # said once, not as a column


def _one_bench_sweep(home) -> dict:
    """A single bench run whose points look like `lmlab bench`'s (they name an engine)."""
    points = [
        {"engine": "lmlab", "dtype": "float32", "batch": b, "prompt_len": 64, "decode_tok_s": 30.0 * b}
        for b in (1, 2, 4)
    ]
    with record_run("bench", model="gpt2") as run:
        run.metrics = {"points": points, "machine": {"bandwidth_gb_s": 10.0}}
    return RunStore().get(run.id)


def test_single_bench_sweep_embeds_the_bench_modules_own_plots(home, monkeypatch):
    from matplotlib.figure import Figure

    import lmlab.bench.plots as bench_plots

    seen = {}

    def sweep_figures(points, machine, title=""):
        seen["points"], seen["machine"] = points, machine
        fig = Figure()
        fig.add_subplot().set_title("roofline drawn by lmlab.bench")
        return {"roofline": fig}

    monkeypatch.setattr(bench_plots, "sweep_figures", sweep_figures)
    run = _one_bench_sweep(home)
    page = render_html(run)
    assert "<figcaption>roofline drawn by lmlab.bench</figcaption>" in page and page.count("<svg") == 1
    assert seen["machine"] == {"bandwidth_gb_s": 10.0} and len(seen["points"]) == 3


def test_bench_plots_that_fail_fall_back_to_generic_plots(home, monkeypatch):
    import lmlab.bench.plots as bench_plots

    def broken(*a, **k):
        raise KeyError("prompt_len")

    monkeypatch.setattr(bench_plots, "sweep_figures", broken)
    page = render_html(_one_bench_sweep(home))
    assert "<figcaption>decode (tokens/s) vs batch</figcaption>" in page


def test_finetune_and_merge_sections_escape_their_text_and_an_unfinished_run_has_no_after(home):
    """Shapes as `lmlab finetune` records them while it runs (no samples_after, no val_loss_after
    yet: interrupted) and as `lmlab merge` records its comparison; the text is hostile."""
    sample = {"line": 4, "prompt": HOSTILE, "expected": " [x]", "output": "<b>before</b>"}
    with pytest.raises(KeyboardInterrupt):
        with record_run("finetune", model="tiny", config={"lora": "r=4"}) as ft:
            ft.add_metrics(val_loss_before=3.25, points=[{"step": 5, "train_loss": 3.0, "lr": 1e-3}])
            ft.outputs = {"samples_before": [sample], "samples_after": []}
            raise KeyboardInterrupt
    comparison = [{"label": HOSTILE, "model": "m", "perplexity": 9.5, "tokens": 12, "answers": ["<i>hi</i>"]}]
    with record_run("merge", model="merged") as mg:
        mg.outputs = {"files": [], "comparison": comparison, "prompts": ["Say <hi>"]}  # prompts: if recorded
    with RunStore() as store:
        runs = [store.get(ft.id), store.get(mg.id)]
    page = render_html(runs)
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    ba = page[page.index("<h2>Before and after fine-tuning</h2>") : page.index("<h2>Merge comparison</h2>")]
    assert '<td class="num">3.250</td><td class="num">—</td>' in ba  # no held-out loss after: it never finished
    assert "<td><pre>&lt;b&gt;before&lt;/b&gt;</pre></td><td><pre>—</pre></td>" in ba
    mc = page[page.index("<h2>Merge comparison</h2>") : page.index("<h2>Measured points</h2>")]
    assert "&lt;script&gt;" in mc and "<td><pre>&lt;i&gt;hi&lt;/i&gt;</pre></td>" in mc
    assert "<th>&#x27;Say &lt;hi&gt;&#x27; →</th>" in mc  # each answer under its prompt
    assert page.count("<svg") == 1  # the finetune run's loss curve; the merge run has no points
    md = render_markdown(runs)
    assert "## Before and after fine-tuning" in md and "| held-out loss | 3.250 | — |" in md
    assert "| 4 | &lt;script&gt;" in md and "| &lt;b&gt;before&lt;/b&gt; | — |" in md
    assert "## Merge comparison" in md and "| 9.500 | 12 | &lt;i&gt;hi&lt;/i&gt; |" in md
