"""What every engine's runner hands the sweep: lmlab's (``sweep.LmlabRunner``) and each peer's
(``peers.py``) alike.

- ``Trial``: one timed generation, the seconds from the call to each step's tokens;
- ``stored_bytes`` / ``weight_bytes_per_step``: the bytes a torch model holds, and the bytes a
  decode step reads, which the sweep turns into achieved bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trial:
    """One timed generation: seconds from the call to each step's tokens being on the host."""

    batch: int
    prompt_len: int
    stamps: list[float]  # seconds since the call, one per generated step (step 0 = first token)

    @property
    def ttft_s(self) -> float:
        return self.stamps[0]

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[0]

    @property
    def decode_steps(self) -> int:
        return len(self.stamps) - 1

    @property
    def step_latencies_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the state dict (parameters and buffers, packed ones included),
    each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        t = t.detach() if isinstance(t, torch.Tensor) else t
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def weight_bytes_per_step(module: torch.nn.Module) -> int:
    """Bytes a decode step reads: every stored tensor once, except embedding tables that are only
    gathered (an untied input embedding, learned positions). A table tied to the output head is
    read whole by the head, so it counts."""
    out = None
    if hasattr(module, "lm_head"):
        out = module.lm_head.weight
    elif hasattr(module, "get_output_embeddings") and module.get_output_embeddings() is not None:
        out = module.get_output_embeddings().weight
    gathered = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding) and (out is None or m.weight.data_ptr() != out.data_ptr()):
            gathered += m.weight.numel() * m.weight.element_size()
    return stored_bytes(module) - gathered
