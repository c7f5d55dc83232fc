"""Fine-tuning a pretrained model: LoRA adapters or every weight, on JSONL rows.

- ``data``: messages / prompt-completion / text rows -> token ids and a loss mask, held-out split;
- ``lora``: ``LoRALinear`` and the targets of each family (q, k, v, o, gate, up, down);
- ``adapter``: adapters in PEFT's format (save, load, apply unmerged);
- ``run``: the fine-tuning run (``finetune(FinetuneConfig(...))``), recorded in the run store;
- ``export``: a merged or fully fine-tuned model as a HF folder.
"""

from lmlab.finetune.lora import LoRALinear, LoRASpec, add_lora, merge_lora, remove_lora
from lmlab.finetune.run import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune", "LoRALinear", "LoRASpec", "add_lora", "merge_lora", "remove_lora"]
