"""Effect metrics: how much an intervention changed the model, against the unmodified run.

Per position: KL(base || modified) in nats, the change of the base top token's logit and
probability, and whether the top-1 token still agrees. For generation: the same prompt and
seed with and without the intervention, side by side, with the first token where they part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.inspect.cache import as_token_ids, text_pieces, token_labels
from lmlab.inspect.hooks import model_of
from lmlab.inspect.interventions import flatten, intervene

# ----------------------------------------------------------------------------- the numbers


def kl_per_position(base_logits: torch.Tensor, mod_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || modified) in nats at each position: (..., V) logits -> (...), float32."""
    base_lp = base_logits.float().log_softmax(-1)
    mod_lp = mod_logits.float().log_softmax(-1)
    # where the base gives probability 0 the term is 0 (0 log 0); where the modified run gives
    # 0 to something the base does not, the KL is infinite, and so it is reported
    terms = base_lp.exp() * (base_lp - mod_lp)
    terms = torch.where(base_lp == float("-inf"), torch.zeros_like(terms), terms)
    return terms.sum(-1).clamp(min=0.0)


def top_token_change(base_logits: torch.Tensor, mod_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """For the base run's top token at each position: its id, its logit and probability in the
    base run, and their change (modified - base). Each (...)."""
    top = base_logits.argmax(-1, keepdim=True)
    base_logit = base_logits.float().gather(-1, top).squeeze(-1)
    mod_logit = mod_logits.float().gather(-1, top).squeeze(-1)
    base_prob = base_logits.float().softmax(-1).gather(-1, top).squeeze(-1)
    mod_prob = mod_logits.float().softmax(-1).gather(-1, top).squeeze(-1)
    return {
        "top_id": top.squeeze(-1),
        "base_logit": base_logit,
        "dlogit": mod_logit - base_logit,
        "base_prob": base_prob,
        "dprob": mod_prob - base_prob,
    }


def top1_agreement(base_logits: torch.Tensor, mod_logits: torch.Tensor) -> float:
    """Fraction of positions where both runs put the same token first."""
    return (base_logits.argmax(-1) == mod_logits.argmax(-1)).float().mean().item()


# ----------------------------------------------------------------------------- one prompt


@dataclass
class Effect:
    """Per-position effect of interventions on one prompt (sequence 0 of the batch)."""

    tokens: list[str]  # the input tokens
    top: list[str]  # the base run's top next token at each position
    mod_top: list[str]  # the modified run's
    kl: list[float]  # nats
    base_prob: list[float]
    dlogit: list[float]
    dprob: list[float]
    agree: list[bool]
    interventions: list[str] = field(default_factory=list)

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl)

    @property
    def agreement(self) -> float:
        return sum(self.agree) / len(self.agree)

    def summary(self) -> dict:
        return {
            "mean_kl": self.mean_kl,
            "max_kl": max(self.kl),
            "last_kl": self.kl[-1],
            "top1_agreement": self.agreement,
            "last_dlogit": self.dlogit[-1],
            "last_dprob": self.dprob[-1],
        }

    def rows(self) -> list[dict]:
        keys = ("tokens", "top", "mod_top", "kl", "base_prob", "dlogit", "dprob", "agree")
        names = ("token", "base_top", "modified_top", "kl", "base_prob", "dlogit", "dprob", "agree")
        return [{n: getattr(self, k)[i] for n, k in zip(names, keys)} for i in range(len(self.tokens))]

    def to_dict(self) -> dict:
        return {"interventions": self.interventions, "summary": self.summary(), "positions": self.rows()}

    def __rich__(self):
        from lmlab.inspect.display import effect_table

        return effect_table(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import effect_html

        return effect_html(self)


@torch.inference_mode()
def effect(lm, prompt, *interventions) -> Effect:
    """Run the prompt without and with the interventions and compare the logits position by position."""
    ivs = flatten(interventions)
    ids = as_token_ids(lm, prompt)
    model = model_of(lm)
    base = model(ids)[0]  # (T, V)
    with intervene(lm, ivs):
        mod = model(ids)[0]
    change = top_token_change(base, mod)
    return Effect(
        tokens=token_labels(lm, ids[0]),
        top=token_labels(lm, change["top_id"]),
        mod_top=token_labels(lm, mod.argmax(-1)),
        kl=kl_per_position(base, mod).tolist(),
        base_prob=change["base_prob"].tolist(),
        dlogit=change["dlogit"].tolist(),
        dprob=change["dprob"].tolist(),
        agree=(base.argmax(-1) == mod.argmax(-1)).tolist(),
        interventions=[iv.describe() for iv in ivs],
    )


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerationDiff:
    """The same prompt and seed generated without and with interventions."""

    prompt: str | None
    base_ids: list[int]
    mod_ids: list[int]
    base_text: str
    mod_text: str
    base_pieces: list[str]  # the text of each generated token (joined: the text)
    mod_pieces: list[str]
    seed: int | None
    interventions: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> int | None:
        """Index of the first generated token that differs (None when the two are equal)."""
        for i, (a, b) in enumerate(zip(self.base_ids, self.mod_ids)):
            if a != b:
                return i
        return None if len(self.base_ids) == len(self.mod_ids) else min(len(self.base_ids), len(self.mod_ids))

    @property
    def same_tokens(self) -> int:
        """How many generated tokens agree position by position."""
        return sum(a == b for a, b in zip(self.base_ids, self.mod_ids))

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "interventions": self.interventions,
            "base": {"text": self.base_text, "token_ids": self.base_ids},
            "modified": {"text": self.mod_text, "token_ids": self.mod_ids},
            "first_divergence": self.first_divergence,
            "same_tokens": self.same_tokens,
        }

    def __rich__(self):
        from lmlab.inspect.display import generation_diff_table

        return generation_diff_table(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import generation_diff_html

        return generation_diff_html(self)


def generation_diff(
    lm, prompt, *interventions, seed: int | None = 0, max_new_tokens: int = 32, **gen_kw
) -> GenerationDiff:
    """Generate with the same prompt and seed, without and with the interventions (greedy by
    default: temperature=0; any sampling knob of lm.generate can be passed)."""
    ivs = flatten(interventions)
    gen_kw.setdefault("temperature", 0.0)
    base = lm.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **gen_kw)
    with intervene(lm, ivs):
        mod = lm.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **gen_kw)
    return GenerationDiff(
        prompt=prompt if isinstance(prompt, str) else None,
        base_ids=list(base.token_ids),
        mod_ids=list(mod.token_ids),
        base_text=base.text if lm.tokenizer is not None else " ".join(map(str, base.token_ids)),
        mod_text=mod.text if lm.tokenizer is not None else " ".join(map(str, mod.token_ids)),
        base_pieces=text_pieces(lm, base.token_ids),
        mod_pieces=text_pieces(lm, mod.token_ids),
        seed=seed,
        interventions=[iv.describe() for iv in ivs],
    )
