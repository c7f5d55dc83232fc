"""Turning a conversation into the text a model continues.

Instruct models were trained on their chat template. A base model never saw one: it continues
documents. To make it act as an assistant, write the conversation as a document it knows how to
continue (a transcript with "User:" / "Assistant:" turns, optionally after a few worked examples),
and stop when it starts writing the user's next turn.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError

FAKE_CHAT_HEADER = (
    "The following is a conversation between a user and a helpful, knowledgeable assistant. "
    "The assistant answers clearly and concisely.\n\n"
)
# Two example exchanges, used when no --few-shot file is given: a base model copies the
# pattern it sees (answer, then stop), which a header alone does not teach it.
FAKE_CHAT_EXAMPLES = (
    "User: What is the capital of France?\n"
    "Assistant: The capital of France is Paris. It is also the largest city in the country.\n\n"
    "User: How many legs does a spider have?\n"
    "Assistant: A spider has eight legs. Insects have six, which is one way to tell them apart.\n\n"
)
FAKE_CHAT_STOPS = ["\nUser:", "\nUSER:", "\n\nUser"]


def read_few_shot(path) -> str:
    """The few-shot examples file, as text to put before the conversation."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"few-shot file {p} does not exist; pass a text file of example exchanges.")
    text = p.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise LmlabError(f"few-shot file {p} is empty; put a few example exchanges in it.")
    return text + "\n\n"


def render(tokenizer, messages: list[dict], mode: str, few_shot: str | None = None) -> tuple[str, list[str], bool]:
    """(prompt text, stop strings, add_special) for a conversation.

    mode: "template" (the model's chat template), "fake" (a transcript a base model can
    continue), "raw" (the last user message as-is, for base-model completion).
    """
    if mode == "template":
        if tokenizer is None or not tokenizer.chat_template:
            raise LmlabError("this model has no chat template; use --fake-chat to prompt a base model as an assistant.")
        # the template writes BOS and the other special tokens itself
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True), [], False
    if mode == "fake":
        lines = [FAKE_CHAT_HEADER + (FAKE_CHAT_EXAMPLES if few_shot is None else few_shot)]
        for m in messages:
            role = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
            lines.append(f"{role}: {m['content'].strip()}\n")
        lines.append("Assistant:")
        return "".join(lines), list(FAKE_CHAT_STOPS), True
    if mode == "raw":
        user = [m["content"] for m in messages if m["role"] == "user"]
        return (few_shot or "") + (user[-1] if user else ""), [], True
    raise LmlabError(f"unknown prompt format {mode!r}; use template, fake or raw.")


def default_mode(tokenizer) -> str:
    """Instruct models (with a chat template) get their template; base models the fake chat."""
    return "template" if tokenizer is not None and tokenizer.chat_template else "fake"
