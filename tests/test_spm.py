"""The compact SentencePiece-BPE backend (lmlab.spm, C) against the ``tokenizers`` backend it
replaces: the same ids, text, vocabulary and added tokens on seeded fuzz corpora, for Gemma 3, the
tiny "spm" GGUF of test_tokenizer and random small vocabularies whose scores tie; the fallback when
no C compiler is found; the tokenizer.json written from it; and the memory it holds."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from bundled import gemma3_gguf_path
from lmlab import spm
from lmlab.loading.gguf import GGUFSource
from lmlab.tokenizer import (
    Tokenizer,
    _add_special_tokens,
    _sentencepiece_bpe,
)
from test_tokenizer import TEXT, TINY_TEXT, _tiny_vocab_gguf

pytestmark = pytest.mark.skipif(not spm.available(), reason=f"lmlab.spm is {spm.status()}")

# Characters the fuzz corpus draws from, by script: every one is valid in a str (no lone surrogates).
SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "éèêëàâäçñöüßÆøÅœ",
    "αβγδεζηθλμπσωΩΣ",
    "абвгдежзийклмнопрстуфхцчшщыэюяЖЩЯ",
    "你好世界中文测试日本語のテキストカタカナひらがな한국어문장",
    "العربيةעבריתहिन्दीไทยภาษา",
    "😀🚀👍🏽✨🧪🇫🇷🇯🇵\u200d\ufe0f👨👩👧",
    "\u0301\u0308\u2581\u00a0\u3000\u200b\ufeff\ufffd\x00\x07\x7f\ue000\U0010fffd\U0001d54f",
]
WHITESPACE = [
    " ",
    "  ",
    "   ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    " \n ",
    "\u2581",
    "\u2581\u2581",
]


def fuzz_corpus(seed: int, specials: list[str], n: int = 150) -> list[str]:
    """Seeded random texts: runs of one script, whitespace runs, added tokens' text (whole, cut short
    or doubled), byte-token look-alikes, and words from TEXT."""
    rng = random.Random(seed)
    words = TEXT.split()
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.3:
                parts.append("".join(rng.choice(rng.choice(SCRIPTS)) for _ in range(rng.randint(1, 8))))
            elif r < 0.5:
                parts.append(rng.choice(WHITESPACE))
            elif r < 0.65 and specials:
                s = rng.choice(specials)
                parts.append(rng.choice([s, s[: max(1, len(s) - 1)], s + s, s[1:]]))
            elif r < 0.7:
                parts.append(rng.choice(["<0x41>", "<0xE2>", "<unk>", "<0x+A>", "<s>", "</s>", "<0x0A>"]))
            else:
                parts.append(rng.choice(words))
        texts.append("".join(parts))
    texts += ["", " ", "  ", "\u2581", "a", " a", "\n", "🧪", TEXT, TINY_TEXT]
    return texts


def random_ids(seed: int, backend, n: int = 200) -> list[list[int]]:
    """Id sequences to decode: random ids (byte pieces, specials, out-of-range ids among them)."""
    rng = random.Random(seed)
    size = backend.get_vocab_size(with_added_tokens=True)
    special = sorted(backend.get_added_tokens_decoder())
    byte_ids = [i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]
    out = []
    for _ in range(n):
        ids = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            pool = byte_ids if r < 0.4 and byte_ids else special if r < 0.55 and special else None
            ids.append(rng.choice(pool) if pool else rng.randrange(0, size + 3))
        out.append(ids)
    return out


def assert_same(compact, reference, texts, id_lists):
    """Every method lmlab calls gives the same answer from both backends."""
    for text in texts:
        assert (
            compact.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids
        ), text
    assert [e.ids for e in compact.encode_batch(texts)] == [e.ids for e in reference.encode_batch(texts)]
    for ids in id_lists + [reference.encode(t, add_special_tokens=False).ids for t in texts]:
        for skip in (False, True):
            assert compact.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), ids
    for bad in (-1, 2**32):
        for call in (lambda b: b.decode([bad]), lambda b: b.id_to_token(bad)):
            with pytest.raises(OverflowError):
                call(reference)
            with pytest.raises(OverflowError):
                call(compact)
    assert compact.get_vocab_size(with_added_tokens=True) == reference.get_vocab_size(with_added_tokens=True)
    assert compact.get_vocab() == reference.get_vocab()
    added, ref_added = compact.get_added_tokens_decoder(), reference.get_added_tokens_decoder()
    assert {i: (t.content, t.special) for i, t in added.items()} == {
        i: (t.content, t.special) for i, t in ref_added.items()
    }
    size = reference.get_vocab_size(with_added_tokens=True)
    for i in [*range(min(size, 2000)), size, size + 5]:
        assert compact.id_to_token(i) == reference.id_to_token(i), i
    for token in list(reference.get_vocab())[:2000] + ["", "nope", "<0x41>", "\u2581"]:
        assert compact.token_to_id(token) == reference.token_to_id(token), token


def both_from_gguf(path) -> tuple[Tokenizer, object]:
    """(Tokenizer.from_gguf with the compact backend, the tokenizers backend of the same file)."""
    tok = Tokenizer.from_gguf(path)
    src = GGUFSource(path)
    tokens = src.array("tokenizer.ggml.tokens")
    types = [int(t) for t in src.array("tokenizer.ggml.token_type")]
    reference = _sentencepiece_bpe(src, list(tokens), types)
    _add_special_tokens(reference, tokens, types)
    return tok, reference


@functools.lru_cache(maxsize=1)
def gemma():
    return both_from_gguf(gemma3_gguf_path())


def test_gemma3_matches_tokenizers_backend():
    tok, reference = gemma()
    assert isinstance(tok.backend, spm.SentencePieceBPE) and tok.kind == "sentencepiece"
    specials = [t.content for t in reference.get_added_tokens_decoder().values()][::40] + ["<start_of_turn>", "\n\n"]
    assert_same(tok.backend, reference, fuzz_corpus(0, specials), random_ids(0, reference))
    big = TEXT * 80  # 200 KB in one piece of text: one BPE word for Gemma (no pre-tokenizer)
    assert tok.backend.encode(big).ids == reference.encode(big, add_special_tokens=False).ids


def test_tiny_spm_gguf_matches_tokenizers_backend(tmp_path):
    _tiny_vocab_gguf(tmp_path / "tiny.gguf", "spm")
    tok, reference = both_from_gguf(tmp_path / "tiny.gguf")
    assert isinstance(tok.backend, spm.SentencePieceBPE)
    assert_same(tok.backend, reference, fuzz_corpus(1, ["<|ctl|>", "<s>"]), random_ids(1, reference))


@pytest.mark.parametrize("seed", range(12))
def test_random_vocabularies_match_tokenizers_backend(seed):
    """Small random vocabularies over a few characters, where scores tie (the rank falls to the
    longer left part, the longer right part, then vocabulary order), spellings repeat, byte
    pieces are partly missing (unk, or the character dropped) and the prefix-space rules vary."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "c", "\u2581", "é", "😀"]
    singles = rng.sample(alphabet, rng.randint(3, len(alphabet)))
    pieces = ["<unk>", "<s>", "<ctl>"] + [f"<0x{b:02X}>" for b in range(256) if rng.random() < 0.9]
    pieces += singles
    for _ in range(rng.randint(10, 60)):
        pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))))
    pieces += rng.sample(pieces[3:], 3)  # repeated spellings
    scores = [float(rng.choice([0, -1, -2, -3, -2.5])) for _ in pieces] if seed % 3 else None
    unk = "<unk>" if seed % 2 else None
    gemma, prefix_space = seed % 4 == 0, seed % 4 in (1, 2)
    added = [("<s>", True), ("<ctl>", True), ("ab", False), ("<s>", False)]
    compact = spm.SentencePieceBPE(pieces, scores, unk=unk, prefix_space=prefix_space, gemma=gemma, added=added)
    reference = spm.sentencepiece_bpe_backend(pieces, scores, unk=unk, prefix_space=prefix_space, gemma=gemma)
    spm.add_tokens(reference, [(t, s) for t, s in added if t in pieces])  # _add_special_tokens' filter
    texts = [
        "".join(rng.choice(alphabet + [" ", "  ", "x", "ü", "<s>", "ab", "<ctl>"]) for _ in range(rng.randint(0, 40)))
        for _ in range(300)
    ]
    assert_same(compact, reference, texts, random_ids(seed, reference))
    assert json.loads(compact.to_str()) == json.loads(reference.to_str())


def test_fallback_without_compiler(monkeypatch, tmp_path):
    """No C compiler: the tokenizers backend, with the same ids and text."""
    _tiny_vocab_gguf(tmp_path / "tiny.gguf", "spm")
    compact = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(spm, "c_compiler", lambda: None)
    monkeypatch.setattr(spm, "_lib", None)
    fallback = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    assert "no C compiler" in spm.status()
    assert not isinstance(fallback.backend, spm.SentencePieceBPE)
    texts = fuzz_corpus(2, ["<|ctl|>"], n=50)
    assert [fallback.encode(t) for t in texts] == [compact.encode(t) for t in texts]
    assert fallback.decode(fallback.encode(TINY_TEXT)) == compact.decode(compact.encode(TINY_TEXT))
    assert fallback.tokenizers_backend() is fallback.backend


def test_tokenizer_json_unchanged():
    """What export and training write (tokenizers_backend().to_str()) is the old backend's tokenizer.json."""
    tok, reference = gemma()
    assert tok.tokenizers_backend().to_str() == reference.to_str()


def test_memory_after_build(tmp_path):
    """Building Gemma 3's tokenizer in a fresh process holds under 25 MiB once the GGUF arrays are
    released: the compact vocabulary is ~6 MiB (2.3 MB of piece bytes, offsets, a 2 MiB id table,
    a flag byte per piece) and the Tokenizer's added-token dict ~1 MiB; the rest is allocator
    slack. The tokenizers backend held ~78 MiB."""
    spm.available()  # compiled here, not in the measured process
    script = textwrap.dedent(
        f"""
        import ctypes, gc
        import tokenizers, torch, lmlab
        from lmlab.loading.gguf import GGUFSource
        from lmlab.tokenizer import Tokenizer

        def rss(field="VmRSS:"):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) / 1024

        before = rss()
        src = GGUFSource({gemma3_gguf_path()!r})
        tok = Tokenizer.from_gguf(src)
        src.release_arrays()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(type(tok.backend).__name__, rss() - before, rss("VmHWM:") - before)
        """
    )
    if not os.path.exists("/proc/self/status"):
        pytest.skip("RSS is read from /proc")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    name, held, peak = out.stdout.split()
    assert name == "SentencePieceBPE"
    assert float(held) < 25, f"the tokenizer holds {held} MiB after the build (peak {peak} MiB)"


def test_training_tokenizer_from_gguf_writes_the_old_json(monkeypatch, tmp_path):
    """``--tokenizer FILE.gguf`` (train) and merged exports save the tokenizers object's tokenizer.json."""
    from lmlab.train.tokenizing import build_tokenizer

    _tiny_vocab_gguf(tmp_path / "tiny.gguf", "spm")
    compact = build_tokenizer(str(tmp_path / "tiny.gguf"), [TINY_TEXT])
    monkeypatch.setattr(spm, "c_compiler", lambda: None)
    monkeypatch.setattr(spm, "_lib", None)
    fallback = build_tokenizer(str(tmp_path / "tiny.gguf"), [TINY_TEXT])
    assert compact.to_json() == fallback.to_json()
    assert (
        compact.encode(TINY_TEXT)
        == fallback.encode(TINY_TEXT)
        == Tokenizer.from_gguf(tmp_path / "tiny.gguf").encode(TINY_TEXT, add_special=False)
    )
