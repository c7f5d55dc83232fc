"""Look inside a model and change it.

    import lmlab
    lm = lmlab.load("smollm2-135m")
    logits, cache = lm.run_with_cache("The cat sat on the", names="blocks.*.attn.pattern")
    cache.attention(layer=3, head=5)                          # a heatmap in Jupyter
    with lm.hooks({"blocks.0.resid_post": lambda x, name: x * 0.5}):
        lm("...")
    with lm.intervene(AblateHeads("3.5,4.*"), SkipLayers(7)):
        lm.generate("The capital of France is")
    effect(lm, prompt, AblateHeads("3.*"))                   # KL, Δlogit, Δprob, top-1 agreement
    logit_lens(lm, prompt)                                    # top-k per layer and position

Hook names and their shapes: docs/hooks.md (generated from lmlab.model.HOOK_POINTS).
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it. Loaded on first use (PEP 562), so importing the
# package stays cheap and `python -m lmlab.inspect.hooks` runs without importing it twice.
_EXPORTS = {
    "lmlab.inspect.cache": [
        "run_with_cache",
        "ActivationCache",
        "AttentionPattern",
        "DEFAULT_BUDGET_MB",
        "as_token_ids",
        "token_labels",
    ],
    "lmlab.inspect.hooks": ["hook_names", "resolve_names", "hooked", "clear_hooks", "parse_heads", "parse_layers"],
    "lmlab.inspect.interventions": [
        "Intervention",
        "AblateHeads",
        "SkipLayers",
        "Patch",
        "Steer",
        "ScaleEmbeddings",
        "ReplaceEmbeddings",
        "intervene",
    ],
    "lmlab.inspect.metrics": [
        "kl_per_position",
        "top_token_change",
        "top1_agreement",
        "effect",
        "Effect",
        "generation_diff",
        "GenerationDiff",
    ],
    "lmlab.inspect.lens": ["logit_lens", "logit_lens_generation", "layer_logits", "unembed", "LensResult"],
    "lmlab.inspect.shapes": ["shape_trace", "ShapeTrace"],
    "lmlab.inspect.patching": ["patching_sweep", "PatchingResult"],
    "lmlab.inspect.induction": ["induction_experiment", "InductionResult"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lmlab.inspect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
