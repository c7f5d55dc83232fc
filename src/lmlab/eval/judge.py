"""A model judging other models' answers, MT-Bench style.

Pairwise: each question's two answers are judged twice, A then B and B then A, since judges
favour a position. A verdict counts for an answer only as the judge gave it; the report gives
the win and tie rates over all verdicts, how often the two orders agree (consistency), and how
many verdicts could not be parsed (never dropped silently: they are counted and listed).

Rubric: one answer at a time, graded 1-10 against a rubric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmlab.engine.prompting import render
from lmlab.errors import LmlabError
from lmlab.eval.backends import each

PAIR_PROMPT = (
    "You are judging two answers to the same question. Decide which answer is more helpful, correct and clear.\n\n"
    "[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    'Reply with exactly one of: "Verdict: A", "Verdict: B" or "Verdict: tie".'
)
RUBRIC_PROMPT = (
    "Grade the answer to the question from 1 (useless) to 10 (excellent), following this rubric:\n{rubric}\n\n"
    '[Question]\n{question}\n\n[Answer]\n{answer}\n\nReply with "Rating: N".'
)
DEFAULT_RUBRIC = "Correct, complete, clear and concise answers score high; wrong or rambling ones score low."


def parse_verdict(text: str) -> str | None:
    """ "A", "B", "tie", or None when the judge's text says none of them plainly."""
    m = re.search(r"verdict\s*:?\s*\**\s*(A|B|tie)\b", text, re.IGNORECASE)
    if m is None:
        m = re.match(r"\s*\**\s*(A|B|tie)\b", text, re.IGNORECASE)
    if m is None:
        return None
    v = m.group(1)
    return "tie" if v.lower() == "tie" else v.upper()


def parse_rating(text: str) -> int | None:
    m = re.search(r"rating\s*:?\s*(\d{1,2})", text, re.IGNORECASE) or re.match(r"\s*(\d{1,2})\b", text)
    if m is None or not 1 <= int(m.group(1)) <= 10:
        return None
    return int(m.group(1))


@dataclass
class PairwiseReport:
    questions: int
    verdicts: list[dict] = field(default_factory=list)  # per question: verdict in each order, raw texts

    def summary(self) -> dict:
        first = [v["ab"] for v in self.verdicts]
        second = [_flip(v["ba"]) for v in self.verdicts]  # in A/B terms
        all_v = first + second
        parsed = [v for v in all_v if v is not None]
        n = len(parsed)
        both = [(x, y) for x, y in zip(first, second) if x is not None and y is not None]
        return {
            "questions": self.questions,
            "verdicts": len(all_v),
            "unparsed": len(all_v) - n,
            "win_rate_a": sum(v == "A" for v in parsed) / n if n else 0.0,
            "win_rate_b": sum(v == "B" for v in parsed) / n if n else 0.0,
            "tie_rate": sum(v == "tie" for v in parsed) / n if n else 0.0,
            "consistency": sum(x == y for x, y in both) / len(both) if both else 0.0,
            "pairs_parsed_both_ways": len(both),
        }


def _flip(v: str | None) -> str | None:
    return {"A": "B", "B": "A"}.get(v, v)


def _ask(backend, text: str, max_new_tokens: int) -> str:
    """The judge's reply to a user message, through its chat template (or a fake-chat transcript)."""
    messages = [{"role": "user", "content": text}]
    tok = backend.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        prompt, stops, _ = render(tok, messages, "template")
        return backend.generate(prompt, max_new_tokens=max_new_tokens, stop=stops, chat=True)[0]
    prompt, stops, _ = render(tok, messages, "fake")
    return backend.generate(prompt, max_new_tokens=max_new_tokens, stop=stops)[0]


def judge_pairs(
    backend, questions: list[str], answers_a: list[str], answers_b: list[str], max_new_tokens: int = 24
) -> PairwiseReport:
    if not (len(questions) == len(answers_a) == len(answers_b)):
        raise LmlabError("the two runs answered different numbers of prompts; judge runs made from the same prompts.")
    if not questions:
        raise LmlabError("there is nothing to judge: the runs have no answers.")
    report = PairwiseReport(len(questions))
    # each pair in both orders: (A shown first, B shown first), the asks in flight together on a server
    asks = []
    for q, a, b in zip(questions, answers_a, answers_b):
        asks += [PAIR_PROMPT.format(question=q, a=a, b=b), PAIR_PROMPT.format(question=q, a=b, b=a)]
    replies = each(backend, lambda text: _ask(backend, text, max_new_tokens), asks)
    for k, q in enumerate(questions):
        ab, ba = replies[2 * k], replies[2 * k + 1]
        report.verdicts.append(
            {"question": q, "ab": parse_verdict(ab), "ba": parse_verdict(ba), "ab_text": ab, "ba_text": ba}
        )
    return report


def judge_rubric(
    backend, questions: list[str], answers: list[str], rubric: str | None = None, max_new_tokens: int = 16
) -> dict:
    asks = [
        RUBRIC_PROMPT.format(rubric=rubric or DEFAULT_RUBRIC, question=q, answer=a) for q, a in zip(questions, answers)
    ]
    replies = each(backend, lambda text: _ask(backend, text, max_new_tokens), asks)
    rows = [{"question": q, "rating": parse_rating(t), "text": t} for q, t in zip(questions, replies)]
    ratings = [r["rating"] for r in rows if r["rating"] is not None]
    return {
        "rows": rows,
        "mean_rating": sum(ratings) / len(ratings) if ratings else None,
        "unparsed": len(rows) - len(ratings),
        "answers": len(rows),
    }
