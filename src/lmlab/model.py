"""The one decoder-only Transformer that every family runs on.

GPT-2, Pythia, Llama, Mistral, Qwen2/3 and Gemma 3 differ only by fields of ``ModelConfig``:
read this file top to bottom and you have read every model lmlab runs.

Shapes in comments use: B batch, T new tokens this call, S = cached + new tokens (keys),
C = d_model, H = n_heads, K = n_kv_heads, D = head_dim, F = d_ff, V = vocab.

Hook points: at every meaningful point the forward pass calls ``hook(name, x)``. With no hook
registered ``hook`` is None and each point is one skipped ``if``, so it costs nothing
measurable. ``lmlab.inspect`` registers hooks by these names (see HOOK_POINTS).

This file is the reference: it holds no kernel or device code. Speed is applied from outside:
``lmlab.kernels`` swaps faster CPU matmuls in for ``nn.Linear`` at load and in a model built to
train (``train.loop.new_model``; in training each product takes the fastest route for its
shape, ``fused.linear``), ``fused`` gives training its one-pass steps, and the engine runs a
hook-free decoding step through ``lmlab.native``, which tests hold to this forward pass.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab import fused
from lmlab.config import ModelConfig
from lmlab.kernels import FastLinear

# name pattern -> (shape, what it is). The table in docs/hooks.md is generated from this.
HOOK_POINTS: dict[str, tuple[str, str]] = {
    "embed": ("B T C", "token embeddings (after gemma's sqrt(C) scale)"),
    "pos_embed": ("B T C", "learned position embeddings (gpt2 only)"),
    "blocks.{i}.resid_pre": ("B T C", "residual stream entering block i"),
    "blocks.{i}.attn.q": ("B H T D", "queries, after QK-norm and RoPE"),
    "blocks.{i}.attn.k": ("B K T D", "keys of the new tokens, after QK-norm and RoPE"),
    "blocks.{i}.attn.v": ("B K T D", "values of the new tokens"),
    "blocks.{i}.attn.scores": ("B H T S", "scaled q·k logits with the mask applied (-inf where masked)"),
    "blocks.{i}.attn.pattern": ("B H T S", "attention probabilities (softmax of scores)"),
    "blocks.{i}.attn.head_out": ("B T H D", "each head's output, before the output projection"),
    "blocks.{i}.attn_out": ("B T C", "what attention adds to the residual stream"),
    "blocks.{i}.resid_mid": ("B T C", "residual after attention (resid_pre + attn_out)"),
    "blocks.{i}.mlp.pre": ("B T F", "MLP hidden pre-activation (the gate, for gated MLPs)"),
    "blocks.{i}.mlp.post": ("B T F", "MLP hidden after the activation (times up, for gated MLPs)"),
    "blocks.{i}.mlp_out": ("B T C", "what the MLP adds to the residual stream"),
    "blocks.{i}.resid_post": ("B T C", "residual stream leaving block i"),
    "final_norm": ("B T C", "residual stream after the final norm"),
    "logits": ("B T V", "next-token logits"),
}

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


# ----------------------------------------------------------------------------- norms


class Norm(nn.Module):
    """LayerNorm (with bias) or RMSNorm, optionally scaling by (offset + w) as gemma does.

    RMSNorm is computed in float32 and cast back, like the reference implementations, so
    bf16 runs round the same way.
    """

    def __init__(self, dim: int, kind: str, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.kind, self.eps, self.weight_offset = kind, eps, weight_offset
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # x * rsqrt(mean(x^2) + eps), in float32; F.rms_norm is that formula in one kernel
        # training (train mode, autograd on): the gradient written out; elsewhere F.rms_norm, so a
        # forward with autograd on for a look inside (unembed, attribution) equals the model's own
        train = self.training and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.weight_offset:  # gemma: (1 + w), applied in float32
            w = self.weight_offset + self.weight.float()
            if train:
                return rms_norm_train(x.float(), w, self.eps).type_as(x)
            return F.rms_norm(x.float(), (x.shape[-1],), w, self.eps).type_as(x)
        if x.dtype == torch.float32:
            if train:
                return rms_norm_train(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).type_as(x)


def rms_norm_train(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Training's RMSNorm in float32: lmlab.fused's one pass each way where it applies, else the
    gradient written out below."""
    if fused.applies(x) and w.dtype == torch.float32 and w.device.type == "cpu":
        return fused.rms_norm(x, w, eps)
    return RMSNormFunction.apply(x, w, eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out, for training in float32: x * r * w, r = rsqrt(mean(x^2)
    + eps). Autograd through F.rms_norm on the CPU takes about a dozen passes over x in backward;
    this takes five, and the forward's sum of squares is one pass (SmolLM2's (512, 576) norm:
    forward + backward 0.80 vs 1.30 ms at two threads). Equal to F.rms_norm to float rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, w, r)
        return x * r * w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, r = ctx.saved_tensors
        gw, xh = g * w, x * r  # d out / d xh, and the normalised x
        # d xh / d x: (gw - xh * mean(gw * xh)) * r
        dot = torch.linalg.vecdot(gw, xh, dim=-1).unsqueeze(-1).div_(x.shape[-1])
        dx = torch.addcmul(gw, xh, dot, value=-1).mul_(r) if ctx.needs_input_grad[0] else None
        dw = (g * xh).sum(tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        return dx, dw, None


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,), with llama3 / linear scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(is_mid, blended, inv_freq)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, (B, 1, T, rotary_dim) each, for integer positions (B, T).

    Computed in float32, then cast. The sin table carries the rotation's sign: its first half
    is -sin, so that ``apply_rope`` needs no negation.
    """
    freqs = positions[:, :, None].float() * inv_freq[None, None, :]  # (B, T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, R)
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of each head in (first half, second half) pairs.

    Pair j is (x[j], x[j + R/2]) and turns by angle position * inv_freq[j]:
    out = x * cos + (x2, x1) * (-sin, sin), where (x2, x1) swaps the halves (a flip of the
    (2, R/2) view).
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        swapped = x.unflatten(-1, (2, r // 2)).flip(-2).flatten(-2)
        return x * cos + swapped * sin
    x_rot, x_pass = x[..., :r], x[..., r:]  # partial rotary (pythia): the rest passes through
    return torch.cat([apply_rope(x_rot, cos, sin), x_pass], dim=-1)


# ----------------------------------------------------------------------------- blocks


def causal_mask(T: int, device) -> torch.Tensor:
    """The causal mask as a boolean tensor (1, 1, T, T), True where a query may attend."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


class Attention(nn.Module):
    # The dtype attention computes in; None: the activations'. lmlab.kernels sets float32 for a
    # half-precision model on the CPU, whose half-precision attention kernels are slow.
    compute_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * K) * D, bias=cfg.qkv_bias)  # q, k, v stacked
        self.o = nn.Linear(H * D, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = Norm(D, "rmsnorm", cfg.norm_eps, cfg.norm_weight_offset)
            self.k_norm = Norm(D, "rmsnorm", cfg.norm_eps, cfg.norm_weight_offset)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else D**-0.5
        self.sliding = cfg.layer_types[layer] == "sliding"
        p = f"blocks.{layer}.attn."
        self.names = {n: p + n for n in ("q", "k", "v", "scores", "pattern", "head_out")}

    def forward(self, x, rope, mask, is_causal, cache, hook) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). mask: (B or 1, 1, T, S) bool, True where a query may attend,
        or None; is_causal: no mask tensor, plain causal over a whole prompt (T == S)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D)
        if (
            self.training
            and hook is None
            and cache is None
            and is_causal
            and mask is None
            and self.compute_dtype is None
            and not (cfg.qk_norm or cfg.attn_logit_softcap)
            and fused.attention_fits(T, D)
            and fused.applies(qkv)
        ):  # training: RoPE and causal attention read and write the projections' layout (fused.attention)
            return self.o(fused.attention(qkv, H, K, self.scale, rope).view(B, T, H * D))
        if rope is not None and not cfg.qk_norm and self.training and fused.applies(qkv):
            # training: the rotation below in one pass, whose backward also gathers q, k and v's gradients
            q, k, v = fused.rope_qkv(qkv, *rope, (H, K, K))
            rope = None
        else:
            qkv = qkv.transpose(1, 2)  # (B, H + 2K, T, D): q heads, k heads, v heads
            q, k, v = qkv.split([H, K, K], dim=1)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if cfg.qk_norm:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            else:  # q and k heads are adjacent: rotate them in one go
                q, k = apply_rope(qkv[:, : H + K], *rope).split([H, K], dim=1)
        if hook is not None:
            q = hook(self.names["q"], q)
            k = hook(self.names["k"], k)
            v = hook(self.names["v"], v)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, D): everything cached so far
        if self.compute_dtype is not None:
            q, k, v = q.to(self.compute_dtype), k.to(self.compute_dtype), v.to(self.compute_dtype)
        eager = hook is not None and (hook.wants(self.names["scores"]) or hook.wants(self.names["pattern"]))
        if eager or cfg.attn_logit_softcap:
            y = self._eager(q, k, v, causal_mask(T, x.device) if is_causal else mask, hook)
        else:
            # Fused attention; k/v heads are shared by groups of query heads (GQA) inside the kernel,
            # and with is_causal it skips the masked half without a mask tensor.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=K != H
            )  # (B, H, T, D)
        y = y.to(x.dtype).transpose(1, 2)  # (B, T, H, D)
        if hook is not None:
            y = hook(self.names["head_out"], y)
        return self.o(y.reshape(B, T, H * D))

    def _eager(self, q, k, v, mask, hook) -> torch.Tensor:
        """Attention written out, so scores and pattern can be seen and changed."""
        groups = self.cfg.gqa_groups
        if groups > 1:  # GQA: repeat each k/v head for the query heads that share it
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, S)
        if self.cfg.attn_logit_softcap:
            cap = self.cfg.attn_logit_softcap
            scores = cap * torch.tanh(scores / cap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if hook is not None:
            scores = hook(self.names["scores"], scores)
        pattern = scores.float().softmax(dim=-1).to(q.dtype)
        if hook is not None:
            pattern = hook(self.names["pattern"], pattern)
        return pattern @ v  # (B, H, T, D)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gated = cfg.mlp == "gated"
        self.d_ff = cfg.d_ff
        # gated: gate and up stacked in one matrix (gate rows first)
        self.up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act, self.act_name = ACTIVATIONS[cfg.act], cfg.act
        self.fused_act = cfg.act in fused.ACTS
        self.names = (f"blocks.{layer}.mlp.pre", f"blocks.{layer}.mlp.post")

    def forward(self, x, hook) -> torch.Tensor:
        fuse = self.fused_act and self.training and hook is None
        proj = self.up
        if fuse and type(proj) in (nn.Linear, FastLinear) and proj.bias is not None and fused.applies(x):
            if not torch.is_autocast_enabled(x.device.type):  # training: the bias and the lines below in one pass
                return self.down(fused.activation(fused.linear(x, proj.weight), self.act_name, self.gated, proj.bias))
        h = proj(x)  # (B, T, F) or (B, T, 2F)
        if fuse and fused.applies(h):  # training: the lines below in one pass
            return self.down(fused.activation(h, self.act_name, self.gated))
        if self.gated:
            gate, up = h.split(self.d_ff, dim=-1)
            if hook is not None:
                gate = hook(self.names[0], gate)
            h = self.act(gate) * up
        else:
            if hook is not None:
                h = hook(self.names[0], h)
            h = self.act(h)
        if hook is not None:
            h = hook(self.names[1], h)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        norm = lambda: Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_weight_offset)  # noqa: E731
        self.attn_norm, self.attn = norm(), Attention(cfg, layer)
        self.mlp_norm, self.mlp = norm(), MLP(cfg, layer)
        if cfg.sandwich_norm:
            self.post_attn_norm, self.post_mlp_norm = norm(), norm()
        p = f"blocks.{layer}."
        self.names = {n: p + n for n in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}

    def forward(self, x, rope, mask, is_causal, cache, hook) -> torch.Tensor:
        n = self.names
        if hook is not None:
            x = hook(n["resid_pre"], x)
        a = self.attn(self.attn_norm(x), rope, mask, is_causal, cache, hook)
        if self.cfg.sandwich_norm:
            a = self.post_attn_norm(a)
        if hook is not None:
            a = hook(n["attn_out"], a)
        if self.cfg.parallel_residual:  # pythia: attention and MLP both read the block's input
            mid = x + a
            if hook is not None:
                mid = hook(n["resid_mid"], mid)
            m = self.mlp(self.mlp_norm(x), hook)
        else:
            x = mid = x + a
            if hook is not None:
                x = mid = hook(n["resid_mid"], mid)
            m = self.mlp(self.mlp_norm(mid), hook)
        if self.cfg.sandwich_norm:
            m = self.post_mlp_norm(m)
        if hook is not None:
            m = hook(n["mlp_out"], m)
        out = mid + m
        if hook is not None:
            out = hook(n["resid_post"], out)
        return out


# ----------------------------------------------------------------------------- hooks


class HookContext:
    """The hooks active for one forward pass, and the facts position-aware hooks need about it.

    ``hooks``: name -> functions. A function is called ``fn(x, name)``, or ``fn(x, name, ctx)``
    when it has the attribute ``wants_context = True``; one that returns a tensor replaces the
    activation, one that returns None only looks.
    ``input_ids``: (B, T) the tokens of this call; ``positions``: (B, T) their positions.
    """

    def __init__(self, hooks: dict[str, list[HookFn]], input_ids: torch.Tensor, positions: torch.Tensor):
        self.hooks, self.input_ids, self.positions = hooks, input_ids, positions

    def wants(self, name: str) -> bool:
        return name in self.hooks

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(name, ()):
            out = fn(x, name, self) if getattr(fn, "wants_context", False) else fn(x, name)
            if out is not None:
                x = out
        return x


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_weight_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        self.hooks: dict[str, list[HookFn]] = {}  # managed by lmlab.inspect
        self._rope_cache: dict = {}

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache=None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T).

        positions: (B, T) position of each token (default: cache length + 0..T-1).
        cache: a KVCache (lmlab.engine.cache); new keys/values are written at cache.length.
        key_mask: (B, S) bool, False for padding slots (left-padded batches).
        last_only: compute logits for the last position only (B, 1, V), as decoding needs.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        hook = self.hook_context(input_ids, positions)

        x = self.embed(input_ids, positions, hook)  # (B, T, C)
        ropes = self.rope_tables(positions, x.dtype)
        masks, is_causal = self._masks(B, T, start, key_mask, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, ropes.get(self._theta(i)), masks[cfg.layer_types[i]], is_causal, cache, hook)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.head(x, hook)

    def hook_context(self, input_ids: torch.Tensor, positions: torch.Tensor) -> HookContext | None:
        """The hooks of a forward pass over input_ids at positions (both (B, T)); None without hooks."""
        return HookContext(self.hooks, input_ids, positions) if self.hooks else None

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, hook: HookContext | None = None) -> torch.Tensor:
        """The residual stream's start (B, T, C): token embeddings, plus learned positions (gpt2)."""
        cfg = self.cfg
        x = self.tok_embed(input_ids)  # (B, T, C)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)  # rounded to the model dtype, like the reference
        if hook is not None:
            x = hook("embed", x)
        if cfg.pos == "learned":
            p = self.pos_embed(positions)
            if hook is not None:
                p = hook("pos_embed", p)
            x = x + p
        return x

    def rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
        """{theta: (cos, sin)}, each (B, 1, T, rotary_dim), for every RoPE base the layers use ({} without RoPE)."""
        if self.cfg.pos != "rope":
            return {}
        thetas = {self._theta(i) for i in range(self.cfg.n_layers)}
        return {theta: rope_cos_sin(self._inv_freq(theta, positions.device), positions, dtype) for theta in thetas}

    def head(self, x: torch.Tensor, hook: HookContext | None = None) -> torch.Tensor:
        """Logits (B, T, V) from the residual stream (B, T, C): final norm, then the unembedding."""
        x = self.final_norm(x)
        if hook is not None:
            x = hook("final_norm", x)
        logits = self.lm_head(x)  # (B, T, V)
        softcap = self.cfg.final_logit_softcap
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if hook is not None:
            logits = hook("logits", logits)
        return logits

    # -- RoPE tables, built lazily per device so a model can move between devices
    def _inv_freq(self, theta: float, device) -> torch.Tensor:
        key = (theta, str(device))
        if key not in self._rope_cache:
            inv = rope_inv_freq(
                self.cfg.rotary_dim, theta, self.cfg.rope_scaling if theta == self.cfg.rope_theta else None
            )
            self._rope_cache[key] = inv.to(device)
        return self._rope_cache[key]

    def _theta(self, layer: int) -> float:
        cfg = self.cfg
        if cfg.rope_local_theta is not None and cfg.layer_types[layer] == "sliding":
            return cfg.rope_local_theta
        return cfg.rope_theta

    def _masks(self, B, T, start, key_mask, device) -> tuple[dict[str, torch.Tensor | None], bool]:
        """({layer type: mask}, is_causal). A mask is (B or 1, 1, T, S) bool, True where a query
        may attend, or None: one new token sees every cached one, or, with is_causal, a whole
        prompt with no padding is plain causal, which the attention kernel applies itself.

        Keys are cache slots 0..S-1; query t sits in slot start + t. A left-padded batch
        keeps each sequence's tokens contiguous, so slot distance equals token distance and
        the sliding window can be applied on slots.
        """
        S = start + T
        cfg = self.cfg
        window = cfg.sliding_window
        need_sliding = "sliding" in cfg.layer_types and window is not None and S > window
        if T == 1 and key_mask is None and not need_sliding:
            return {"full": None, "sliding": None}, False  # one new token sees every cached one
        if start == 0 and key_mask is None and not need_sliding:
            return {"full": None, "sliding": None}, True  # a whole prompt, no padding: SDPA's is_causal
        q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        full = k_slot <= q_slot  # causal (T, S)
        full = full[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            # Padding slots are never attended; a padding query attends to itself only, so
            # its row is never empty (an empty softmax row would give NaN).
            full = full & key_mask[:, None, None, :S]
            full = full | (k_slot == q_slot)[None, None]
        masks = {"full": full, "sliding": full}
        if need_sliding:
            masks["sliding"] = full & (q_slot - k_slot < window)[None, None]
        return masks, False

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields tied weights once
