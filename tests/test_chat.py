"""lmlab.engine.chat.Chat: history, KV-cache reuse, context fitting, settings, interrupted answers."""

import pytest

import lmlab
from lmlab.errors import LmlabError
from tiny import make_tiny, save_char_tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny llama with a one-character-per-token tokenizer and room for a fake-chat transcript."""
    d = tmp_path_factory.mktemp("tiny_chat")
    make_tiny("llama", d, max_position_embeddings=1024)
    save_char_tokenizer(d)
    return lmlab.load(d)


def new_chat(lm, **kw):
    # ignore_eos is not a chat setting: greedy answers of a fixed length come from a random model
    # whatever its EOS, since the fake-chat stops are strings it is unlikely to write in 6 tokens,
    # and every assertion below holds for an answer of any length.
    return lm.chat(mode="fake", max_new_tokens=6, temperature=0, **kw)


def test_a_second_turn_reuses_the_first_turns_cache_and_reset_drops_it(lm):
    chat = new_chat(lm, system="Be brief.")
    first = chat.ask("hello")
    assert chat.stats.cached_prompt_tokens == 0
    assert chat.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
    ]
    chat.ask("and again")
    # the second transcript starts with the first prompt: its keys and values are not computed again
    assert chat.stats.cached_prompt_tokens > 0
    assert chat.stats.prompt_tokens > chat.stats.cached_prompt_tokens
    chat.reset()
    assert chat.history == [{"role": "system", "content": "Be brief."}]
    chat.ask("third")
    assert chat.stats.cached_prompt_tokens == 0
    assert [t["user"] for t in chat.turns] == ["hello", "and again", "third"]
    assert all(t["finish_reason"] in ("eos", "stop", "length") for t in chat.turns)


def test_a_reused_cache_answers_what_a_fresh_chat_answers(lm):
    chat = new_chat(lm)
    chat.ask("hello")
    again = chat.ask("and again")
    fresh = new_chat(lm)
    fresh.history = [dict(m) for m in chat.history[:-1]]  # the same transcript, no cache to reuse
    fresh.history.pop()
    assert fresh.ask("and again") == again
    assert fresh.stats.cached_prompt_tokens == 0


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(lm):
    chat = new_chat(lm, system="S")
    for i in range(3):
        chat.history += [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y" * 200}]
    turn = chat.send("the newest question")
    for _ in turn:
        pass
    assert turn.dropped_exchanges >= 1
    assert chat.history[0] == {"role": "system", "content": "S"}  # the system prompt is never dropped
    assert chat.history[-2] == {"role": "user", "content": "the newest question"}
    assert chat.stats.prompt_tokens + 6 <= lm.config.max_seq_len


def test_settings_are_checked_and_a_bad_one_changes_nothing(lm):
    chat = new_chat(lm)
    chat.set("temperature", 0.5)
    assert chat.settings["temperature"] == 0.5
    before = dict(chat.settings)
    with pytest.raises(LmlabError, match="top_p"):
        chat.set("top_p", 1.5)
    with pytest.raises(LmlabError, match="max_new_tokens"):
        chat.set("max_new_tokens", 0)
    with pytest.raises(LmlabError, match="unknown setting"):
        chat.set("warmth", 1)
    assert chat.settings == before


def test_a_message_too_long_for_the_context_is_refused_and_not_kept(lm):
    chat = new_chat(lm)
    with pytest.raises(LmlabError, match="context"):
        chat.send("z" * 2000)
    assert chat.history == []


def test_an_interrupted_answer_keeps_what_was_said(lm):
    chat = lm.chat(mode="fake", max_new_tokens=50, temperature=0)
    turn = chat.send("hello")
    got = []
    for ev in turn:
        got.append(ev.text)
        if len(got) == 3:
            break  # the caller stops reading (a client that went away, or Ctrl-C)
    assert turn.text == "".join(got).strip()
    assert chat.history[-1] == {"role": "assistant", "content": turn.text}
    assert turn.finish_reason in ("interrupted", "eos", "stop", "length")
