"""Training from scratch: ``lmlab train`` and ``lmlab.train.train(TrainConfig(...))``.

- ``config``: TrainConfig (every knob), the presets and the model config they build;
- ``data``: text -> a memory-mapped token file (cached by hash) -> batches;
- ``tokenizing``: char, bytes, a BPE trained on the data, or any model's tokenizer;
- ``loop``: the training loop (AdamW, warmup + cosine, accumulation, clipping, bf16 autocast,
  DDP, samples, progress);
- ``checkpoint``: atomic, resumable checkpoints;
- ``export``: the HF model folder lmlab and transformers load;
- ``plots``: loss curves.
"""

from lmlab.train.config import PRESETS, SIZES, TrainConfig
from lmlab.train.loop import train

__all__ = ["TrainConfig", "PRESETS", "SIZES", "train"]
