"""Evaluation tasks: built-in ones made procedurally (no download), or any JSONL file.

An item is a prompt and an answer, and, for multiple choice, the choices (the answer is one of
them, or its index). Multiple choice is scored on log-likelihood; an item without choices is
scored by generating and extracting the answer (``extract``: the first number, the first line,
or a regex's first group) for an exact match.

Built-in tasks (seeded, so the same items every time):
- ``arithmetic``: "What is 37 + 48?" -> "85" (two- and three-digit sums and differences)
- ``copy``, ``reverse``: repeat or reverse a short list of words
- ``pattern``: continue an arithmetic sequence ("3, 7, 11, 15," -> "19")
- ``sentiment``: few-shot classification of a short review, positive or negative (multiple choice)
- ``facts``: capitals, colours and other common knowledge the small bundled models partly know
  (multiple choice)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError


@dataclass
class Item:
    prompt: str
    answer: str
    choices: list[str] | None = None

    @property
    def gold(self) -> int:
        """The index of the answer among the choices."""
        return self.choices.index(self.answer)


@dataclass
class Task:
    name: str
    items: list[Item]
    extract: str = "first_line"  # for generated answers: "first_number" | "first_line" | "regex:PATTERN"
    description: str = ""
    stop: list[str] = field(default_factory=lambda: ["\n"])

    @property
    def multiple_choice(self) -> bool:
        return bool(self.items) and self.items[0].choices is not None


def extract_answer(text: str, how: str) -> str:
    """The answer a generated text gives, by ``how`` (first_number, first_line, regex:PATTERN)."""
    if how == "first_number":
        m = re.search(r"-?\d[\d,]*(?:\.\d+)?", text)
        return m.group(0).replace(",", "") if m else ""
    if how == "first_line":
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[0] if lines else ""
    if how.startswith("regex:"):
        m = re.search(how[len("regex:") :], text)
        return (m.group(1) if m.groups() else m.group(0)).strip() if m else ""
    raise LmlabError(f"unknown answer extraction {how!r}; use first_number, first_line or regex:PATTERN.")


# ----------------------------------------------------------------------------- built-in tasks

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "light",
    "music",
    "paper",
    "horse",
    "glass",
    "tiger",
    "bread",
    "chair",
    "ocean",
    "pencil",
    "garden",
    "window",
    "silver",
    "candle",
]
POSITIVE = [
    "A wonderful film, I loved every minute.",
    "Great food and friendly staff.",
    "This book is a delight.",
    "Excellent service, highly recommended.",
    "The best concert I have ever seen.",
    "Beautiful and moving.",
    "I am very happy with this phone.",
    "A fantastic, fun day out.",
    "Brilliant acting and a clever plot.",
    "Lovely hotel, we will come back.",
]
NEGATIVE = [
    "A boring film, I hated it.",
    "Cold food and rude staff.",
    "This book is a waste of time.",
    "Terrible service, avoid it.",
    "The worst concert I have ever seen.",
    "Dull and painful to watch.",
    "I am very unhappy with this phone.",
    "An awful, tiring day out.",
    "Bad acting and a silly plot.",
    "Dirty hotel, never again.",
]
FACTS = [
    ("The capital of France is", "Paris", ["Paris", "London", "Berlin", "Madrid"]),
    ("The capital of Japan is", "Tokyo", ["Tokyo", "Beijing", "Seoul", "Bangkok"]),
    ("The capital of Italy is", "Rome", ["Rome", "Paris", "Vienna", "Athens"]),
    ("The capital of Germany is", "Berlin", ["Berlin", "Munich", "Vienna", "Zurich"]),
    ("The capital of Spain is", "Madrid", ["Madrid", "Lisbon", "Barcelona", "Rome"]),
    ("The capital of England is", "London", ["London", "Dublin", "Paris", "Edinburgh"]),
    ("The colour of the sky on a clear day is", "blue", ["blue", "green", "red", "black"]),
    ("The colour of grass is", "green", ["green", "blue", "purple", "orange"]),
    ("The colour of snow is", "white", ["white", "black", "red", "green"]),
    ("A week has seven", "days", ["days", "hours", "years", "months"]),
    ("Water freezes at zero degrees", "Celsius", ["Celsius", "Fahrenheit", "Kelvin", "Newton"]),
    ("The largest planet in the solar system is", "Jupiter", ["Jupiter", "Mars", "Venus", "Mercury"]),
    ("The planet we live on is called", "Earth", ["Earth", "Mars", "Saturn", "Pluto"]),
    ("The opposite of hot is", "cold", ["cold", "warm", "big", "fast"]),
    ("The opposite of up is", "down", ["down", "left", "over", "high"]),
    ("A baby cat is called a", "kitten", ["kitten", "puppy", "calf", "foal"]),
    ("A baby dog is called a", "puppy", ["puppy", "kitten", "lamb", "chick"]),
    ("Bees make", "honey", ["honey", "milk", "silk", "wax paper"]),
    ("The sun rises in the", "east", ["east", "west", "north", "south"]),
    ("The number of legs a spider has is", "eight", ["eight", "six", "four", "ten"]),
]


def _arithmetic(n: int, rng: random.Random) -> list[Item]:
    items = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        op = rng.choice("+-")
        items.append(Item(f"What is {a} {op} {b}?\nAnswer:", str(a + b if op == "+" else a - b)))
    return items


def _copy(n: int, rng: random.Random, reverse: bool) -> list[Item]:
    items = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        verb = "Reverse" if reverse else "Repeat"
        items.append(Item(f"{verb} the words: {' '.join(words)}\nOutput:", " ".join(words[::-1] if reverse else words)))
    return items


def _pattern(n: int, rng: random.Random) -> list[Item]:
    items = []
    for _ in range(n):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + i * step for i in range(5)]
        items.append(Item(", ".join(map(str, seq[:4])) + ",", str(seq[4])))
    return items


def _sentiment(rng: random.Random) -> list[Item]:
    items = [Item(f"Review: {t}\nSentiment:", "positive", ["positive", "negative"]) for t in POSITIVE]
    items += [Item(f"Review: {t}\nSentiment:", "negative", ["positive", "negative"]) for t in NEGATIVE]
    rng.shuffle(items)
    return items


def builtin(name: str, n: int = 50, seed: int = 0) -> Task:
    """A built-in task by name; ``n`` items where the task is generated."""
    rng = random.Random(f"{name}:{seed}")
    if n < 1 and name in ("arithmetic", "copy", "reverse", "pattern"):
        raise LmlabError(f"--items must be >= 1 (items a generated task makes), got {n}.")
    if name == "arithmetic":
        return Task(name, _arithmetic(n, rng), "first_number", "two- and three-digit sums and differences")
    if name in ("copy", "reverse"):
        return Task(name, _copy(n, rng, name == "reverse"), "first_line", f"{name} a short list of words")
    if name == "pattern":
        return Task(name, _pattern(n, rng), "first_number", "the next number of an arithmetic sequence")
    if name == "sentiment":
        return Task(name, _sentiment(rng), description="positive or negative review (multiple choice)")
    if name == "facts":
        items = [Item(p, a, list(c)) for p, a, c in FACTS]
        for it in items:
            rng.shuffle(it.choices)
        return Task(name, items, description="common knowledge (multiple choice)")
    raise LmlabError(f"unknown task {name!r}; use one of {', '.join(BUILTIN)} or a .jsonl file.")


BUILTIN = ("arithmetic", "copy", "reverse", "pattern", "sentiment", "facts")


def load_jsonl(path, extract: str = "first_line") -> Task:
    """A task from a JSONL file: one object per line with ``prompt``, ``answer`` and optional
    ``choices`` (the answer is one of them, or its index). A malformed line is named."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"task file {p} does not exist; pass a .jsonl file or a built-in task ({', '.join(BUILTIN)}).")
    items = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise LmlabError(
                    f'{p}:{n} is not valid JSON; each line must be an object like {{"prompt": "...", "answer": "..."}}.'
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or "answer" not in obj:
                raise LmlabError(
                    f'{p}:{n} needs a "prompt" string and an "answer"; e.g. {{"prompt": "2+2=", "answer": "4"}}.'
                )
            choices, answer = obj.get("choices"), obj["answer"]
            if choices is not None:
                if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise LmlabError(f'{p}:{n} has "choices" that are not a list of at least two strings.')
                if isinstance(answer, int) and not isinstance(answer, bool):
                    if not 0 <= answer < len(choices):
                        raise LmlabError(f"{p}:{n}: answer index {answer} is outside its {len(choices)} choices.")
                    answer = choices[answer]
                elif answer not in choices:
                    raise LmlabError(f"{p}:{n}: the answer {answer!r} is not one of its choices.")
            items.append(Item(obj["prompt"], str(answer), choices))
    if not items:
        raise LmlabError(f"task file {p} has no items; put one JSON object per line.")
    if len({it.choices is None for it in items}) > 1:
        raise LmlabError(f"task file {p} mixes items with and without choices; split it into two tasks.")
    return Task(p.stem, items, extract)


def get_task(name_or_path: str, n: int = 50, seed: int = 0, extract: str | None = None) -> Task:
    if name_or_path in BUILTIN:
        task = builtin(name_or_path, n, seed)
        if extract:
            task.extract = extract
        return task
    return load_jsonl(name_or_path, extract or "first_line")
