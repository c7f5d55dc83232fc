"""A compact SentencePiece-BPE tokenizer for GGUF "llama" vocabularies (``csrc/spm.c``).

``Tokenizer.from_gguf`` used to turn such a vocabulary into a HF ``tokenizers`` BPE, with every
way of writing a piece as two pieces as a merge: Gemma 3's 262k pieces became 515k merges, ~78 MiB
held after the build and a ~280 MiB peak while building. ``SentencePieceBPE`` holds the pieces as
one UTF-8 blob with offsets and a hash table of ids (~6 MiB for Gemma 3) and runs the same BPE in C:
join the adjacent pair whose concatenation is the best-ranked piece until none is left. It gives
the ids and text of the ``tokenizers`` pipeline (``lmlab.tokenizer._sentencepiece_bpe``), and has
the part of ``tokenizers.Tokenizer``'s interface lmlab calls; ``to_tokenizers()`` builds the full
``tokenizers`` object from it when a tokenizer.json must be written.

The C file is compiled once per machine at first use with the system's C compiler (``$CC``, cc,
gcc or clang) into ``~/.lmlab/native/`` (``$LMLAB_HOME/native``), keyed by a hash of the source
and flags. Where there is no compiler or the build fails, ``status()`` says why and
``Tokenizer.from_gguf`` keeps the ``tokenizers`` backend.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from array import array
from pathlib import Path
from typing import NamedTuple

from lmlab.host import c_compiler, cached_library, compile_library

SOURCE = Path(__file__).with_name("csrc") / "spm.c"
FLAGS = ["-O2", "-std=gnu11", "-shared", "-fPIC"]

_lib = None  # the loaded library, False once it has failed
_status = "not built yet"
_lock = threading.Lock()


def _load():
    """The compiled library (built at first use), or False with the reason in ``_status``."""
    global _lib, _status
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        _lib = False
        cc = c_compiler()
        if cc is None:
            _status = "off: no C compiler found (install gcc for the compact SentencePiece tokenizer)"
            return _lib
        key = SOURCE.read_bytes() + " ".join([cc, *FLAGS, platform.machine()]).encode()
        lib, why = cached_library("spm", key, lambda path: compile_library(cc, [FLAGS], [SOURCE], path))
        if lib is None:
            _status = f"off: {why}"
            return _lib
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        lib.spm_new.argtypes = [i32, vp, vp, vp, i32]
        lib.spm_new.restype = vp
        lib.spm_free.argtypes = [vp]
        lib.spm_set_added.argtypes = [vp, vp, vp, i32]
        lib.spm_set_added.restype = i32
        lib.spm_n_distinct.argtypes = [vp]
        lib.spm_n_distinct.restype = i32
        lib.spm_piece_id.argtypes = [vp, ctypes.c_char_p, i64]
        lib.spm_piece_id.restype = i32
        lib.spm_piece.argtypes = [vp, i32, ctypes.POINTER(i64)]
        lib.spm_piece.restype = vp
        lib.spm_flags.argtypes = [vp, i32]
        lib.spm_flags.restype = i32
        lib.spm_piece_at.argtypes = [vp, i32, ctypes.POINTER(i64)]
        lib.spm_piece_at.restype = vp
        lib.spm_scores.argtypes = [vp]
        lib.spm_scores.restype = vp
        lib.spm_set_unk.argtypes = [vp, i32]
        lib.spm_encode.argtypes = [vp, ctypes.c_char_p, i64, vp]
        lib.spm_encode.restype = i64
        lib.spm_decode.argtypes = [vp, vp, i64, i32, vp, i64]
        lib.spm_decode.restype = i64
        _lib, _status = lib, f"on ({Path(lib._name).name})"
        return _lib


def status() -> str:
    """One line: whether the compact SentencePiece tokenizer is in use, or why not."""
    _load()
    return _status


def available() -> bool:
    return bool(_load())


# ----------------------------------------------------------------------------- the backend


class AddedPiece(NamedTuple):
    """An added token as ``get_added_tokens_decoder()`` reports it (tokenizers.AddedToken's fields lmlab reads)."""

    content: str
    special: bool
    normalized: bool = False


class Encoding(NamedTuple):
    ids: list[int]


class SentencePieceBPE:
    """SentencePiece BPE over a vocabulary held in C, with the methods of ``tokenizers.Tokenizer``
    that lmlab calls (encode, encode_batch, decode, id_to_token, token_to_id, get_vocab_size,
    get_vocab, get_added_tokens_decoder, to_str) and the same results.

    pieces: the vocabulary (Gemma's whitespace runs already spelled with "▁"). scores: one per
    piece (GGUF stores float32, kept as float32), or None to rank by vocabulary order (Gemma).
    unk: the unknown piece's spelling, or None to drop characters that have neither a piece nor
    byte pieces. prefix_space: put "▁" in front of the text (Metaspace "first") and strip one
    leading space when decoding. gemma: how ``to_tokenizers`` writes the space rule (a normalizer
    rather than a pre-tokenizer). added: (content, special) in the order ``tokenizers`` adds them
    (the special ones, control tokens, first); a content that is not a piece is skipped.
    """

    def __init__(self, pieces, scores=None, *, unk=None, prefix_space=False, gemma=False, added=()):
        lib = _load()
        if not lib:
            raise RuntimeError(f"the compact SentencePiece tokenizer is {_status}")
        self._lib, self._handle = lib, None
        blob, offsets = bytearray(), array("I", [0])
        for p in pieces:
            blob += p.encode("utf-8")
            offsets.append(len(blob))
        n = len(offsets) - 1
        if n == 0 or len(blob) >= 2**32:
            raise ValueError(f"a vocabulary of {n} pieces and {len(blob)} bytes cannot be held")
        score_buf = array("f", scores) if scores is not None else None
        if score_buf is not None and len(score_buf) != n:
            raise ValueError(f"{len(score_buf)} scores for {n} pieces")
        blob += b"\0"  # never empty, so ctypes can point at it
        blob_ptr = (ctypes.c_char * len(blob)).from_buffer(blob)
        handle = lib.spm_new(
            n,
            ctypes.addressof(blob_ptr),
            offsets.buffer_info()[0],
            score_buf.buffer_info()[0] if score_buf is not None else None,
            int(bool(prefix_space)),
        )
        del blob_ptr, blob, offsets, score_buf
        if not handle:
            raise MemoryError("out of memory while building the SentencePiece vocabulary")
        self._handle = handle
        self.n_pieces = n
        self.gemma, self.prefix_space = bool(gemma), bool(prefix_space)
        self.unk = unk
        self.has_scores = scores is not None
        if unk is not None:
            lib.spm_set_unk(handle, lib.spm_piece_id(handle, *_utf8(unk)))
        ids, special = array("i"), array("B")
        for content, is_special in added:  # a content added twice stays once, special if either was
            i = lib.spm_piece_id(handle, *_utf8(content))
            if i >= 0:
                ids.append(i)
                special.append(bool(is_special))
        if ids and lib.spm_set_added(handle, ids.buffer_info()[0], special.buffer_info()[0], len(ids)) != 0:
            raise MemoryError("out of memory while building the SentencePiece vocabulary")
        self._added_ids, self._added_special = ids, special  # in the order added (to_tokenizers)

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.spm_free(self._handle)
            self._handle = None

    # -- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """Ids of ``text``. add_special_tokens: accepted for ``tokenizers``' signature; there is no
        post-processor, so nothing is added (``Tokenizer.encode`` adds BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        data = text.encode("utf-8")
        out = array("i", bytes(12 * (len(data) + 1)))  # at most 3 ids a byte (spm_encode)
        n = self._lib.spm_encode(self._handle, data, len(data), out.buffer_info()[0])
        if n == -2:
            raise ValueError(f"a text of {len(data)} bytes is too long to encode at once; split it")
        if n < 0:
            raise MemoryError("out of memory while encoding")
        return Encoding(out[:n].tolist())

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids that are no piece are skipped, and ids outside 0..2**32-1 raise
        OverflowError, as ``tokenizers`` does."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= 2**32):
            raise OverflowError("token ids must be in 0..2**32-1")
        buf = array("i", [i if i < 2**31 else -1 for i in ids])
        cap = 8 * len(buf) + 64
        while True:
            out = ctypes.create_string_buffer(cap)
            n = self._lib.spm_decode(
                self._handle, buf.buffer_info()[0], len(buf), int(bool(skip_special_tokens)), out, cap
            )
            if n < 0:
                raise MemoryError("out of memory while decoding")
            if n <= cap:
                return out.raw[:n].decode("utf-8")
            cap = n

    # -- the vocabulary

    def _piece(self, i: int, fn) -> str | None:
        n = ctypes.c_int64()
        ptr = fn(self._handle, i, ctypes.byref(n))
        return ctypes.string_at(ptr, n.value).decode("utf-8") if ptr else None

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        if not 0 <= i < 2**32:
            raise OverflowError("token ids must be in 0..2**32-1")  # as tokenizers
        return self._piece(i, self._lib.spm_piece) if i < self.n_pieces else None

    def token_to_id(self, token: str) -> int | None:
        i = self._lib.spm_piece_id(self._handle, *_utf8(token))
        return i if i >= 0 else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._lib.spm_n_distinct(self._handle)  # every added token is a piece: no extra ids

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        """{piece: id}; a spelling that repeats keeps its last id, as a dict built in order does."""
        return {p: i for i, p in enumerate(self._pieces())}

    def get_added_tokens_decoder(self) -> dict[int, AddedPiece]:
        """{id: AddedPiece}; a token added twice reports the last .special, as tokenizers does."""
        last = dict(zip(self._added_ids, self._added_special))
        return {i: AddedPiece(self.id_to_token(i), bool(last[i])) for i in sorted(last)}

    def _pieces(self) -> list[str]:
        return [self._piece(i, self._lib.spm_piece_at) for i in range(self.n_pieces)]

    # -- the full tokenizers object

    def to_tokenizers(self):
        """The ``tokenizers.Tokenizer`` lmlab built before this backend (merges derived from the
        vocabulary): for writing tokenizer.json. Gemma 3: ~2 s to build, ~70 MiB while it lives."""
        scores = None
        if self.has_scores:
            ptr = self._lib.spm_scores(self._handle)
            scores = [float(s) for s in (ctypes.c_float * self.n_pieces).from_address(ptr)]
        pieces = self._pieces()
        backend = sentencepiece_bpe_backend(
            pieces, scores, unk=self.unk, prefix_space=self.prefix_space, gemma=self.gemma
        )
        del pieces
        add_tokens(backend, [(self.id_to_token(i), bool(s)) for i, s in zip(self._added_ids, self._added_special)])
        return backend

    def to_str(self, pretty: bool = False) -> str:
        """tokenizer.json's text, as ``tokenizers.Tokenizer.to_str`` (builds the full object once)."""
        return self.to_tokenizers().to_str(pretty)


def sentencepiece_bpe_backend(pieces, scores, *, unk, prefix_space: bool, gemma: bool):
    """SentencePiece BPE as a ``tokenizers`` BPE: merges derived from the vocabulary, byte fallback,
    "▁" for spaces (Gemma: a normalizer, no prefix; others: Metaspace, "first" iff prefix_space).
    Raises ValueError when ``tokenizers`` refuses the vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    scores = [float(s) for s in scores] if scores is not None else [-float(i) for i in range(len(pieces))]
    vocab = {t: i for i, t in enumerate(pieces)}
    try:
        model = models.BPE(
            vocab,
            merges_from_vocab(pieces, vocab, scores),
            dropout=None,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:  # noqa: BLE001
        raise ValueError(str(e)) from None
    backend = Backend(model)
    del model, vocab
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
        )
        if prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_vocab(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every way to write a token as two tokens, best token first.

    Order: token score (high first), then the longer left piece, then the longer right piece,
    then vocabulary order; the same order transformers' GGUF loader produces. The candidates are
    held as (distinct spelling, cut) int arrays while they are ranked, not as tuples per merge.
    """
    from array import array

    import numpy as np

    score_of = dict(zip(tokens, scores))  # a duplicated spelling keeps its last score
    spelled = list(dict.fromkeys(tokens))
    us, ks = array("i"), array("i")  # merge j joins spelled[us[j]][:ks[j]] and spelled[us[j]][ks[j]:]
    for order, t in enumerate(spelled):
        for k in range(len(t) - 1, 0, -1):
            if t[:k] in vocab and t[k:] in vocab:
                us.append(order)
                ks.append(k)
    if us:
        u = np.frombuffer(us, dtype=np.int32)
        k = np.frombuffer(ks, dtype=np.int32)
        score = np.array([score_of[t] for t in spelled], dtype=np.float64)[u]
        n = np.array([len(t) for t in spelled], dtype=np.int64)[u]
        # Generation order is token order then longer-left first; with scores falling along the
        # vocabulary (the usual case, and Gemma's) that already is the ranking.
        same = np.diff(score) == 0
        if not (np.all(np.diff(score) <= 0) and np.all(np.diff(u)[same] == 0)):
            idx = np.lexsort((u, -(n - k), -k, -score))
            us, ks = u[idx].tolist(), k[idx].tolist()
    return [(spelled[i][:c], spelled[i][c:]) for i, c in zip(us, ks)]


def add_tokens(backend, added) -> None:
    """Add (content, special) tokens to a ``tokenizers`` backend (``tokenizer._add_special_tokens`` calls it):
    the special ones first, all ``AddedToken(normalized=False)``."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, s in added if s]
    plain = [AddedToken(t, special=False, normalized=False) for t, s in added if not s]
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)


def _utf8(s: str) -> tuple[bytes, int]:
    b = s.encode("utf-8")
    return b, len(b)
