"""Max |Δ| of lmlab's fp32 logits against transformers' on the same tiny random weights, per family.

    python benchmarks/parity_table.py

The same models as tests/test_parity.py (tests/tiny.py builds them); prints the table in README.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lmlab  # noqa: E402
from tiny import FAMILIES, VOCAB, make_tiny  # noqa: E402


def main() -> None:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    print(f"{'family':<10} {'max |Δ| logits':>15} {'greedy 16 equal':>16}")
    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as folder:
            hf = make_tiny(family, Path(folder))
            lm = lmlab.load(folder)
            with torch.no_grad():
                delta = (lm(ids) - hf(ids).logits).abs().max().item()
                prompt = ids[:1, :10]
                ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 10:].tolist()
            ours = lm.generate(prompt[0].tolist(), max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
            print(f"{family:<10} {delta:>15.1e} {str(ours == ref):>16}")


if __name__ == "__main__":
    main()
