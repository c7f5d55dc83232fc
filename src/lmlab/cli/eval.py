"""`lmlab eval`: perplexity, tasks (log-likelihood and generated answers), majority vote, compare."""

from __future__ import annotations

from pathlib import Path

import typer

from lmlab.cli.common import err, load_model, model_opt, one_model, out, print_json, quant_opt
from lmlab.errors import LmlabError

eval_app = typer.Typer(help="Evaluate: perplexity, tasks, majority vote, comparisons.", no_args_is_help=True)
DEFAULT_MODEL = "smollm2-135m"
# options every command that can evaluate a served model takes
ENDPOINT = typer.Option(None, "--endpoint", help="An OpenAI-compatible server's URL instead of a local model.")
API_KEY = typer.Option(None, "--api-key", help="Bearer key for --endpoint.")
CONCURRENCY = typer.Option(4, "--concurrency", help="Requests in flight with --endpoint.")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise LmlabError(f"data file {path} does not exist; pass a text file to score.")
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise LmlabError(f"{path} looks binary; pass a text file.")
    return raw.decode("utf-8", errors="replace")


@eval_app.command("perplexity")
def perplexity_cmd(
    model: str = typer.Argument(None, help="Model name, folder or file (with --endpoint: the served name)."),
    model_option: str = model_opt(),
    data: Path = typer.Option(..., "--data", help="Text file to score."),
    window: int = typer.Option(None, "--window", help="Tokens per window (default: the context, at most 1024)."),
    stride: int = typer.Option(None, "--stride", help="Tokens between window starts; = window: disjoint, as lm-eval."),
    surprising: int = typer.Option(10, "--surprising", help="Show this many highest-loss tokens."),
    endpoint: str = ENDPOINT,
    api_key: str = API_KEY,
    concurrency: int = CONCURRENCY,
    dtype: str = typer.Option("float32"),
    quant: str = quant_opt(),
    json_out: bool = typer.Option(False, "--json"),
    no_record: bool = typer.Option(False, "--no-record"),
):
    """Perplexity of a text (token, word and byte perplexity, bits per byte), with the most surprising tokens."""
    from lmlab.eval.perplexity import perplexity, perplexity_endpoint
    from lmlab.runs import record_run

    given = one_model(model, model_option)  # two different ones are refused before anything is read
    text = _read_text(data)
    backend = _endpoint(endpoint, given, api_key, concurrency)
    model = backend.name if backend else given or DEFAULT_MODEL
    lm = None if backend else load_model(model, dtype, quant=quant)
    config = {"data": str(data), "window": window, "stride": stride, "dtype": dtype, "quant": quant}
    config["endpoint"] = endpoint
    with record_run(
        "eval perplexity", model=model, config=config, record=not no_record, inputs={"data": str(data)}
    ) as run:
        res = perplexity_endpoint(backend, text) if backend else perplexity(lm, text, window, stride)
        summary = res.summary()
        run.add_metrics(**{k: v for k, v in summary.items() if isinstance(v, (int, float))})
        worst = res.most_surprising(lm.tokenizer, surprising) if lm is not None else []
        run.outputs = {"token_losses": res.losses, "surprising": worst}
    if json_out:
        print_json({"model": model, **summary, "surprising": worst, "run_id": run.id})
        return
    how = {
        "strided": "strided windows (transformers' method)",
        "disjoint": "disjoint windows (lm-eval's rolling log-likelihood)",
        "endpoint": f"pieces sent to {endpoint} (echoed prompt log-probabilities)",
    }[res.method]
    out.print(f"{model} on {data.name}: {res.tokens} tokens in {how}, window {res.window}, stride {res.stride}")
    out.print(
        f"  perplexity {res.perplexity:.3f} · word perplexity {res.word_perplexity:.3f} · "
        f"byte perplexity {res.byte_perplexity:.4f} · bits per byte {res.bits_per_byte:.4f}"
    )
    if worst:
        out.print("most surprising tokens (loss in nats):")
        for i, piece, loss in worst:
            out.print(f"  #{i:<6} {piece!r:<20} {loss:6.2f}", markup=False)
    err.print(f"{res.tokens_per_s:.0f} tokens/s · {res.seconds:.1f} s")


@eval_app.command("run")
def run_cmd(
    model: str = typer.Argument(None, help="Model name, folder or file."),
    model_option: str = model_opt(),
    task: str = typer.Option(
        ...,
        "--task",
        help="A built-in task (arithmetic, copy, reverse, pattern, sentiment, "
        "facts) or a .jsonl file of {prompt, answer, choices?}.",
    ),
    shots: int = typer.Option(0, "-k", "--shots", help="Examples before each question, chosen with --seed."),
    fmt: str = typer.Option("base", "--format", help="base, chat or fake-chat."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N items."),
    items: int = typer.Option(50, "--items", help="Items a generated built-in task has."),
    extract: str = typer.Option(None, "--extract", help="first_number, first_line or regex:PATTERN."),
    vote: int = typer.Option(1, "--vote", help="Sample N answers and take the majority (generated tasks)."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature for --vote."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    plot: Path = typer.Option(None, "--plot", help="With --vote: write accuracy against N as a PNG."),
    endpoint: str = ENDPOINT,
    api_key: str = API_KEY,
    concurrency: int = CONCURRENCY,
    dtype: str = typer.Option("float32"),
    quant: str = quant_opt(),
    json_out: bool = typer.Option(False, "--json"),
    no_record: bool = typer.Option(False, "--no-record"),
):
    """Score a task: multiple choice on log-likelihood (acc, acc_norm) or generated answers (exact match)."""
    from lmlab.eval.run import evaluate
    from lmlab.eval.tasks import get_task
    from lmlab.runs import record_run

    given = one_model(model, model_option)  # two different ones are refused before anything is read
    t = get_task(task, items, seed, extract)
    backend = _endpoint(endpoint, given, api_key, concurrency)
    model = backend.name if backend else given or DEFAULT_MODEL
    lm = backend or load_model(model, dtype, quant=quant)
    config = {
        "endpoint": endpoint,
        "task": t.name,
        "shots": shots,
        "format": fmt,
        "limit": limit,
        "vote": vote,
        "temperature": temperature,
        "seed": seed,
        "dtype": dtype,
        "quant": quant,
    }
    with record_run(
        "eval run", model=model, config=config, seed=seed, record=not no_record, inputs={"task": task}
    ) as run:
        res = evaluate(
            lm,
            t,
            shots=shots,
            fmt=fmt,
            limit=limit,
            seed=seed,
            vote=vote,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )
        run.add_metrics(**{k: v for k, v in res.metrics.items() if isinstance(v, (int, float))})
        run.outputs = {"items": res.items, "vote_curve": res.vote_curve, "metrics": res.metrics}
    if plot and res.vote_curve:
        _plot_votes(res, plot)
    if json_out:
        print_json(
            {
                "model": model,
                "endpoint": endpoint,
                "task": t.name,
                "format": fmt,
                "shots": shots,
                "metrics": res.metrics,
                "vote_curve": res.vote_curve,
                "run_id": run.id,
            }
        )
        return
    m = res.metrics
    if "acc" in m:
        out.print(
            f"{model} · {t.name} · {fmt}, {shots}-shot · {m['n']} items: acc {_pct(m['acc'], m['acc_ci'])} · "
            f"acc_norm {_pct(m['acc_norm'], m['acc_norm_ci'])}"
        )
    else:
        out.print(
            f"{model} · {t.name} · {fmt}, {shots}-shot · {m['n']} items: "
            f"exact match {_pct(m['exact_match'], m['exact_match_ci'])}"
        )
    for n, acc in res.vote_curve:
        if n in (1, 3, 5) or n == res.vote_curve[-1][0]:
            out.print(f"  majority of {n:>2} samples at T={temperature:g}: {acc:.1%}")
    if res.vote_curve:
        best = max(a for _, a in res.vote_curve)
        if best <= m["exact_match"]:
            out.print(f"  voting did not beat the greedy answer ({m['exact_match']:.1%}) on these items.")
    worst = [r for r in res.worst(3) if not r["correct"]]
    if worst:
        err.print("worst items:")
        for r in worst:
            err.print(f"  expected {r['answer']!r}, got {r['prediction']!r} · {r['prompt'][-60:]!r}", markup=False)


def _endpoint(url, model, api_key, concurrency):
    """The server backend for --endpoint (MODEL names the served model; None picks the first)."""
    if not url:
        return None
    from lmlab.eval.backends import EndpointBackend

    return EndpointBackend(url, model, api_key, concurrency)


def _pct(p: float, ci) -> str:
    return f"{p:.1%} (95% CI {ci[0]:.0%}-{ci[1]:.0%})"


def _plot_votes(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ns, accs = zip(*res.vote_curve)
    ax.plot(ns, accs, marker="o", label="majority of N samples")
    ax.axhline(res.metrics["exact_match"], color="grey", linestyle="--", label="greedy, one answer")
    ax.set_xlabel("samples (N)")
    ax.set_ylabel("exact match")
    ax.set_title(f"{res.task}: majority vote")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    err.print(f"wrote {path}")


@eval_app.command("compare")
def compare_cmd(
    runs: list[str] = typer.Argument(..., help="Eval run ids (prefixes, 'last', 'last-2')."),
    json_out: bool = typer.Option(False, "--json"),
    no_record: bool = typer.Option(False, "--no-record"),
):
    """A table of eval runs with 95% intervals, and a paired test of the first two on the same items.

    The comparison is recorded as a run; `lmlab runs export ID --html` draws it."""
    from rich.table import Table

    from lmlab.eval.compare import compare_runs
    from lmlab.runs import RunStore, record_run

    store = RunStore()
    records = [store.get(store.resolve_id(rid)) for rid in runs]  # before this run is recorded: 'last' is theirs
    result = compare_runs(records)
    rows, test = result["runs"], result["paired_test"]
    ids = [r["id"] for r in records]
    with record_run(
        "eval compare",
        model=", ".join(dict.fromkeys(str(r["model"]) for r in rows)),
        config={"runs": ids},
        inputs={"runs": ids},
        record=not no_record,
    ) as run:
        run.outputs = result
        run.add_metrics(**{f"{r['metric']}_{r['id']}": r["value"] for r in rows if r["value"] is not None})
        if test:
            run.add_metrics(**{k: test[k] for k in ("only_a", "only_b", "both_right", "both_wrong", "p_value")})
    if json_out:
        print_json({**result, "run_id": run.id})
        return
    t = Table(title="eval runs")
    for col in ("run", "model", "task", "format", "k", "metric", "value", "95% CI", "n"):
        t.add_column(col, overflow="fold")
    for r in rows:
        ci = f"{r['ci'][0]:.0%}-{r['ci'][1]:.0%}" if r["ci"] else ""
        t.add_row(
            r["id"],
            str(r["model"]),
            str(r["task"]),
            str(r["format"]),
            str(r["shots"]),
            r["metric"],
            f"{r['value']:.1%}" if r["value"] is not None else "",
            ci,
            str(r["n"]),
        )
    out.print(t)
    if test:
        out.print(
            f"paired (McNemar, same items): only {test['a']} right {test['only_a']}, only {test['b']} "
            f"right {test['only_b']}, both {test['both_right']}, neither {test['both_wrong']}, "
            f"p = {test['p_value']:.3g}"
        )
    if run.id:
        err.print(f"recorded as run {run.id[:8]}; lmlab runs export {run.id[:8]} --html draws it")


def _answers(store, rid: str) -> tuple[str, list[str], list[str]]:
    """(run id, prompts, answers) of a generate or chat run."""
    r = store.get(store.resolve_id(rid))
    inputs, outputs = r.get("inputs") or {}, r.get("outputs") or {}
    if r["command"] == "chat":
        turns = outputs.get("turns") or []
        return r["id"], [t["user"] for t in turns], [t["assistant"] for t in turns]
    prompts, texts = inputs.get("prompts"), outputs.get("texts")
    if r["command"] != "generate" or not prompts or texts is None:
        raise LmlabError(
            f"run {rid} is not a generate or chat run with answers; judge runs of lmlab generate "
            "--prompts FILE (or lmlab chat)."
        )
    per = max(1, len(texts) // len(prompts))  # -n samples per prompt: judge the first
    return r["id"], list(prompts), [texts[i * per] for i in range(len(prompts))]


@eval_app.command("judge")
def judge_cmd(
    runs: list[str] = typer.Option(..., "--runs", help="Two generate runs on the same prompts (one with --rubric)."),
    judge: str = typer.Option(DEFAULT_MODEL, "--judge", help="The judging model (with --endpoint: the served name)."),
    rubric: Path = typer.Option(None, "--rubric", help="Grade each answer 1-10 by this rubric instead of pairs."),
    endpoint: str = ENDPOINT,
    api_key: str = API_KEY,
    concurrency: int = CONCURRENCY,
    dtype: str = typer.Option("float32"),
    quant: str = quant_opt(),
    json_out: bool = typer.Option(False, "--json"),
    no_record: bool = typer.Option(False, "--no-record"),
):
    """A model judges two runs' answers pairwise, each pair in both orders (or grades answers by a rubric)."""
    from lmlab.eval.backends import LocalBackend
    from lmlab.eval.judge import judge_pairs, judge_rubric
    from lmlab.runs import RunStore, record_run

    store = RunStore()
    sides = [_answers(store, r) for r in runs]
    if rubric is None and len(sides) != 2:
        raise LmlabError(f"pairwise judging takes two runs (--runs A --runs B), got {len(sides)}; or pass --rubric.")
    rubric_text = _read_text(rubric) if rubric else None
    served = None if judge == DEFAULT_MODEL else judge  # --judge left as it is: the server's first model
    backend = _endpoint(endpoint, served, api_key, concurrency) or LocalBackend(load_model(judge, dtype, quant=quant))
    judge = backend.name if endpoint else judge
    config = {"runs": [s[0] for s in sides], "judge": judge, "rubric": str(rubric) if rubric else None}
    with record_run("eval judge", model=judge, config=config, record=not no_record) as run:
        if rubric_text is not None:
            result = {s[0][:8]: judge_rubric(backend, s[1], s[2], rubric_text) for s in sides}
            run.outputs = result
            for rid, r in result.items():
                run.add_metrics(**{f"mean_rating_{rid}": r["mean_rating"] or 0.0, f"unparsed_{rid}": r["unparsed"]})
        else:
            (ida, qa, aa), (idb, qb, ab) = sides
            if qa != qb:
                raise LmlabError(
                    "the two runs answered different prompts; judge runs made from the same --prompts file."
                )
            report = judge_pairs(backend, qa, aa, ab)
            result = report.summary()
            run.outputs = {"summary": result, "verdicts": report.verdicts}
            run.add_metrics(**result)
    if json_out:
        print_json({"judge": judge, "result": result, "run_id": run.id})
        return
    if rubric_text is not None:
        for rid, r in result.items():
            mean = f"{r['mean_rating']:.2f}" if r["mean_rating"] is not None else "–"
            out.print(f"run {rid}: mean rating {mean} over {r['answers']} answers; {r['unparsed']} not parsed")
        return
    out.print(
        f"{result['questions']} questions, {result['verdicts']} verdicts (each pair judged in both orders): "
        f"A wins {result['win_rate_a']:.0%}, B wins {result['win_rate_b']:.0%}, ties {result['tie_rate']:.0%}"
    )
    out.print(
        f"consistent under the swap: {result['consistency']:.0%} of {result['pairs_parsed_both_ways']} pairs; "
        f"verdicts not parsed: {result['unparsed']} (kept in the run record)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
