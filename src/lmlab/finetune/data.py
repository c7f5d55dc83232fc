"""Fine-tuning data: JSONL rows -> token ids and a loss mask, a held-out split, padded batches.

Three row formats (one per line; formats may mix):

- ``{"messages": [{"role", "content"}, ...]}``: a conversation in the model's chat template; the
  loss falls on the assistant turns only (their text and the template's end-of-turn token);
- ``{"prompt": str, "completion": str}``: the loss falls on the completion (and the EOS after it);
- ``{"text": str}``: plain language modelling, the loss on every token.

The mask says which positions' *next-token predictions* count: ``mask[t]`` is 1 when token t
is a trained token, so the loss is the cross-entropy of predicting ids[t] from ids[:t].
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import LmlabError


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token is trained on
    line: int  # the line of the data file it came from (1-based)
    kind: str  # messages | prompt | text
    prompt: object = None  # for samples: the prompt text, or the messages before the last answer
    answer: str = ""  # the expected answer (completion / last assistant turn)


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; one sentence for a bad or empty file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(f"--data {path}: no such file; pass a JSONL file of training rows.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmlabError(f"{path} line {n} is not valid JSON ({e.msg}); fix that line.") from None
            if not isinstance(obj, dict):
                raise LmlabError(
                    f"{path} line {n} is a JSON {type(obj).__name__}, not an object; write "
                    '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}.'
                )
            rows.append((n, obj))
    if not rows:
        raise LmlabError(
            f"{path} is empty; put one JSON object per line: "
            '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}.'
        )
    return rows


def _field_error(path, n: int, msg: str) -> LmlabError:
    return LmlabError(f"{Path(path).name} line {n}: {msg}")


def _need_str(path, n, obj, field) -> str:
    if field not in obj:
        raise _field_error(path, n, f"field {field!r} is missing; add it (a string).")
    if not isinstance(obj[field], str):
        raise _field_error(path, n, f"field {field!r} must be a string, not {type(obj[field]).__name__}; fix it.")
    return obj[field]


def encode_row(tokenizer, obj: dict, n: int, path, max_len: int) -> Example:
    """One row -> an Example; one sentence naming the line and the field when the row is wrong."""
    if "messages" in obj:
        ex = _encode_messages(tokenizer, obj["messages"], n, path)
    elif "prompt" in obj or "completion" in obj:
        prompt = _need_str(path, n, obj, "prompt")
        completion = _need_str(path, n, obj, "completion")
        p_ids = tokenizer.encode(prompt)  # BOS first where the model wants one
        c_ids = tokenizer.encode(completion, add_special=False) + tokenizer.eos_ids[:1]
        ex = Example(p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids), n, "prompt", prompt, completion)
    elif "text" in obj:
        text = _need_str(path, n, obj, "text")
        ids = tokenizer.encode(text) + tokenizer.eos_ids[:1]
        first = 1 if tokenizer.add_bos else 0  # a BOS is given, never predicted
        ex = Example(ids, [0] * first + [1] * (len(ids) - first), n, "text", text[: len(text) // 2], "")
    else:
        raise _field_error(
            path,
            n,
            f"no 'messages', 'prompt'/'completion' or 'text' field (it has {', '.join(map(repr, obj)) or 'none'}); "
            "use one of those formats.",
        )
    ex.mask[0] = 0  # the first token is never predicted
    ex.ids, ex.mask = ex.ids[:max_len], ex.mask[:max_len]
    if not any(ex.mask):
        why = {
            "messages": "it has no assistant turn to learn",
            "prompt": "the completion is empty",
            "text": "the text is empty",
        }[ex.kind]
        if len(ex.ids) == max_len:
            why = f"the trained tokens lie beyond --max-len {max_len}"
        raise _field_error(
            path, n, f"no token of this row would be trained on ({why}); fix the row or raise --max-len."
        )
    return ex


def _encode_messages(tokenizer, messages, n: int, path) -> Example:
    if not isinstance(messages, list) or not messages:
        raise _field_error(path, n, 'field \'messages\' must be a non-empty list of {"role", "content"} objects.')
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise _field_error(path, n, f'message {j} of \'messages\' is not an object; write {{"role", "content"}}.')
        for field in ("role", "content"):
            if field not in m:
                raise _field_error(path, n, f"message {j} of 'messages' has no {field!r} field; add it.")
            if not isinstance(m[field], str):
                raise _field_error(path, n, f"message {j} of 'messages': {field!r} must be a string; fix it.")
    if not tokenizer.chat_template:
        raise _field_error(
            path, n, "'messages' rows need a chat template and this model has none; use prompt/completion rows."
        )
    # The template's text, cut where each assistant turn starts and ends: the prefix of messages
    # [:i] with the generation prompt, and of messages [:i+1] without it. The tokens of each
    # piece are encoded on their own, so the cut never falls inside a token.
    ids, mask, done = [], [], ""
    last_prompt, last_answer = None, ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise _field_error(
                path,
                n,
                "the model's chat template does not render this conversation as a growing text, so the "
                "assistant tokens cannot be found; use prompt/completion rows instead.",
            )
        piece = tokenizer.encode(before[len(done) :], add_special=not done)
        ids += piece
        mask += [0] * len(piece)
        answer = tokenizer.encode(through[len(before) :], add_special=False)
        ids += answer
        mask += [1] * len(answer)
        done = through
        last_prompt, last_answer = messages[:i], m["content"]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full.startswith(done) and len(full) > len(done):
        rest = tokenizer.encode(full[len(done) :], add_special=not done)
        ids += rest
        mask += [0] * len(rest)
    if not ids:
        ids, mask = [0], [0]
    return Example(ids, mask, n, "messages", last_prompt, last_answer)


def load_examples(path, tokenizer, max_len: int = 512) -> list[Example]:
    rows = read_jsonl(path)
    return [encode_row(tokenizer, obj, n, path, max_len) for n, obj in rows]


def data_hash(path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, then ``val_fraction`` of the rows (at least 1) held out."""
    if len(examples) < 2:
        raise LmlabError(
            f"the data has {len(examples)} row; fine-tuning needs at least 2 (one is held out to measure the loss)."
        )
    if not 0 < val_fraction < 1:
        raise LmlabError(f"--val-fraction must be between 0 and 1, got {val_fraction}; use e.g. 0.02.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) padded on the right to the longest row. Right padding needs no
    attention mask: a causal model's real tokens never look at the padding after them, and the
    padding's own positions carry mask 0."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.mask)] = torch.tensor(e.mask, dtype=torch.bool)
    return ids, mask


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The rows of one epoch in a seeded order (the same on a resume)."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def batch_at(train: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The rows of optimiser step ``step``: epochs of ``ceil(n / batch)`` steps, each in its own order."""
    per_epoch = -(-len(train) // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(train), epoch, seed)
    return [train[i] for i in order[k * batch_size : (k + 1) * batch_size]]


def mask_preview(tokenizer, ex: Example, limit: int = 200):
    """A rich Text of one example's tokens, the trained ones coloured, the rest dim."""
    from rich.text import Text

    text = Text()
    for i, m in zip(ex.ids[:limit], ex.mask[:limit]):
        piece = tokenizer.token_str(i)
        text.append(piece, style="bold black on green" if m else "dim")
    if len(ex.ids) > limit:
        text.append(f" … ({len(ex.ids) - limit} more tokens)", style="dim")
    return text
