"""Checkpoints: written atomically, read back with weights_only=True, checked against the run.

A checkpoint is one ``torch.save`` dict: the model's and the optimiser's state, the step, the
train config, the model config, the tokenizer, the RNG states (torch's, the data sampler's),
the loss curve and samples so far. It is written to ``checkpoint.pt.tmp``, flushed to disk,
then renamed over ``checkpoint.pt``: a crash or a full disk at any moment leaves the previous
checkpoint whole, and no half-written file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmlab.errors import LmlabError, write_failure

CHECKPOINT = "checkpoint.pt"
# Train config fields a resumed run may change: how long, how often it reports, how it runs.
RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "eval_iters",
    "log_every",
    "sample_every",
    "sample_tokens",
    "save_every",
    "compile",
    "device",
    "workers",
    "out",
}


def checkpoint_path(target: str | os.PathLike) -> Path:
    """The checkpoint file of ``--resume TARGET`` (an output folder or the file itself)."""
    p = Path(target).expanduser()
    return p / CHECKPOINT if p.is_dir() else p


def save_checkpoint(state: dict, path: Path, *, writer=torch.save) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    On any OSError (a full disk, say) the temporary file is removed, ``path`` keeps the previous
    checkpoint, and an LmlabError says so. ``writer(state, file)`` is torch.save (tests pass others)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        what = write_failure(e)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was kept"
        raise LmlabError(
            f"could not save the checkpoint {path} ({what}); training stopped and {kept}: "
            f"free space and resume with lmlab train --resume {path.parent}."
        ) from None
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(target: str | os.PathLike) -> dict:
    path = checkpoint_path(target)
    if not path.is_file():
        raise LmlabError(f"--resume {target}: there is no checkpoint at {path}; pass the --out folder of a run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        raise LmlabError(
            f"--resume {path} could not be read as an lmlab checkpoint ({type(e).__name__}); "
            "it is damaged: start a new run."
        ) from None
    if not isinstance(state, dict) or "train_config" not in state or "model" not in state:
        raise LmlabError(f"--resume {path} is not an lmlab train checkpoint; pass the --out folder of lmlab train.")
    return state


def check_compatible(saved: dict, asked: dict, path) -> None:
    """Refuse a resume whose explicitly given options contradict the checkpoint's config."""
    for key, value in asked.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            raise LmlabError(
                f"--resume {path}: that checkpoint was trained with {key}={saved[key]!r}, not {value!r}; "
                f"drop that option to resume it, or start a new run with another --out."
            )
