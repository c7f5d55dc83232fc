"""Logit lens: read every layer's residual stream as if it were the last one.

Each block's output (``blocks.{i}.resid_post``) goes through the final norm and the
unembedding, exactly as the model's last layer does, giving a next-token distribution per
layer and position. The last layer's lens is the model's own output. It works on a prompt
(every position) and on generation (the position that produced each generated token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.inspect.cache import run_with_cache, token_labels
from lmlab.inspect.hooks import check_layer, model_of, registered


def unembed(model, resid: torch.Tensor) -> torch.Tensor:
    """Residual stream (..., C) -> logits (..., V): final norm, unembedding and the final
    softcap, the same operations the model applies after its last block."""
    cfg = model.cfg
    logits = model.lm_head(model.final_norm(resid))
    if cfg.final_logit_softcap:
        logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
    return logits


@dataclass
class LensResult:
    """Top-k next tokens per layer and position.

    positions: the token at each column (the input token, or for generation the token fed in
    at that step); targets: what the model in full predicts there (the next input token if
    there is one, else its top token; for generation, the generated token).
    """

    positions: list[str]
    targets: list[str]
    layers: list[int]
    top_ids: torch.Tensor  # (L, N, k)
    top_probs: torch.Tensor  # (L, N, k)
    top_tokens: list[list[list[str]]]  # [layer][position][k]
    target_probs: torch.Tensor  # (L, N): each layer's probability for the target token

    @property
    def k(self) -> int:
        return self.top_ids.shape[-1]

    def to_dict(self) -> dict:
        return {
            "positions": self.positions,
            "targets": self.targets,
            "layers": [
                {
                    "layer": layer,
                    "top": [
                        [{"token": t, "id": i, "prob": p} for t, i, p in zip(toks, ids, probs)]
                        for toks, ids, probs in zip(
                            self.top_tokens[li], self.top_ids[li].tolist(), self.top_probs[li].tolist()
                        )
                    ],
                    "target_prob": self.target_probs[li].tolist(),
                }
                for li, layer in enumerate(self.layers)
            ],
        }

    def __rich__(self):
        from lmlab.inspect.display import lens_table

        return lens_table(self)

    def __str__(self) -> str:
        """print() shows what a terminal shows, as plain text."""
        from lmlab.inspect.display import as_text

        return as_text(self)

    def _repr_html_(self) -> str:
        from lmlab.inspect.display import lens_html

        return lens_html(self)

    def save_png(self, path) -> None:
        from lmlab.inspect.display import save_heatmap_png

        top1 = [[toks[0] for toks in row] for row in self.top_tokens]
        save_heatmap_png(
            self.top_probs[..., 0],
            [f"L{layer}" for layer in self.layers],
            self.positions,
            path,
            title="logit lens: top-1 token and its probability",
            xlabel="position",
            ylabel="layer",
            cell_text=top1,
        )


def _lens(lm, resid: dict[int, torch.Tensor], k: int, target_ids: torch.Tensor) -> tuple:
    """resid: layer -> (N, C) -> top ids/probs (L, N, k), token strings, target probs (L, N)."""
    model = model_of(lm)
    ids, probs, toks, tprobs = [], [], [], []
    for layer in sorted(resid):
        p = unembed(model, resid[layer]).float().softmax(-1)  # (N, V)
        top = p.topk(k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
        toks.append([token_labels(lm, row) for row in top.indices])
        tprobs.append(p.gather(-1, target_ids[:, None]).squeeze(-1))
    return torch.stack(ids).cpu(), torch.stack(probs).cpu(), toks, torch.stack(tprobs).cpu()


def _layers(cfg, layers) -> list[int]:
    return list(range(cfg.n_layers)) if layers is None else sorted({check_layer(cfg, int(layer)) for layer in layers})


@torch.inference_mode()
def layer_logits(lm, prompt, layer: int) -> torch.Tensor:
    """The logit lens at one layer as full logits (B, T, V)."""
    model = model_of(lm)
    check_layer(model.cfg, layer)
    _, cache = run_with_cache(lm, prompt, f"blocks.{layer}.resid_post")
    return unembed(model, cache[f"blocks.{layer}.resid_post"])


@torch.inference_mode()
def logit_lens(lm, prompt, k: int = 5, layers=None) -> LensResult:
    """Top-k tokens and probabilities for every layer (or the given ones) at every position of
    one prompt."""
    model = model_of(lm)
    chosen = _layers(model.cfg, layers)
    logits, cache = run_with_cache(lm, prompt, [f"blocks.{layer}.resid_post" for layer in chosen])
    ids = cache.input_ids[0]  # (T,)
    # target: the next input token where there is one, the model's own top token at the end
    targets = torch.cat([ids[1:], logits[0, -1:].argmax(-1)])
    resid = {layer: cache[f"blocks.{layer}.resid_post"][0] for layer in chosen}
    top_ids, top_probs, toks, tprobs = _lens(lm, resid, k, targets)
    return LensResult(token_labels(lm, ids), token_labels(lm, targets), chosen, top_ids, top_probs, toks, tprobs)


@torch.inference_mode()
def logit_lens_generation(
    lm, prompt, k: int = 5, layers=None, max_new_tokens: int = 16, **gen_kw
) -> tuple[LensResult, object]:
    """Generate from one prompt and lens the step that produced each generated token.

    The residual streams are caught by hooks while generating (the last position of each
    forward call: the prefill, then each decode step). Returns (LensResult, GenerationResult).
    """
    model = model_of(lm)
    chosen = _layers(model.cfg, layers)
    caught: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}

    def catcher(layer):
        def catch(x, name):
            caught[layer].append(x[0, -1].detach().clone())  # (C,) the position that predicts next

        return catch

    gen_kw.setdefault("temperature", 0.0)
    with registered(model, [(f"blocks.{layer}.resid_post", catcher(layer)) for layer in chosen]):
        result = lm.generate(
            prompt if not isinstance(prompt, torch.Tensor) else prompt.tolist(), max_new_tokens=max_new_tokens, **gen_kw
        )
    generated = torch.tensor(result.token_ids, device=lm.device)
    resid = {layer: torch.stack(v) for layer, v in caught.items()}  # (N, C)
    top_ids, top_probs, toks, tprobs = _lens(lm, resid, k, generated)
    fed = [result.prompt_ids[-1]] + list(result.token_ids[:-1])  # the token each step read
    return LensResult(
        token_labels(lm, fed), token_labels(lm, result.token_ids), chosen, top_ids, top_probs, toks, tprobs
    ), result
