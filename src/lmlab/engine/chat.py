"""A conversation with a model, kept in the library so a REPL, a server and a test drive the same object.

    chat = lm.chat(system="You are terse.", temperature=0.7)
    for ev in chat.send("What is a transformer?"):      # a ChatTurn: events as they come
        print(ev.text, end="")
    chat.stats.cached_prompt_tokens                      # the next turn reuses this turn's KV cache
    chat.ask("And attention?")                           # the whole answer as a string
    chat.reset()

A ``Chat`` owns the history (system prompt first), the prompt format (the model's chat template,
or a transcript a base model can continue), the sampling settings, the KV cache of the last
answer (a next turn prefills only what the history adds) and context fitting: when the
transcript and an answer would not fit the model's context, the oldest exchanges are dropped.
"""

from __future__ import annotations

from typing import Iterator

from lmlab.engine.generate import Generation, GenerationStats, KVState, TokenEvent
from lmlab.engine.prompting import default_mode, render
from lmlab.engine.sampling import SamplingParams
from lmlab.errors import LmlabError

SETTINGS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "no_repeat_ngram_size",
    "seed",
    "max_new_tokens",
)


class Chat:
    """A conversation: ``send(message)`` answers it, keeping history and cache for the next turn."""

    def __init__(
        self,
        lm,
        *,
        system: str | None = None,
        mode: str | None = None,
        few_shot: str | None = None,
        max_new_tokens: int = 256,
        **sampling,
    ):
        """mode: "template" (the model's chat template), "fake" (a transcript for a base model) or
        None (the template where the model has one). few_shot: example exchanges as text (fake mode)."""
        self.lm, self.system, self.few_shot = lm, system, few_shot
        self.mode = mode or default_mode(lm.tokenizer)
        self.settings: dict = {"max_new_tokens": 256}
        for key, value in {"max_new_tokens": max_new_tokens, **sampling}.items():
            self.set(key, value)
        self.history: list[dict] = []
        self.turns: list[dict] = []  # per answered turn: user, assistant, finish_reason, timings
        self.stats: GenerationStats | None = None  # the last turn's
        self._kv: KVState | None = None  # the last answer's cache: the next turn prefills only what is new
        self.reset()

    def set(self, key: str, value) -> None:
        """Change one setting (a sampling knob or max_new_tokens); a bad value raises LmlabError and changes nothing."""
        if key not in SETTINGS:
            raise LmlabError(f"unknown setting {key!r}; use one of: {', '.join(SETTINGS)}.")
        trial = {**self.settings, key: value}
        max_new = trial.pop("max_new_tokens")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new <= 0:
            raise LmlabError(f"max_new_tokens must be a positive integer, got {max_new!r}; use e.g. 256.")
        SamplingParams(**trial)  # validates
        self.settings[key] = value

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and its cache."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self._kv = None

    def send(self, message: str) -> ChatTurn:
        """Start answering ``message``: a ChatTurn to iterate. The message joins the history now;
        the answer joins it when the turn ends (or is interrupted)."""
        self.history.append({"role": "user", "content": message})
        try:
            text, stops, add_special, dropped = self._fit_context()
            settings = dict(self.settings)
            gen = Generation(
                self.lm,
                text,
                max_new_tokens=settings.pop("max_new_tokens"),
                stop=stops,
                add_special=add_special,
                reuse=self._kv,
                **settings,
            )
        except LmlabError:
            self.history.pop()
            raise
        return ChatTurn(self, gen, message, dropped)

    def ask(self, message: str) -> str:
        """The whole answer to ``message``."""
        turn = self.send(message)
        for _ in turn:
            pass
        return turn.text

    def _fit_context(self) -> tuple[str, list[str], bool, int]:
        """(prompt text, stop strings, add_special, exchanges dropped): the transcript of the
        history, dropping its oldest exchanges (from the history) until it and an answer of
        max_new_tokens fit the model's context."""
        tok, ctx = self.lm.tokenizer, self.lm.config.max_seq_len
        first, dropped = (1 if self.system else 0), 0
        while True:
            text, stops, add_special = render(tok, self.history, self.mode, self.few_shot)
            fits = len(tok.encode(text, add_special=add_special)) + self.settings["max_new_tokens"] <= ctx
            if fits or len(self.history) - first <= 1:  # a lone message that does not fit: Generation says so
                return text, stops, add_special, dropped
            del self.history[first : first + 2]  # the oldest user message and its answer
            dropped += 1

    def _finish(self, turn: ChatTurn) -> None:
        self.history.append({"role": "assistant", "content": turn.text})
        self._kv = turn.generation.kv_state
        self.stats = turn.stats
        self.turns.append(
            {
                "user": turn.message,
                "assistant": turn.text,
                "finish_reason": turn.finish_reason,
                "timings": turn.stats.as_dict(),
            }
        )


class ChatTurn:
    """One answer as it is generated. Iterate it for TokenEvents; when it ends, or is interrupted,
    ``text`` is the answer and it joins the chat's history."""

    def __init__(self, chat: Chat, generation: Generation, message: str, dropped: int):
        self.chat, self.generation, self.message = chat, generation, message
        self.dropped_exchanges = dropped  # oldest exchanges left out so this turn fits the context
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def stats(self) -> GenerationStats:
        return self.generation.stats

    def __iter__(self) -> Iterator[TokenEvent]:
        pieces = []
        try:
            for ev in self.generation:
                pieces.append(ev.text)
                yield ev
        finally:  # also on Ctrl-C: what was said so far is the answer
            self.text = "".join(pieces).strip()
            self.finish_reason = self.generation.results()[0].finish_reason
            self.chat._finish(self)
