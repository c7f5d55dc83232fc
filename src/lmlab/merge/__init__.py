"""Merge models: ``lmlab merge A B --method linear|slerp|task-arithmetic|ties|dare-ties``.

``merge(spec, out)`` reads the models tensor by tensor (HF names), merges each tensor with the
method (``lmlab.merge.methods``, mergekit's arithmetic) and writes it straight into the output's
safetensors files, so memory stays near one tensor per model. The output is a HF folder
(config.json and tokenizer files from the base, or the first model; model.safetensors, sharded
when large; mergekit_config.yml, the same merge as a mergekit config) that transformers loads.

``merge_models`` adds what the command does around it: a short comparison of the inputs and the
result (perplexity of a sample text, greedy answers to two prompts) and a ``merge`` run in the
run store.

Tensors are processed in sorted name order, which is also the order mergekit's scheduler runs
them in, so DARE's random drops with the same seed are the same draws.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.merge.config import METHODS, MergeSpec, ModelEntry, method_name, spec_from_options, spec_from_yaml
from lmlab.merge.io import (
    SHARD_BYTES,
    InputModel,
    ModelWriter,
    disk_full_error,
    is_disk_full,
    open_model,
    tokenizer_files,
)
from lmlab.merge.methods import FAMILY, linear, slerp, task_arithmetic

__all__ = [
    "merge",
    "merge_models",
    "MergeSpec",
    "ModelEntry",
    "spec_from_options",
    "spec_from_yaml",
    "method_name",
    "METHODS",
]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_VOCAB = re.compile(r"(?:embed_tokens|wte|embed_in|embed_out|lm_head|word_embeddings)\.weight$")


def layer_fraction(name: str, n_layers: int | None) -> float:
    """Where a tensor sits for gradients: layer i of n at i / (n - 1) (1 for a single layer); others 0."""
    m = _LAYER.search(name)
    if m is None or not n_layers:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def _is_vocab(name: str, shape: tuple, vocab_size: int | None) -> bool:
    return bool(_VOCAB.search(name)) and len(shape) >= 1 and vocab_size is not None and shape[0] == vocab_size


def _parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    from lmlab.loading import DTYPES

    d = DTYPES.get(str(name).lower())
    if d is None:
        raise LmlabError(f"{what} {name!r} is not a dtype lmlab writes; use float32, bfloat16 or float16.")
    return d


def _check_shapes(models: list[InputModel], ref: InputModel, tokenizer_base: bool) -> list[str]:
    """The tensor names to merge (sorted), or an error naming the first mismatch between the models."""
    names = sorted(ref.keys())
    ref_type = ref.config.get("model_type")
    for m in models:
        if m is ref:
            continue
        if m.config.get("model_type") != ref_type:
            raise LmlabError(
                f"{ref.name} is a {ref_type} model and {m.name} a {m.config.get('model_type')} model; "
                "merge models of one architecture (same family and sizes)."
            )
        theirs = set(m.keys())
        missing = [n for n in names if n not in theirs]
        extra = sorted(theirs - set(names))
        if missing or extra:
            who, other, tensor = (m, ref, missing[0]) if missing else (ref, m, extra[0])
            raise LmlabError(
                f"{who.name} has no tensor {tensor} that {other.name} has; merge models of one architecture "
                "(same family, sizes and tied or untied embeddings)."
            )
    vocab_note = None
    for n in names:
        shape = ref.shape(n)
        for m in models:
            if m is ref:
                continue
            s = m.shape(n)
            if s == shape:
                continue
            if _is_vocab(n, shape, ref.vocab_size) and _is_vocab(n, s, m.vocab_size) and s[1:] == shape[1:]:
                vocab_note = vocab_note or (m, s[0])
                continue
            raise LmlabError(
                f"tensor {n} is {tuple(shape)} in {ref.name} but {tuple(s)} in {m.name}; "
                "merge models of one architecture (same family and sizes)."
            )
    if vocab_note and not tokenizer_base:
        m, size = vocab_note
        raise LmlabError(
            f"{ref.name} has a vocabulary of {ref.vocab_size} tokens and {m.name} of {size}; pass --tokenizer base "
            f"to keep {ref.name}'s tokens (tokenizer_source: base in a YAML config)."
        )
    return names


def _vocab_rows(ref: InputModel, m: InputModel) -> torch.Tensor | None:
    """For each row of ``ref``'s vocabulary, the row of ``m`` holding the same token (-1: none; the
    base's row is used there). None when the two vocabularies are the same."""
    ref_tok, tok = ref.tokenizer(), m.tokenizer()
    for model, t in ((ref, ref_tok), (m, tok)):
        if t is None:
            raise LmlabError(
                f"--tokenizer base matches tokens by their text, and {model.name} has no tokenizer; "
                "add its tokenizer.json, or merge models with one vocabulary."
            )
    ref_vocab = ref_tok.backend.get_vocab(with_added_tokens=True)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n_ref, n_m = ref.vocab_size, m.vocab_size
    rows = torch.full((n_ref,), -1, dtype=torch.long)
    for token, i in ref_vocab.items():
        j = vocab.get(token)
        if i < n_ref and j is not None and j < n_m:
            rows[i] = j
    if n_ref == n_m and bool((rows == torch.arange(n_ref)).all()):
        return None
    return rows


def _remap(rows: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    have = rows >= 0
    out[have] = theirs[rows[have]].to(out.dtype)
    return out


def _merge_tensor(spec: MergeSpec, name: str, t: float, tensors: list[torch.Tensor], entries, bi, generator):
    shared = spec.shared_values(name, t)
    if spec.method == "linear":
        ws = [float(spec.input_values(e, name, t)["weight"]) for e in entries]
        if shared["normalize"] and abs(sum(ws)) < 1e-12:
            raise LmlabError(f"the weights for {name} sum to 0, which normalising cannot divide by; change --weights.")
        return linear(tensors, ws, bool(shared["normalize"]))
    if spec.method == "slerp":
        return slerp(float(shared["t"]), tensors[bi], tensors[1 - bi])
    others = [i for i in range(len(tensors)) if i != bi]
    values = [spec.input_values(entries[i], name, t) for i in others]
    return task_arithmetic(
        tensors[bi],
        [tensors[i] for i in others],
        [float(v["weight"]) for v in values],
        [float(v["density"]) for v in values],
        FAMILY[spec.method],
        normalize=bool(shared["normalize"]),
        rescale=bool(shared["rescale"]),
        lam=float(shared["lambda"]),
        generator=generator,
    )


def merge(spec: MergeSpec, out, *, seed: int | None = None, shard_bytes: int = SHARD_BYTES, progress=None) -> dict:
    """Merge the spec's models into the HF folder ``out``; returns a summary (files, tensors, bytes, seconds).

    seed: DARE's random drops (the same seed gives the same model; mergekit's --random-seed gives
        the same draws). progress: called as progress(done, total, tensor_name).
    """
    t0 = time.perf_counter()
    spec.validate()
    entries = spec.inputs()
    bi = spec.base_index
    models = [open_model(e.model) for e in entries]
    ref = models[bi] if bi is not None else models[0]  # config, tokenizer and vocabulary come from here
    out = Path(out).expanduser()
    for m in models:
        if out.resolve() == m.path.resolve() or (m.kind == "gguf" and out.resolve() == m.path.parent.resolve()):
            raise LmlabError(f"-o {out} is where {m.name} is read from; write the merged model to a new folder.")
    if out.exists() and (not out.is_dir() or any(out.glob("*.safetensors")) or (out / "config.json").exists()):
        raise LmlabError(f"{out} already holds a model (or is a file); pass a new or empty folder to -o.")
    tokenizer_base = spec.tokenizer_source == "base"
    names = _check_shapes(models, ref, tokenizer_base)
    rows = {}
    if tokenizer_base:
        for i, m in enumerate(models):
            if m is not ref:
                r = _vocab_rows(ref, m)
                if r is not None:
                    rows[i] = r
    dtype = _parse_dtype(spec.dtype, "dtype")
    out_dtype = _parse_dtype(spec.out_dtype, "out_dtype")

    plan, work = [], []  # (name, shape, dtype written); the dtype each tensor is merged in
    for n in names:
        stored = [m.dtype(n) for m in models]
        if not stored[0].is_floating_point:
            plan.append((n, ref.shape(n), stored[0]))
            work.append(None)
            continue
        w = dtype
        if w is None:  # as mergekit: the inputs' common dtype
            w = stored[0]
            for d in stored[1:]:
                w = torch.promote_types(w, d)
        plan.append((n, ref.shape(n), out_dtype or w))
        work.append(w)

    if seed is None:
        generator = torch.Generator()
        generator.seed()
    else:
        generator = torch.Generator().manual_seed(int(seed))
    writer = ModelWriter(out, plan, shard_bytes)
    writer.start()
    try:
        base_i = models.index(ref)
        paths = [m.path.resolve() for m in models]
        same = [paths.index(p) for p in paths]
        for k, ((n, shape, want), w) in enumerate(zip(plan, work)):
            loaded: dict[int, torch.Tensor] = {}  # a model named twice is read once (no method writes its inputs)
            for i, m in enumerate(models):
                if same[i] not in loaded:
                    loaded[same[i]] = m.get(n, w)
            tensors = [loaded[same[i]] for i in range(len(models))]
            if rows and _is_vocab(n, shape, ref.vocab_size):
                for i, r in rows.items():
                    tensors[i] = _remap(r, tensors[i], tensors[base_i])
            if w is not None:
                merged = _merge_tensor(spec, n, layer_fraction(n, ref.n_layers), tensors, entries, bi, generator)
            else:  # integer buffers are not merged: the base's (or first model's) are kept
                merged = tensors[base_i]
            writer.add(n, merged.to(want))
            del tensors, merged
            if progress is not None:
                progress(k + 1, len(plan), n)
        _write_small_files(writer, spec, ref, plan, out_dtype or dtype)
        files = writer.commit()
    except OSError as e:
        writer.abort()
        if is_disk_full(e):
            raise disk_full_error(out, writer.total_bytes) from None
        raise LmlabError(
            f"merging into {out} failed ({e.strerror or e}); check the folder and the input files "
            "(nothing half-written was left)."
        ) from None
    except BaseException:
        writer.abort()
        raise
    return {
        "out": str(out),
        "method": spec.method,
        "models": [e.model for e in entries],
        "base": spec.base if bi is not None else None,
        "tensors": len(plan),
        "bytes": writer.total_bytes,
        "files": [p.name for p in files],
        "shards": len(writer.shard_names),
        "seconds": round(time.perf_counter() - t0, 3),
        "seed": seed,
    }


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def _write_small_files(writer: ModelWriter, spec: MergeSpec, ref: InputModel, plan, dtype) -> None:
    import json

    import yaml

    cfg = dict(ref.config)
    floating = [d for _, _, d in plan if d.is_floating_point]
    out_dtype = dtype or (floating[0] if floating else torch.float32)
    for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]:  # transformers 5 reads dtype
        cfg[key] = _DTYPE_NAMES.get(out_dtype, "float32")
    writer.add_file("config.json", json.dumps(cfg, indent=2))
    for name, src in tokenizer_files(ref).items():
        if isinstance(src, Path):
            writer.copy_file(src, name)
        else:
            writer.add_file(name, src)
    writer.add_file("mergekit_config.yml", yaml.safe_dump(spec.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- the command's whole run


def merge_models(
    spec: MergeSpec,
    out,
    *,
    seed: int | None = None,
    compare: bool | dict = True,
    record: bool = True,
    shard_bytes: int = SHARD_BYTES,
    progress=None,
    log=None,
) -> dict:
    """``merge`` + the comparison of inputs and result + a ``merge`` run in the run store.

    compare: False to skip it; True for the sample text and prompts; or {"text": ..., "prompts": [...]}.
    """
    from lmlab.runs import record_run

    config = {**spec.to_dict(), "seed": seed}
    inputs = {"models": [e.model for e in spec.inputs()], "base": spec.base}
    run_ctx = record_run(
        "merge", model=str(out), model_path=str(out), config=config, seed=seed, inputs=inputs, record=record
    )
    with run_ctx as run:
        summary = merge(spec, out, seed=seed, shard_bytes=shard_bytes, progress=progress)
        run.outputs = {"files": summary["files"]}
        run.add_metrics(tensors=summary["tensors"], bytes=summary["bytes"], merge_s=summary["seconds"])
        if record:
            try:
                from lmlab.runs import file_hash

                run.model_hash = file_hash(Path(summary["out"]))
            except (OSError, LmlabError):
                pass
        run.checkpoint()
        if compare:
            from lmlab.merge.compare import PROMPTS, compare_models

            labels = [(e.model, e.model) for e in spec.inputs()] + [("merged", summary["out"])]
            chosen = {
                k: v for k, v in (compare if isinstance(compare, dict) else {}).items() if k in ("text", "prompts")
            }
            rows = compare_models(labels, log=log, **chosen)
            summary["comparison"] = rows
            prompts = list(chosen.get("prompts") or PROMPTS)
            run.outputs = {"files": summary["files"], "comparison": rows, "prompts": prompts}
            for r in rows:
                if r.get("perplexity") is not None:
                    run.add_metrics(**{f"perplexity.{r['label']}": r["perplexity"]})
        summary["run_id"] = run.id
    return summary
