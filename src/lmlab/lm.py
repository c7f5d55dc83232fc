"""LM: a loaded model with its tokenizer, the object ``lmlab.load`` returns."""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError


class LM:
    """A model, its tokenizer and where it came from.

    ``lm(input_ids)`` gives logits [B, T, vocab]; ``lm.generate`` / ``lm.stream`` generate;
    ``lm.run_with_cache`` looks inside.
    """

    packed_bytes = 0  # bytes of the weights' second copy in oneDNN's layout (lmlab.kernels); 0 when off
    native_decode = True  # the engine's hook-free decoding steps run in lmlab.native (False: always model.py)

    def __init__(self, model, tokenizer, *, name: str, resolved=None, dtype=torch.float32, load_seconds: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.resolved = resolved
        self.dtype = dtype
        self.load_seconds = load_seconds

    @property
    def config(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.tok_embed.weight.device

    @property
    def num_parameters(self) -> int:
        """Weights counted as values: a quantized matrix counts its rows × columns (a tied one once)."""
        from lmlab.quant import quant_numel

        return self.model.num_parameters + quant_numel(self.model)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def __call__(self, input_ids, **kw) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self.model(input_ids.to(self.device), **kw)

    def generate(self, prompts, **kw):
        """Generate text: one prompt -> GenerationResult, a list -> a list of them.

        Every sampling knob is a keyword (temperature, top_k, top_p, min_p, typical_p,
        repetition_penalty, frequency_penalty, presence_penalty, no_repeat_ngram_size, seed, n),
        plus max_new_tokens, stop, alternatives, use_cache, truncate="left", chat=True.
        """
        from lmlab.engine.generate import generate

        return generate(self, prompts, **kw)

    def stream(self, prompts, **kw):
        """A Generation: iterate it for a TokenEvent (id, text, logprob, entropy, alternatives,
        finish_reason) per generated token; ``.stats`` are its timings, ``.result()`` the result."""
        from lmlab.engine.generate import stream

        return stream(self, prompts, **kw)

    def chat(self, system: str | None = None, **kw):
        """A Chat: a conversation that keeps its history and reuses its KV cache turn to turn
        (``lmlab.engine.chat``)."""
        from lmlab.engine.chat import Chat

        return Chat(self, system=system, **kw)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        self._need_tokenizer()
        return self.tokenizer.encode(text, add_special=add_special)

    def decode(self, ids) -> str:
        self._need_tokenizer()
        return self.tokenizer.decode(list(ids))

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LmlabError(
                f"{self.name} has no tokenizer (no tokenizer.json beside it); "
                "pass token ids, or add the tokenizer files to the model folder."
            )

    # Looking inside (lmlab.inspect does the work; imported on first use, so loading a model stays cheap)

    def hooks(self, spec=None, **named):
        """Context manager: run fn(tensor, name) at the named points (patterns allowed) inside the block."""
        from lmlab.inspect.hooks import hooked

        return hooked(self, spec, **named)

    def run_with_cache(self, prompt, names=None, **kw):
        """One forward pass keeping the activations at ``names`` -> (logits, ActivationCache)."""
        from lmlab.inspect.cache import run_with_cache

        return run_with_cache(self, prompt, names, **kw)

    def intervene(self, *interventions):
        """Context manager: apply interventions (AblateHeads, SkipLayers, Patch, Steer, ...) together."""
        from lmlab.inspect.interventions import intervene

        return intervene(self, *interventions)

    def logit_lens(self, prompt, k: int = 5, layers=None):
        """Top-k tokens per layer and position (final norm, then unembedding, at each resid_post)."""
        from lmlab.inspect.lens import logit_lens

        return logit_lens(self, prompt, k, layers)

    def hook_names(self):
        """Every hook name of this model, in forward order."""
        from lmlab.inspect.hooks import hook_names

        return hook_names(self.config)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LM({self.name!r}, family={c.family}, params={self.num_parameters / 1e6:.1f}M, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})"
        )
