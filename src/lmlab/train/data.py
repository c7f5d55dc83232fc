"""Training data: text in, a memory-mapped token file out, batches of rows from it.

- ``read_corpus``: a text file, a folder of text files, or (by default) the Python standard
  library's source on this machine, as a list of documents. Empty, binary and text-less input
  is refused with one sentence.
- ``split_documents``: about 1.6% of the documents (every 64th) held out for validation.
- ``prepare``: tokenize once into ``$LMLAB_HOME/train-cache/<hash>/{train,val}.bin`` (uint16
  when the vocabulary fits, else uint32) with the tokenizer beside them; the folder name is a
  hash of the documents and the tokenizer spec, so the same data is tokenized once.
- ``Batches``: random rows of ``block_size + 1`` tokens, drawn by a seeded ``torch.Generator``
  whose state is the data position a checkpoint saves. Under DDP every rank draws the same
  global batch and reads only its own slice of the rows from the memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.host import lmlab_home

VAL_EVERY = 64  # every 64th document is held out for validation (1.6%)
MIN_VAL_FRACTION = 0.01  # when documents are too few or too short, the last 1% of the text instead
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "node_modules"}


# ----------------------------------------------------------------------------- reading text


def default_corpus_dir() -> Path:
    """The Python standard library's source folder on this machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_text(raw: bytes) -> str | None:
    """The bytes as text, or None when they look binary (a NUL byte, or not UTF-8)."""
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_corpus(data: str | os.PathLike | None) -> tuple[list[str], str]:
    """(documents, description). A file is one document per blank-line-separated part when it is
    the only file; a folder gives one document per text file (hidden, test and binary files skipped)."""
    if data is None:
        root = default_corpus_dir()
        files = sorted(
            f for f in root.rglob("*.py") if not SKIP_DIRS.intersection(f.relative_to(root).parts[:-1]) and f.is_file()
        )
        docs = [t for t in (_read_text(f) for f in files) if t and t.strip()]
        if not docs:
            raise LmlabError(f"the Python standard library's source ({root}) is not on this machine; pass --data FILE.")
        return docs, f"Python {sysconfig.get_python_version()} standard library source ({len(docs)} files)"
    path = Path(data).expanduser()
    if not path.exists():
        raise LmlabError(f"--data {path} does not exist; pass a text file or a folder of text files.")
    if path.is_file():
        raw = path.read_bytes()
        if not raw.strip():
            raise LmlabError(f"--data {path} is empty; pass a file with text in it.")
        text = _is_text(raw)
        if text is None:
            raise LmlabError(f"--data {path} is a binary file, not UTF-8 text; pass a text file.")
        parts = [p for p in text.split("\n\n") if p.strip()]
        docs = _merge_small(parts)
        return docs, f"{path.name} ({len(raw) / 1e6:.2f} MB)"
    files = sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.parts[-3:]))
    docs = [t for t in (_read_text(f) for f in files) if t and t.strip()]
    if not docs:
        raise LmlabError(
            f"--data {path} has no text files ({len(files)} files, none of them non-empty UTF-8 text); "
            "pass a folder with .txt, .md, .py or other text files."
        )
    return docs, f"{path.name}/ ({len(docs)} text files)"


def _read_text(f: Path) -> str | None:
    try:
        return _is_text(f.read_bytes())
    except OSError:
        return None


def _merge_small(parts: list[str], min_chars: int = 2000) -> list[str]:
    """Join consecutive paragraphs into documents of at least ``min_chars`` (a play's speeches, a
    book's paragraphs), keeping the blank lines between them."""
    docs, cur = [], []
    size = 0
    for p in parts:
        cur.append(p)
        size += len(p)
        if size >= min_chars:
            docs.append("\n\n".join(cur) + "\n\n")
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur) + "\n\n")
    return docs


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): every VAL_EVERY-th document is held out. With fewer than VAL_EVERY
    documents, val is the end of the text: 1% of it, at least 2,000 characters (or a tenth of a
    shorter text)."""
    if len(docs) >= VAL_EVERY:
        val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
        return train, val
    text = "".join(docs)
    n_val = max(1, int(len(text) * MIN_VAL_FRACTION), min(2000, len(text) // 10))
    return [text[:-n_val]], [text[-n_val:]]


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- token cache


@dataclass
class TokenData:
    """The tokenized corpus: train and val token ids as memory maps, and the tokenizer."""

    folder: Path
    train: np.memmap
    val: np.memmap
    tokenizer: "object"  # lmlab.train.tokenizing.TrainTokenizer
    data_hash: str
    description: str
    documents: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) of the val tokens under the train tokens' unigram
        frequencies (add-one smoothed): the loss of a model that ignores context."""
        counts = np.bincount(np.asarray(self.train), minlength=self.vocab_size).astype(np.float64) + 1.0
        p = counts / counts.sum()
        val_counts = np.bincount(np.asarray(self.val), minlength=self.vocab_size).astype(np.float64)
        return float(-(val_counts * np.log(p)).sum() / val_counts.sum())


def prepare(data: str | None, tokenizer_spec: str, *, cache_dir: Path | None = None, log=None) -> TokenData:
    """Read, split and tokenize the data once (cached by the data's and the tokenizer's hash)."""
    from lmlab.train.tokenizing import TrainTokenizer, build_tokenizer

    docs, description = read_corpus(data)
    data_hash = corpus_hash(docs)
    key = hashlib.sha256(f"{data_hash}|{tokenizer_spec}".encode()).hexdigest()[:20]
    folder = (cache_dir or lmlab_home() / "train-cache") / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tok = TrainTokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"), meta["tokenizer"])
            return _open(folder, meta, tok, data_hash, description, len(docs))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: tokenize again
    train_docs, val_docs = split_documents(docs)
    if log:
        log(f"tokenizing {description} with {tokenizer_spec} (once; cached in {folder})")
    tok = build_tokenizer(tokenizer_spec, train_docs)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in (("train", train_docs), ("val", val_docs)):
        ids = tok.encode_documents(part)
        counts[name] = len(ids)
        tmp = folder / f"{name}.bin.tmp"
        np.asarray(ids, dtype=dtype).tofile(tmp)
        os.replace(tmp, folder / f"{name}.bin")
    (folder / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    meta = {"dtype": np.dtype(dtype).name, "tokenizer": tok.meta(), "tokens": counts, "description": description}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return _open(folder, meta, tok, data_hash, description, len(docs))


def _open(folder: Path, meta: dict, tok, data_hash: str, description: str, documents: int) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for name in ("train", "val"):
        n = meta["tokens"][name]
        arrays[name] = np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    return TokenData(folder, arrays["train"], arrays["val"], tok, data_hash, description, documents)


# ----------------------------------------------------------------------------- batches


class Batches:
    """Random rows (x, y) of ``block`` tokens from a token array, the next-token targets beside them.

    ``generator`` decides the row starts of every global batch of ``batch`` rows; this process
    reads rows ``[rank * batch / world, (rank + 1) * batch / world)`` of it. Its state (``state``)
    is the data position: restoring it replays the same batches.
    """

    def __init__(self, tokens: np.ndarray, block: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        if len(tokens) < block + 2:
            raise LmlabError(
                f"the data has {len(tokens)} tokens, too few for --block-size {block}; "
                f"use more text or a smaller --block-size (at most {max(1, len(tokens) - 2)})."
            )
        self.tokens, self.block, self.batch = tokens, block, batch
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        per = batch // world
        self.rows = slice(rank * per, (rank + 1) * per)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch / world, block) int64: this rank's slice of the next global batch."""
        starts = torch.randint(len(self.tokens) - self.block - 1, (self.batch,), generator=self.generator)
        mine = starts[self.rows].tolist()
        rows = np.stack([self.tokens[s : s + self.block + 1] for s in mine]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    @property
    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    @state.setter
    def state(self, value: torch.Tensor) -> None:
        self.generator.set_state(value)
