"""One Tokenizer for every source: a HF folder's tokenizer.json, or a GGUF file's vocabulary.

The backend is a ``tokenizers.Tokenizer`` (HF's Rust library), so encoding is the same fast code
whatever the source. From a GGUF file the tokenizer is rebuilt from metadata:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges; the pre-tokenizer
  regex is chosen by ``tokenizer.ggml.pre`` as llama.cpp does.
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with scores. The backend is
  ``lmlab.spm.SentencePieceBPE`` (C; Gemma 3: ~6 MiB, not ~70), which joins the best-ranked pair of
  pieces until none joins. ``tokenizers`` needs merges instead, so where no C compiler is found,
  and for writing tokenizer.json (``Tokenizer.tokenizers_backend``), they are derived from the
  vocabulary: every split of a token into two tokens is a merge, ranked by the token's score
  (Gemma: by its position in the vocabulary). Both give the same ids.
- Control tokens (token type 3) become special added tokens and user-defined ones (type 4) plain
  added tokens, so ``<|im_start|>`` in text is one token, as in transformers and llama.cpp.

BOS/EOS are added here, not by the backend's post-processor, so every source behaves the same:
``encode`` prepends BOS iff the model says so (``add_bos``).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

from lmlab.errors import LmlabError

# ----------------------------------------------------------------------------- pre-tokenizer regexes

# Split patterns of the byte-level BPE families, keyed by llama.cpp's tokenizer.ggml.pre names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# llama.cpp's "smollm" (also starcoder, refact...): each digit alone, then GPT-2's regex.
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 are shifted to U+0100 and up, in byte order (so the space 0x20 is 'Ġ')."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    for i, b in enumerate(shifted):
        table[b] = chr(0x100 + i)
    return dict(sorted(table.items()))


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


# ----------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """Text <-> token ids, with the model's special tokens and chat template.

    vocab_size: ids the tokenizer can produce (added tokens included). bos_id/pad_id: None when the
    model has none. eos_ids: every id that ends generation. add_bos: whether ``encode`` prepends BOS.
    """

    def __init__(
        self,
        backend,
        *,
        kind: str = "other",
        bos_id: int | None = None,
        eos_ids=(),
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        source: str = "",
    ):
        self.backend = backend
        self.kind = kind  # "byte_level" | "sentencepiece" | "other": how token_str spells a piece
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.pad_id, self.unk_id = bos_id, pad_id, unk_id
        self.eos_ids = [int(i) for i in eos_ids if i is not None]
        self.add_bos = bool(add_bos and bos_id is not None)
        self.add_eos = bool(add_eos and self.eos_ids)
        self.chat_template = chat_template
        self.source = source
        added = backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_ids = sorted(i for i, t in added.items() if t.special)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids}, "
            f"add_bos={self.add_bos})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    # -- special token strings (for chat templates and display)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    @property
    def pad_token(self) -> str | None:
        return self.id_to_token(self.pad_id) if self.pad_id is not None else None

    @property
    def unk_token(self) -> str | None:
        return self.id_to_token(self.unk_id) if self.unk_id is not None else None

    # -- encode / decode

    def _wrap(self, ids: list[int], add_special: bool) -> list[int]:
        if add_special:
            if self.add_bos:
                ids = [self.bos_id, *ids]
            if self.add_eos:
                ids = [*ids, self.eos_ids[0]]
        return ids

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) stay whole."""
        if not isinstance(text, str):
            raise LmlabError(f"encode() takes a str, not {type(text).__name__}; pass the prompt text.")
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, add_special)

    def encode_batch(self, texts, add_special: bool = True) -> list[list[int]]:
        return [
            self._wrap(e.ids, add_special) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_str(self, i: int) -> str:
        """A readable spelling of one token: 'Ġthe' -> ' the', '▁the' -> ' the', '<0x0A>' -> '\\n'.

        Bytes that are only part of a UTF-8 character show as '\\xe2'.
        """
        i = int(i)
        if i in self._added:
            return self._added[i]
        piece = self.backend.id_to_token(i)
        if piece is None:
            return ""
        if self.kind == "byte_level":
            inv = _byte_of_char()
            if all(c in inv for c in piece):
                return bytes(inv[c] for c in piece).decode("utf-8", errors="backslashreplace")
            return piece
        if self.kind == "sentencepiece":
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                b = int(m.group(1), 16)
                return chr(b) if b < 0x80 else f"\\x{b:02x}"
            return piece.replace("\u2581", " ")
        return self.backend.decode([i])

    def tokenizers_backend(self):
        """The backend as a ``tokenizers.Tokenizer``, for writing tokenizer.json: a GGUF SentencePiece
        vocabulary's compact backend (``lmlab.spm``) builds the full object on each call."""
        to_tokenizers = getattr(self.backend, "to_tokenizers", None)
        return to_tokenizers() if to_tokenizers is not None else self.backend

    def incremental_decoder(self, skip_special: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render a conversation with the model's Jinja chat template, as transformers does.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Extra keyword
        arguments (tools, enable_thinking...) are passed to the template.
        """
        if not self.chat_template:
            raise LmlabError(
                "this model has no chat template (it is a base model); send plain text instead of chat messages."
            )
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise LmlabError(
                "chat messages must be a list of {'role': ..., 'content': ...} dicts; fix the messages argument."
            )
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in specials.items() if v is not None},
                **variables,
            )
        except LmlabError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja2 raises TemplateError, TypeError, UndefinedError...
            msg = str(e).rstrip(".") or type(e).__name__
            raise LmlabError(
                f"the model's chat template refused these messages ({msg}); "
                "fix the roles/order of the messages or send plain text."
            ) from None

    # -- constructors

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """A HF model folder: tokenizer.json, plus tokenizer_config.json / special_tokens_map.json /
        chat_template.jinja / generation_config.json / config.json for special ids and the template."""
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise LmlabError(f"{folder} has no tokenizer.json; download the model's tokenizer files into it.")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
            raise LmlabError(f"{tj} could not be read ({str(e)[:120]}); re-download it.") from None
        tcfg = _read_json(folder / "tokenizer_config.json")
        smap = _read_json(folder / "special_tokens_map.json")
        gen = _read_json(folder / "generation_config.json")
        mcfg = _read_json(folder / "config.json")
        if isinstance(mcfg.get("text_config"), dict):
            mcfg = {**mcfg["text_config"], **{k: v for k, v in mcfg.items() if k.endswith("token_id")}}

        def tok_id(name: str):
            content = _token_content(tcfg.get(name)) or _token_content(smap.get(name))
            return backend.token_to_id(content) if content else None

        bos_id = tok_id("bos_token")
        if bos_id is None:
            bos_id = gen.get("bos_token_id", mcfg.get("bos_token_id"))
        eos_ids = _id_list(gen.get("eos_token_id"))
        if not eos_ids:
            eos_ids = [i for i in [tok_id("eos_token")] if i is not None] or _id_list(mcfg.get("eos_token_id"))
        pad_id = tok_id("pad_token")
        if pad_id is None:
            pad_id = gen.get("pad_token_id", mcfg.get("pad_token_id"))
        if isinstance(pad_id, list):
            pad_id = pad_id[0] if pad_id else None

        # What the backend's post-processor adds (Llama 3 adds BOS there), unless the config says.
        probe_with = backend.encode("a", add_special_tokens=True).ids
        probe_without = backend.encode("a", add_special_tokens=False).ids
        post_adds_bos = len(probe_with) > len(probe_without) and probe_with[0] == bos_id
        post_adds_eos = len(probe_with) > len(probe_without) and probe_with[-1] in eos_ids
        add_bos = tcfg.get("add_bos_token", post_adds_bos)
        add_eos = tcfg.get("add_eos_token", post_adds_eos)

        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        else:
            template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(
            backend,
            kind=_kind_of(backend),
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            unk_id=tok_id("unk_token"),
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=template,
            source=str(folder),
        )

    @classmethod
    def from_gguf(cls, source_or_path) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (from a GGUFSource or a path)."""
        from lmlab.loading.gguf import GGUFSource

        src = source_or_path if isinstance(source_or_path, GGUFSource) else GGUFSource(source_or_path)
        md = src.metadata
        model = md.get("tokenizer.ggml.model")
        tokens = src.array("tokenizer.ggml.tokens")
        if not model or tokens is None:
            raise LmlabError(
                f"{src.path} carries no tokenizer (no tokenizer.ggml.tokens in its metadata); "
                "use a GGUF file converted with its tokenizer."
            )
        types = src.array("tokenizer.ggml.token_type")
        types = [int(t) for t in types] if types is not None and len(types) == len(tokens) else [_NORMAL] * len(tokens)
        if model == "gpt2":
            backend = _byte_level_bpe(src, list(tokens), types)
            kind = "byte_level"
            _add_special_tokens(backend, tokens, types)
        elif model == "llama":
            kind = "sentencepiece"
            backend = _compact_sentencepiece(src, tokens, types)  # its added tokens included
            if backend is None:  # no C compiler: the tokenizers backend, ~10x the memory
                backend = _sentencepiece_bpe(src, list(tokens), types)
                _add_special_tokens(backend, tokens, types)
        else:
            raise LmlabError(
                f"{src.path} uses a {model!r} tokenizer, which lmlab cannot rebuild from GGUF; "
                "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)."
            )
        return cls(
            backend,
            kind=kind,
            bos_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_ids=src.eos_token_ids(),
            pad_id=md.get("tokenizer.ggml.padding_token_id"),
            unk_id=md.get("tokenizer.ggml.unknown_token_id"),
            add_bos=md.get("tokenizer.ggml.add_bos_token", model == "llama"),
            add_eos=md.get("tokenizer.ggml.add_eos_token", False),
            chat_template=md.get("tokenizer.chat_template"),
            source=str(src.path),
        )


# ----------------------------------------------------------------------------- streaming


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces that join exactly into ``decode(all_ids)``.

    ``push(id)`` returns the text that is now complete ('' while a UTF-8 character is split across
    byte tokens); ``flush()`` returns whatever is held back at the end. It decodes a short window
    of recent ids, starting at a token boundary already emitted, so each step costs O(1) and
    decoders that look at context (SentencePiece's leading-space strip) see the same context as a
    full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids[_prefix:_read] are emitted; their text is the window's known prefix

    def _step(self, final: bool) -> str:
        dec = self.tokenizer.decode
        known = dec(self.ids[self._prefix : self._read], self.skip_special)
        text = dec(self.ids[self._prefix :], self.skip_special)
        if len(text) > len(known) and (final or not text.endswith("\ufffd")) and text.startswith(known):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(known) :]
        if final and len(text) > len(known):  # a decoder changed earlier text: emit the tail of the full decode
            self._prefix = self._read = len(self.ids)
            return text[len(known) :]
        return ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True) if self._read < len(self.ids) else ""


# ----------------------------------------------------------------------------- GGUF builders


def _byte_level_bpe(src, tokens: list[str], types: list[int]):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        # Normal tokens are written in GPT-2's byte alphabet; a few files write some raw: respell.
        # Control/user-defined tokens stay as written so they match the text literally.
        if not set(tok) <= alphabet and types[i] not in (_CONTROL, _USER_DEFINED):
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    merges_list = src.array("tokenizer.ggml.merges")
    if merges_list is None:
        raise LmlabError(
            f"{src.path} has a byte-level BPE vocabulary but no tokenizer.ggml.merges; "
            "re-convert it with a current llama.cpp."
        )
    merges = [tuple(m.split(" ", 1)) for m in merges_list]
    try:
        model = models.BPE(
            vocab,
            merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    except Exception as e:  # noqa: BLE001
        raise LmlabError(f"{src.path} has an inconsistent BPE vocabulary ({str(e)[:100]}); re-download it.") from None
    backend = Backend(model)
    pre = src.metadata.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:  # "gpt2", "default" and the rest: GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_spec(src, tokens) -> dict:
    """What a GGUF "llama" vocabulary says, with Gemma's rules applied: the pieces (whitespace-run
    tokens respelled with "▁"), scores (None: vocabulary order), the unknown piece, the prefix space."""
    md = src.metadata
    gemma = src.arch.startswith("gemma")
    # Gemma's GGUF writes its whitespace-run tokens with real spaces; the model matches "▁" runs.
    pieces = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t for t in tokens]
    scores = None  # Gemma's scores do not follow its merge order; its vocabulary order does
    if not gemma:
        raw = src.array("tokenizer.ggml.scores")
        scores = raw if raw is not None and len(raw) == len(pieces) else None
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = pieces[unk_id] if gemma and isinstance(unk_id, int) and 0 <= unk_id < len(pieces) else None
    prefix_space = bool(md.get("tokenizer.ggml.add_space_prefix", not gemma)) and not gemma
    return {"pieces": pieces, "scores": scores, "unk": unk, "prefix_space": prefix_space, "gemma": gemma}


def _sentencepiece_bpe(src, tokens: list[str], types: list[int]):
    """The ``tokenizers`` backend of a GGUF "llama" vocabulary (without its added tokens): the
    fallback where ``lmlab.spm`` cannot be compiled, and the object tokenizer.json is written from."""
    try:
        from lmlab.spm import sentencepiece_bpe_backend

        return sentencepiece_bpe_backend(**_sentencepiece_spec(src, tokens))
    except ValueError as e:
        raise LmlabError(
            f"{src.path} has an inconsistent SentencePiece vocabulary ({str(e)[:100]}); re-download it."
        ) from None


def _compact_sentencepiece(src, tokens, types):
    """The compact C backend (``lmlab.spm``) of a GGUF "llama" vocabulary, or None where it cannot be built."""
    from lmlab import spm

    if not spm.available():
        return None
    try:
        return spm.SentencePieceBPE(**_sentencepiece_spec(src, tokens), added=_added_tokens(tokens, types))
    except (RuntimeError, MemoryError, ValueError):
        return None


def _added_tokens(tokens: list[str], types: list[int]) -> list[tuple[str, bool]]:
    """(content, special) of the tokens added before the model: control ones (special) first, then
    user-defined ones."""
    return [(t, True) for t, k in zip(tokens, types) if k == _CONTROL] + [
        (t, False) for t, k in zip(tokens, types) if k == _USER_DEFINED
    ]


def _add_special_tokens(backend, tokens: list[str], types: list[int]) -> None:
    """The control and user-defined tokens the ``tokenizers`` backend's vocabulary has, added to it."""
    from lmlab.spm import add_tokens

    vocab = backend.get_vocab()
    add_tokens(backend, [(t, special) for t, special in _added_tokens(tokens, types) if t in vocab])


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """A chat template compiled in a sandbox, with the globals HF templates expect."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _kind_of(backend) -> str:
    try:
        spec = backend.decoder.__getstate__() if backend.decoder is not None else b""
        spec = spec.decode() if isinstance(spec, bytes) else str(spec)
    except Exception:  # noqa: BLE001
        spec = ""
    if "ByteLevel" in spec:
        return "byte_level"
    if "ByteFallback" in spec or "Metaspace" in spec or "\u2581" in spec or "\\u2581" in spec:
        return "sentencepiece"
    return "other"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{path} is not valid JSON ({e}); re-download it.") from None
    return data if isinstance(data, dict) else {}


def _token_content(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


__all__ = ["Tokenizer", "IncrementalDecoder", "byte_alphabet"]
