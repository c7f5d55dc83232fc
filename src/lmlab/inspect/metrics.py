"""Effect metrics: how much an intervention changed the model, against the unmodified run.

Per position: KL(base || modified) in nats and the change of the base top token's log-probability
(what a learner can read: -0.69 halves its probability), with its probability before and after,
and whether the top-1 token still agrees. The change of its raw logit is kept as a detail: it can
have the opposite sign of the log-probability's, because softmax only sees logits relative to
each other (when every logit rises by 2 and this one by 1, its probability falls). For generation: the same prompt and
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
    """For the base run's top token at each position: its id, its logit, log-probability and
    probability in the base run, and their change (modified - base). Each (...)."""
    top = base_logits.argmax(-1, keepdim=True)
    base_logit = base_logits.float().gather(-1, top).squeeze(-1)
    mod_logit = mod_logits.float().gather(-1, top).squeeze(-1)
    base_logp = base_logits.float().log_softmax(-1).gather(-1, top).squeeze(-1)
    mod_logp = mod_logits.float().log_softmax(-1).gather(-1, top).squeeze(-1)
    return {
        "top_id": top.squeeze(-1),
        "base_logit": base_logit,
        "dlogit": mod_logit - base_logit,
        "base_logp": base_logp,
        "dlogp": mod_logp - base_logp,
        "base_prob": base_logp.exp(),
        "dprob": mod_logp.exp() - base_logp.exp(),
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
    base_prob: list[float]  # probability of the base top token, unmodified
    dlogit: list[float]  # change of its raw logit (a detail: see the module docstring)
    dprob: list[float]  # change of its probability
    agree: list[bool]
    interventions: list[str] = field(default_factory=list)
    dlogp: list[float] = field(default_factory=list)  # change of its log-probability (nats)

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
            "mean_dlogp": sum(self.dlogp) / len(self.dlogp),
            "last_dlogp": self.dlogp[-1],
            "last_base_prob": self.base_prob[-1],
            "last_dlogit": self.dlogit[-1],
            "last_dprob": self.dprob[-1],
        }

    def rows(self) -> list[dict]:
        keys = ("tokens", "top", "mod_top", "kl", "base_prob", "dlogp", "dlogit", "dprob", "agree")
        names = ("token", "base_top", "modified_top", "kl", "base_prob", "dlogp", "dlogit", "dprob", "agree")
        return [{n: getattr(self, k)[i] for n, k in zip(names, keys)} for i in range(len(self.tokens))]

    def to_dict(self) -> dict:
        return {"interventions": self.interventions, "summary": self.summary(), "positions": self.rows()}

    def __rich__(self):
        from lmlab.inspect.display import effect_table

        return effect_table(self)

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

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
        dlogp=change["dlogp"].tolist(),
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

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

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


# ----------------------------------------------------------------------------- steering


def _as_words(prompt: str, text: str) -> str:
    """``text`` as the words that would follow ``prompt`` ('love' after 'I think you are' -> ' love')."""
    text = text.strip()
    return text if not prompt or prompt[-1].isspace() else " " + text


@torch.inference_mode()
def continuation_logprob(lm, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) in nats: the sum over the continuation's tokens."""
    ids = lm.encode(prompt)
    cont = lm.tokenizer.encode(continuation, add_special=False)
    x = torch.tensor([ids + cont], device=lm.device)
    logp = model_of(lm)(x)[0, len(ids) - 1 : -1].float().log_softmax(-1)  # (len(cont), V)
    return logp.gather(-1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()


@torch.inference_mode()
def perplexity_of(lm, prompt, token_ids: list[int]) -> float:
    """The model's perplexity of generated tokens after the prompt (exp of their mean loss, nats):
    low for text the model finds fluent."""
    if not token_ids:
        return float("nan")
    ids = as_token_ids(lm, prompt)[0].tolist()
    x = torch.tensor([ids + list(token_ids)], device=lm.device)
    logp = model_of(lm)(x)[0, len(ids) - 1 : -1].float().log_softmax(-1)
    nll = -logp.gather(-1, x[0, len(ids) :, None]).mean()
    return nll.exp().item()


def steering_shift(lm, prompt: str, toward: str, away: str, interventions, diff: GenerationDiff | None) -> dict:
    """What steering changed, in two numbers a learner can read:

    - preference: log p(toward) - log p(away) as the words right after the prompt (nats), without
      and with the steering: how much more the model leans toward the one than the other;
    - fluency: the unmodified model's perplexity of each generated continuation (``diff``): near
      the unsteered one's, the steered text still reads as language; far above it, it is broken.
    """
    ivs = flatten([interventions])
    t, a = _as_words(prompt, toward), _as_words(prompt, away)
    base = continuation_logprob(lm, prompt, t) - continuation_logprob(lm, prompt, a)
    with intervene(lm, ivs):
        steered = continuation_logprob(lm, prompt, t) - continuation_logprob(lm, prompt, a)
    out = {"toward": t, "away": a, "preference_base": base, "preference_steered": steered}
    if diff is not None:
        out["perplexity_base_text"] = perplexity_of(lm, prompt, diff.base_ids)
        out["perplexity_steered_text"] = perplexity_of(lm, prompt, diff.mod_ids)
    return out
