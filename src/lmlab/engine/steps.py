"""The engine's forward steps: prefill a prompt into the KV cache, decode one token per row.

Each takes the model and returns the next-token logits (B, V) of the last position. A decoding
step with no hook registered runs in ``lmlab.native`` (the same blocks in C, held to
``model.py`` by ``tests/test_native_step.py``) where that applies, else through ``model.py``.
"""

from __future__ import annotations

import torch

from lmlab import native

# A quantized model's prompt of at most this many tokens (no padding, no hook) runs as that many
# native decoding steps, the LM head on the last only. Two threads, against model.py's GEMMs on
# dequantized tiles: SmolLM2 Q4_1 5 tokens 14 ms against 49, 16 tokens 34 against 67; Gemma 3
# Q4_K_M 16 tokens 50 against 74; the two meet at 24-32 tokens. Nor does it page in a tile, GEMM
# buffers or PyTorch's kernels: a 5-token prompt and 32 tokens on SmolLM2 peak 5 MiB lower.
SHORT_PROMPT = 16


def prefill(
    model, ids: torch.Tensor, positions: torch.Tensor, cache, key_mask: torch.Tensor | None, use_native: bool = True
) -> torch.Tensor:
    """Write the keys and values of ``ids`` (B, T) into ``cache`` from ``cache.length`` on; logits (B, V)
    of the last token. positions: (B, T); key_mask: (B, S) bool over the slots so far, False on
    left padding, or None when no row is padded.

    use_native: a short prompt to a quantized model may take the native decoding step, token by
    token (its activations rounded to int8 per 32 values, as every decoding step's are; model.py's
    prefill computes on the dequantized floats). False: always model.py."""
    if (
        use_native
        and cache is not None
        and key_mask is None
        and not model.hooks
        and 1 <= ids.shape[1] <= SHORT_PROMPT
        and native.decodes_quantized(model)
    ):
        T = ids.shape[1]
        for t in range(T):  # the tokens before the last need only their keys and values, not logits
            out = native.decode_step(model, ids[:, t : t + 1], positions[:, t : t + 1], cache, None, head=t == T - 1)
            if out is None:  # it applies to every token or to none: only the first can say no
                break
        else:
            return out[:, -1]
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
