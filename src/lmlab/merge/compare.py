"""After a merge: how the inputs and the result do on the same sample text and prompts.

For each model (loaded one at a time in float32, so memory holds one model): the perplexity of a
short sample text and the greedy answers to two prompts. A merge that broke the model shows as
a perplexity far above its inputs' and as answers that stop making sense.
"""

from __future__ import annotations

SAMPLE_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may borrow "
    "up to five books at a time, and each loan lasts three weeks. Books can be returned at the front "
    "desk or through the slot by the main door, which is open all night."
)
PROMPTS = ("The capital of France is", "def add(a, b):")
MAX_NEW_TOKENS = 16


def compare_models(
    labelled: list[tuple[str, str]],
    *,
    text: str = SAMPLE_TEXT,
    prompts=PROMPTS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    log=None,
) -> list[dict]:
    """Per (label, model name or path): {label, model, perplexity, tokens, answers}. A model without a
    tokenizer gets perplexity None and no answers (and a note)."""
    import lmlab
    from lmlab.eval.perplexity import perplexity

    rows = []
    for label, model in labelled:
        lm = lmlab.load(model, dtype="float32", prepack=False)
        row = {"label": label, "model": str(model), "perplexity": None, "tokens": 0, "answers": []}
        if lm.tokenizer is None:
            row["note"] = "no tokenizer"
            rows.append(row)
            continue
        res = perplexity(lm, text)
        row["perplexity"] = round(res.perplexity, 4)
        row["tokens"] = res.tokens
        gens = lm.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=0)
        row["answers"] = [g.text for g in gens]
        rows.append(row)
        if log is not None:
            log(f"compared {label}: perplexity {row['perplexity']:.3f}")
        del lm
    return rows
