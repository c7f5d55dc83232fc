"""The engine's forward steps: prefill a prompt into the KV cache, decode one token per row.

Each takes the model and returns the next-token logits (B, V) of the last position. A decoding
step with no hook registered runs in ``lmlab.native`` (the same blocks in C, held to
``model.py`` by ``tests/test_native_step.py``) where that applies, else through ``model.py``.
"""

from __future__ import annotations

import torch

from lmlab import native


def prefill(model, ids: torch.Tensor, positions: torch.Tensor, cache, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Write the keys and values of ``ids`` (B, T) into ``cache`` from ``cache.length`` on; logits (B, V)
    of the last token. positions: (B, T); key_mask: (B, S) bool over the slots so far, False on
    left padding, or None when no row is padded."""
    return model(ids, positions=positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]


def decode_one_token(
    model, ids: torch.Tensor, positions: torch.Tensor, cache, key_mask: torch.Tensor | None, use_native: bool = True
) -> torch.Tensor:
    """One cached step for one new token per row: ids and positions (B, 1) -> logits (B, V).

    use_native: take ``lmlab.native.decode_step`` when no hook is registered, or only hooks it runs
    itself (``native.runs_hooks``: the residual stream of a quantized model) (False: always
    ``model.py``, the reference).
    """
    if use_native and (not model.hooks or native.runs_hooks(model)):
        logits = native.decode_step(model, ids, positions, cache, key_mask)
        if logits is not None:
            return logits[:, -1]
    return model(ids, positions=positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]
