"""Reading the models to merge tensor by tensor, and writing the merged HF folder as it is made.

Inputs are whatever lmlab resolves (a name, a HF folder, a GGUF file), read through the loaders'
own sources (``lmlab.loading``): HF tensor names, one tensor at a time. The output is written
straight into safetensors files whose headers are known up front (every tensor's name, dtype and
shape), so each merged tensor goes to disk as soon as it is made and memory stays near one
tensor per input. Every file is written under a temporary name and renamed at the end; a failure
(a full disk, Ctrl-C) removes what was written, so no half-written model is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import LmlabError

SHARD_BYTES = 4 << 30  # a larger model is split into shards of at most this many bytes (HF's index format)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class InputModel:
    """One model to merge: its tensors under HF names, its config.json, where it came from."""

    name: str  # as the user wrote it
    kind: str  # "hf" | "gguf"
    path: Path
    source: object  # .keys() and .get(name, dtype) (lmlab.loading's SafetensorsSource, GGUFSource...)
    config: dict  # config.json as a dict

    def keys(self) -> list[str]:
        return list(self.source.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        src = self.source
        if hasattr(src, "index"):
            return tuple(src.index[name][3])
        if hasattr(src, "tensor_shapes"):
            return tuple(src.tensor_shapes()[name])
        return tuple(src.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype as stored (GGUF's quantized blocks are read as float32)."""
        from lmlab.loading.hf import _ST_DTYPES

        src = self.source
        if hasattr(src, "index"):
            return _ST_DTYPES[src.index[name][2]]
        if hasattr(src, "tensors"):
            return src.tensors[name].dtype
        return torch.float32

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.source.get(name, dtype) if self.kind == "hf" else self.source.get(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
        v = cfg.get("vocab_size")
        return int(v) if v is not None else None

    @property
    def n_layers(self) -> int | None:
        cfg = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if cfg.get(k) is not None:
                return int(cfg[k])
        return None

    def tokenizer(self):
        """lmlab's Tokenizer for this model, or None when it has none."""
        from lmlab.tokenizer import Tokenizer

        if self.kind == "gguf":
            return Tokenizer.from_gguf(self.source)
        if (self.path / "tokenizer.json").is_file():
            return Tokenizer.from_hf_dir(self.path)
        return None


def open_model(name: str) -> InputModel:
    from lmlab.loading.hf import folder_source, read_config_json
    from lmlab.loading.resolve import resolve

    res = resolve(name)
    if res.kind == "gguf":
        from lmlab.loading.gguf import GGUFSource

        src = GGUFSource(res.path)
        return InputModel(str(name), "gguf", res.path, src, src.hf_config())
    if res.kind != "hf":
        raise LmlabError(
            f"{name} is a nanoGPT checkpoint; merge HF folders or GGUF files (export it with `lmlab train` first)."
        )
    return InputModel(str(name), "hf", res.path, folder_source(res.path), read_config_json(res.path))


# ----------------------------------------------------------------------------- output


def disk_full_error(folder: Path, need: int) -> LmlabError:
    return LmlabError(
        f"the disk holding {folder} is full (the merged model needs about {need / 2**20:,.0f} MiB); "
        "free some space or pass another -o folder (nothing half-written was left there)."
    )


def is_disk_full(e: OSError) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


class ModelWriter:
    """Writes an HF model folder: safetensors shards streamed tensor by tensor, then small files.

    ``plan``: (name, shape, dtype) of every tensor, in the order ``add`` will be called.
    Every file goes to ``NAME.tmp`` first; ``commit`` renames them all, ``abort`` deletes them.
    """

    def __init__(self, folder, plan: list[tuple[str, tuple, torch.dtype]], shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        self.plan = plan
        sizes = [int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in plan]
        self.total_bytes = sum(sizes)
        shards: list[list[int]] = [[]]
        acc = 0
        for i, size in enumerate(sizes):
            if shards[-1] and acc + size > shard_bytes:
                shards.append([])
                acc = 0
            shards[-1].append(i)
            acc += size
        n = len(shards)
        self.shard_names = (
            ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._shard_of = {i: k for k, idx in enumerate(shards) for i in idx}
        self._shards = shards
        self._written: list[Path] = []  # temporary files made so far
        self._fh = None
        self._current = -1
        self._next = 0
        self.created_folder = False

    def _tmp(self, name: str) -> Path:
        return self.folder / (name + ".tmp")

    def start(self) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created_folder = True
        free = shutil.disk_usage(self.folder).free
        if free < self.total_bytes + (1 << 20):
            self.abort()
            raise disk_full_error(self.folder, self.total_bytes)

    def _open_shard(self, k: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self._shards[k]:
            name, shape, dtype = self.plan[i]
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        path = self._tmp(self.shard_names[k])
        self._written.append(path)
        self._fh = open(path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)
        self._current = k

    def _write(self, data) -> None:
        self._fh.write(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (it must come in plan order, with the planned shape and dtype)."""
        i = self._next
        want_name, shape, dtype = self.plan[i]
        assert name == want_name and tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, (name, want_name)
        k = self._shard_of[i]
        if k != self._current:
            self._open_shard(k)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def add_file(self, name: str, text: str) -> None:
        path = self._tmp(name)
        self._written.append(path)
        path.write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, name: str) -> None:
        path = self._tmp(name)
        self._written.append(path)
        shutil.copyfile(src, path)

    def commit(self) -> list[Path]:
        """Close the shards, write the index when sharded, and rename every file to its real name."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next != len(self.plan):
            raise RuntimeError(f"{len(self.plan) - self._next} planned tensors were not written")
        if len(self.shard_names) > 1:
            weight_map = {self.plan[i][0]: self.shard_names[self._shard_of[i]] for i in range(len(self.plan))}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2))
        final = []
        for tmp in self._written:
            dest = tmp.with_name(tmp.name[: -len(".tmp")])
            os.replace(tmp, dest)
            final.append(dest)
        self._written = []
        return final

    def abort(self) -> None:
        """Delete every temporary file written (and the folder, if this writer made it and it is empty)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        for p in self._written:
            try:
                p.unlink()
            except OSError:
                pass
        self._written = []
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def tokenizer_files(model: InputModel) -> dict[str, Path | str]:
    """The tokenizer files the merged folder takes from ``model``: file name -> a path to copy or a text.

    A HF folder's files are copied as they are; a GGUF file's tokenizer is rebuilt (lmlab.tokenizer)
    and written as tokenizer.json + tokenizer_config.json.
    """
    if model.kind == "hf":
        return {n: model.path / n for n in TOKENIZER_FILES if (model.path / n).is_file()}
    tok = model.tokenizer()
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "model_max_length": int(model.config.get("max_position_embeddings") or 2048),
    }
    for key, i in (
        ("bos_token", tok.bos_id),
        ("eos_token", (tok.eos_ids or [None])[0]),
        ("pad_token", tok.pad_id),
        ("unk_token", tok.unk_id),
    ):
        if i is not None:
            cfg[key] = tok.id_to_token(i)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    files: dict[str, Path | str] = {
        "tokenizer.json": tok.backend.to_str(),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False),
    }
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids[0] if len(tok.eos_ids) == 1 else tok.eos_ids or None}
    files["generation_config.json"] = json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2)
    return files
