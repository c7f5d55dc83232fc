"""The tokenizers a training run can use, each a HF ``tokenizers`` backend that is saved as the
output folder's tokenizer.json, so ``lmlab.load`` and transformers read the same one.

- ``char``: one token per character seen in the training text (nanoGPT's Shakespeare), plus
  ``<unk>`` for characters only the validation text has.
- ``bytes``: one token per byte (256 tokens, GPT-2's byte alphabet, no merges).
- ``bpe:N``: a byte-level BPE of N tokens trained on the training text, with ``<|endoftext|>``
  between documents.
- any model name or folder lmlab loads: that model's tokenizer (its end-of-sequence token
  between documents).
"""

from __future__ import annotations

import json

import numpy as np

from lmlab.errors import LmlabError

UNK = "<unk>"
EOT = "<|endoftext|>"


class TrainTokenizer:
    """A ``tokenizers.Tokenizer`` and what training needs to know about it."""

    def __init__(self, backend, kind: str, spec: str, *, eos_id: int | None = None, bos_id: int | None = None):
        self.backend, self.kind, self.spec = backend, kind, spec
        self.eos_id, self.bos_id = eos_id, bos_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._char_table = None

    # -- encoding

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """Token ids of the documents one after another (int64), EOS after each where the tokenizer has one."""
        if self.kind == "bytes":
            return np.frombuffer("".join(docs).encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if self.kind == "char":
            return self._encode_chars("".join(docs))
        parts = []
        for start in range(0, len(docs), 256):
            for enc in self.backend.encode_batch(docs[start : start + 256], add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=np.int64))
                if self.eos_id is not None:
                    parts.append(np.asarray([self.eos_id], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _encode_chars(self, text: str) -> np.ndarray:
        """Characters -> ids with a lookup table over code points (fast for megabytes of text)."""
        if self._char_table is None:
            vocab = self.backend.get_vocab()
            unk = vocab[UNK]
            top = max(ord(c) for c in vocab if len(c) == 1) + 1
            table = np.full(top, unk, dtype=np.int64)
            for c, i in vocab.items():
                if len(c) == 1:
                    table[ord(c)] = i
            self._char_table = (table, unk)
        table, unk = self._char_table
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        out = np.full(points.shape, unk, dtype=np.int64)
        known = points < len(table)
        out[known] = table[points[known]]
        return out

    def encode(self, text: str) -> list[int]:
        return (
            self.encode_documents([text]).tolist()
            if self.kind in ("char", "bytes")
            else self.backend.encode(text, add_special_tokens=False).ids
        )

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    # -- saving

    def to_json(self) -> str:
        return self.backend.to_str()

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_json(cls, text: str, meta: dict) -> "TrainTokenizer":
        from tokenizers import Tokenizer

        return cls(
            Tokenizer.from_str(text), meta["kind"], meta["spec"], eos_id=meta.get("eos_id"), bos_id=meta.get("bos_id")
        )

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.backend.id_to_token(i)

    def hf_files(self, model_max_length: int) -> dict[str, str]:
        """The tokenizer files of a HF model folder: tokenizer.json and tokenizer_config.json."""
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        for name, i in (("eos_token", self.eos_id), ("bos_token", self.bos_id)):
            if i is not None:
                cfg[name] = self.token(i)
        if self.kind == "char":
            cfg["unk_token"] = UNK
        return {"tokenizer.json": self.to_json(), "tokenizer_config.json": json.dumps(cfg, indent=2)}


def build_tokenizer(spec: str, train_docs: list[str]) -> TrainTokenizer:
    """The tokenizer named by ``spec`` (char | bytes | bpe:N | a model), trained on ``train_docs`` where it learns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if spec == "char":
        chars = sorted(set().union(*(set(d) for d in train_docs)))
        vocab = {c: i for i, c in enumerate(chars)}
        vocab[UNK] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
        backend.decoder = decoders.Fuse()
        return TrainTokenizer(backend, "char", spec)
    if spec == "bytes":
        from lmlab.tokenizer import byte_alphabet

        vocab = {c: b for b, c in byte_alphabet().items()}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return TrainTokenizer(backend, "bytes", spec)
    if spec.startswith("bpe:") or spec == "bpe":
        try:
            n = int(spec.partition(":")[2])
        except ValueError:
            n = 0
        if not 257 <= n <= 1 << 20:
            raise LmlabError(f"--tokenizer {spec!r} needs a vocabulary size from 257 to 1048576; use e.g. bpe:4096.")
        from tokenizers import trainers

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=n,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(train_docs, trainer=trainer)
        return TrainTokenizer(backend, "bpe", spec, eos_id=backend.token_to_id(EOT))
    return _model_tokenizer(spec)


def _model_tokenizer(spec: str) -> TrainTokenizer:
    """The tokenizer of a model lmlab can load (an alias, a HF folder, a .gguf file, a hub id)."""
    from lmlab.loading.resolve import resolve
    from lmlab.tokenizer import Tokenizer

    try:
        res = resolve(spec)
    except LmlabError as e:
        raise LmlabError(
            f"--tokenizer {spec!r} is neither char, bytes, bpe:N nor a model lmlab can load ({e})"
        ) from None
    if res.kind == "gguf":
        tok = Tokenizer.from_gguf(res.path)
    elif res.kind == "hf":
        tok = Tokenizer.from_hf_dir(res.path)
    else:
        raise LmlabError(f"--tokenizer {spec}: a nanoGPT checkpoint has no tokenizer of its own; use --tokenizer gpt2.")
    eos = tok.eos_ids[0] if tok.eos_ids else None
    return TrainTokenizer(tok.tokenizers_backend(), "model", spec, eos_id=eos, bos_id=tok.bos_id)
