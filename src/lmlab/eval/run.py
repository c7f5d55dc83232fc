"""Run a task on a model: k-shot prompts in a format, scored item by item.

    result = evaluate(lm, get_task("facts"), shots=3, fmt="base")
    result.metrics      # {"acc": ..., "acc_norm": ..., "n": ...} or {"exact_match": ...}
    result.items        # every item's prompt, answer, prediction, score, log-likelihoods

Formats: ``base`` writes shots and question as one document, as lm-evaluation-harness does
(shots "prompt answer" joined by a blank line; the answer follows the prompt after a space);
``chat`` puts each shot in a user/assistant exchange through the model's chat template;
``fake-chat`` writes the same exchanges as a transcript a base model can continue.

Multiple choice scores each choice's log-likelihood as the continuation of the prompt: ``acc``
takes the highest, ``acc_norm`` the highest per character of the choice (lm-eval's definitions).
Other items generate greedily (or sample ``vote`` answers and take the majority) and compare the
extracted answer to the expected one exactly.
"""

from __future__ import annotations

import collections
import math
import random
import threading
from dataclasses import dataclass, field

from lmlab.engine.prompting import render
from lmlab.errors import LmlabError
from lmlab.eval.backends import LocalBackend, each
from lmlab.eval.tasks import Item, Task, extract_answer

FORMATS = ("base", "chat", "fake-chat")


@dataclass
class EvalResult:
    task: str
    fmt: str
    shots: int
    metrics: dict
    items: list[dict]
    vote_curve: list[tuple[int, float]] = field(default_factory=list)  # (N samples, accuracy of the majority)

    def worst(self, k: int = 5) -> list[dict]:
        """The items the model got most wrong: wrong ones first, by how much the gold choice lost."""

        def margin(row):
            lls = row.get("loglikelihoods")
            if lls:
                return lls[row["gold"]] - max(lls)
            return 0.0 if row["correct"] else -1.0

        return sorted(self.items, key=margin)[:k]


def interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a proportion correct/n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def build_prompt(tokenizer, item: Item, shots: list[Item], fmt: str) -> tuple[str, str, list[str]]:
    """(context text, delimiter before an answer, extra stop strings) for an item with its shots."""
    if fmt == "base":
        parts = [f"{s.prompt} {s.answer}" for s in shots] + [item.prompt]
        return "\n\n".join(parts), " ", []
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": item.prompt})
    text, stops, _ = render(tokenizer, messages, "template" if fmt == "chat" else "fake")
    return text, "" if fmt == "chat" else " ", stops


def evaluate(
    lm,
    task: Task,
    *,
    shots: int = 0,
    fmt: str = "base",
    limit: int | None = None,
    seed: int = 0,
    vote: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 32,
    progress=None,
) -> EvalResult:
    """Score ``task`` on ``lm`` (see the module docstring). ``progress(done, total)`` is called per item."""
    if fmt not in FORMATS:
        raise LmlabError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if shots < 0:
        raise LmlabError(f"-k (shots) must be >= 0, got {shots}.")
    if vote < 1:
        raise LmlabError(f"--vote must be >= 1, got {vote}.")
    if limit is not None and limit < 1:
        raise LmlabError(f"--limit must be >= 1 (items to score), got {limit}.")
    if vote > 1 and task.multiple_choice:
        raise LmlabError("--vote samples answers, so it needs a task without choices (e.g. arithmetic).")
    backend = lm if hasattr(lm, "score") else LocalBackend(lm)
    tok = backend.tokenizer
    if fmt == "chat" and tok is None:
        raise LmlabError(
            "the chat format needs the model's chat template; use --format base or fake-chat with "
            "--endpoint, or evaluate the model in process."
        )
    items = task.items[:limit] if limit else list(task.items)
    if shots >= len(task.items):
        raise LmlabError(f"-k {shots} needs more items than the task has ({len(task.items)}); use fewer shots.")
    rng = random.Random(seed)
    prompts = []
    for i, it in enumerate(items):
        pool = [x for j, x in enumerate(task.items) if j != i]
        prompts.append(build_prompt(tok, it, rng.sample(pool, shots) if shots else [], fmt))
    if task.multiple_choice:
        rows, metrics = _multiple_choice(backend, items, prompts, fmt == "chat", progress)
        curve = []
    else:
        rows, metrics, curve = _generated(
            backend, task, items, prompts, fmt == "chat", vote, temperature, max_new_tokens, seed, progress
        )
    return EvalResult(task.name, fmt, shots, metrics, rows, curve)


def _multiple_choice(backend, items, prompts, chat, progress):
    pairs, owners = [], []
    for i, (it, (ctx, delim, _)) in enumerate(zip(items, prompts)):
        for c in it.choices:
            pairs.append((ctx, delim + c))
            owners.append(i)
    scored = backend.score(pairs, chat=chat)
    by_item = collections.defaultdict(list)
    for i, s in zip(owners, scored):
        by_item[i].append(s)
    rows, acc, acc_norm = [], 0, 0
    for i, (it, (ctx, _, _)) in enumerate(zip(items, prompts)):
        lls = [s.logprob for s in by_item[i]]
        pred = max(range(len(lls)), key=lambda j: lls[j])
        norm = [ll / len(c) for ll, c in zip(lls, it.choices)]
        pred_norm = max(range(len(norm)), key=lambda j: norm[j])
        acc += pred == it.gold
        acc_norm += pred_norm == it.gold
        rows.append(
            {
                "prompt": ctx,
                "answer": it.answer,
                "choices": it.choices,
                "gold": it.gold,
                "prediction": it.choices[pred],
                "correct": pred == it.gold,
                "correct_norm": pred_norm == it.gold,
                "loglikelihoods": lls,
                "greedy": [s.is_greedy for s in by_item[i]],
            }
        )
        if progress:
            progress(i + 1, len(items))
    n = len(items)
    return rows, {
        "acc": acc / n,
        "acc_ci": interval(acc, n),
        "acc_norm": acc_norm / n,
        "acc_norm_ci": interval(acc_norm, n),
        "n": n,
    }


def _generated(backend, task, items, prompts, chat, vote, temperature, max_new_tokens, seed, progress):
    done = [0]
    lock = threading.Lock()

    def answer(i: int) -> tuple[str, list[str] | None]:
        ctx, _, stops = prompts[i]
        stop = task.stop + stops
        (text,) = backend.generate(ctx, max_new_tokens=max_new_tokens, stop=stop, chat=chat)
        samples = None
        if vote > 1:
            samples = backend.generate(
                ctx, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature, n=vote, seed=seed + i, chat=chat
            )
        if progress:
            with lock:
                done[0] += 1
                progress(done[0], len(items))
        return text, samples

    outputs = each(backend, answer, range(len(items)))
    rows, correct = [], 0
    votes_correct = [0] * vote  # after 1..vote samples: majority correct
    for it, (ctx, _, _), (text, samples) in zip(items, prompts, outputs):
        pred = extract_answer(text, task.extract)
        ok = pred == it.answer
        correct += ok
        row = {"prompt": ctx, "answer": it.answer, "output": text, "prediction": pred, "correct": ok}
        if samples is not None:
            answers = [extract_answer(t, task.extract) for t in samples]
            row["samples"] = answers
            for n in range(1, vote + 1):
                votes_correct[n - 1] += majority(answers[:n]) == it.answer
            row["majority"] = majority(answers)
        rows.append(row)
    n = len(items)
    metrics = {"exact_match": correct / n, "exact_match_ci": interval(correct, n), "n": n}
    curve = [(k, votes_correct[k - 1] / n) for k in range(1, vote + 1)] if vote > 1 else []
    if curve:
        metrics["vote"] = vote
        metrics["vote_exact_match"] = curve[-1][1]
        metrics["vote_exact_match_ci"] = interval(votes_correct[-1], n)
    return rows, metrics, curve


def majority(answers: list[str]) -> str:
    """The most common answer; a tie goes to the one given first. Empty answers never win over others."""
    counts = collections.Counter(a for a in answers if a)
    if not counts:
        return ""
    best = max(counts.values())
    return next(a for a in answers if counts.get(a) == best)


def paired_test(a: list[bool], b: list[bool]) -> dict:
    """McNemar's exact test on two models' per-item correctness over the same items: the items
    only A got right, only B got right, and the two-sided p-value that they differ by chance."""
    if len(a) != len(b):
        raise LmlabError("a paired test needs the same items in both runs; run both on the same task and --limit.")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}
