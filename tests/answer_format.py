"""The made-up answer format the LoRA tests teach SmolLM2: a word, answered in double angle
brackets ("Word: apple\nAnswer:" -> " <<apple>>"); 36 words, 9 of them held out."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "apple river stone cloud green tiger piano silver garden rocket candle window dragon summer forest bottle "
    "marble yellow castle pencil orange spider island mirror jacket violin copper meadow harbor lantern falcon "
    "velvet canyon pepper walnut saddle"
).split()


def answer_format_task(tmp_path: Path, model: str, **overrides):
    """(rows, the JSONL file, the FinetuneConfig that learns them in six steps)."""
    from lmlab.finetune import FinetuneConfig

    rows = [{"prompt": f"Word: {w}\nAnswer:", "completion": f" <<{w}>>"} for w in WORDS]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(
        lora="r=8,alpha=16,targets=all",
        steps=6,
        batch_size=8,
        lr=4e-3,
        val_fraction=0.25,
        samples=0,
        eval_every=100,
        out=str(tmp_path / "o"),
    )
    return rows, data, FinetuneConfig(model=model, data=str(data), **{**settings, **overrides})
