"""LoRA on lmlab's Transformer: a low-rank update beside each frozen weight, named as HF names it.

lmlab stacks some of HF's matrices into one (q, k and v in ``attn.qkv``; gate and up in a
gated ``mlp.up``), so a LoRA target is a *part*: a block of rows of one lmlab Linear, which is
one HF module (``self_attn.q_proj`` is rows 0..H·D of ``attn.qkv``). ``LoRALinear`` wraps the
Linear and adds, for each targeted part p, to that part's rows of the output

    scale_p · B_p (A_p · dropout(x))        A_p: (r, in)   B_p: (rows_p, r)   scale_p = alpha / r

(rsLoRA: alpha / sqrt(r)). A is Kaiming-uniform as PEFT initialises it and B is zero, so the
wrapped model starts equal to the base. The base Linear (plain, FastLinear, a quantized one)
is left as it is and frozen; the adapter's parameters stay float32 whatever the base's dtype.

All parts of one module share one matmul for their A's (x times every A stacked: (N, sum r));
each part's B then writes its own block of output rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError

# ----------------------------------------------------------------------------- what can be targeted


@dataclass(frozen=True)
class Part:
    """One LoRA target of a block: rows [start, stop) of the lmlab Linear ``module``, HF's ``hf``."""

    short: str  # q | k | v | o | gate | up | down | qkv
    module: str  # lmlab's module in the block: attn.qkv | attn.o | mlp.up | mlp.down
    start: int
    stop: int
    hf: str  # HF's module path in the layer: self_attn.q_proj, attn.c_attn, attention.query_key_value...


@dataclass(frozen=True)
class FamilyLayout:
    """Where a family's LoRA targets are: the parts of one block and HF's prefix of a layer."""

    parts: tuple[Part, ...]
    hf_layer: str  # HF's name of layer i, formatted with i: "model.layers.{i}"
    fan_in_fan_out: bool = False  # HF stores these weights (in, out) (GPT-2's Conv1D)
    hf_row_order: dict = field(default_factory=dict)  # part short -> HF row i is lmlab row order[i]


def layout(cfg) -> FamilyLayout:
    """The LoRA targets of a model of this config."""
    H, K, D, C, Fd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    if cfg.family == "gpt2":
        parts = (
            Part("qkv", "attn.qkv", 0, (H + 2 * K) * D, "attn.c_attn"),
            Part("o", "attn.o", 0, C, "attn.c_proj"),
            Part("up", "mlp.up", 0, Fd, "mlp.c_fc"),
            Part("down", "mlp.down", 0, C, "mlp.c_proj"),
        )
        return FamilyLayout(parts, "transformer.h.{i}", fan_in_fan_out=True)
    if cfg.family == "gpt_neox":
        parts = (
            Part("qkv", "attn.qkv", 0, 3 * H * D, "attention.query_key_value"),
            Part("o", "attn.o", 0, C, "attention.dense"),
            Part("up", "mlp.up", 0, Fd, "mlp.dense_h_to_4h"),
            Part("down", "mlp.down", 0, C, "mlp.dense_4h_to_h"),
        )
        # HF interleaves per head, rows (head, [q|k|v], D); lmlab groups them [all q | all k | all v]
        order = torch.arange(3 * H * D).view(3, H, D).transpose(0, 1).reshape(-1)
        return FamilyLayout(parts, "gpt_neox.layers.{i}", hf_row_order={"qkv": order})
    q, kv = H * D, K * D
    parts = (
        Part("q", "attn.qkv", 0, q, "self_attn.q_proj"),
        Part("k", "attn.qkv", q, q + kv, "self_attn.k_proj"),
        Part("v", "attn.qkv", q + kv, q + 2 * kv, "self_attn.v_proj"),
        Part("o", "attn.o", 0, C, "self_attn.o_proj"),
        Part("gate", "mlp.up", 0, Fd, "mlp.gate_proj"),
        Part("up", "mlp.up", Fd, 2 * Fd, "mlp.up_proj"),
        Part("down", "mlp.down", 0, C, "mlp.down_proj"),
    )
    return FamilyLayout(parts, "model.layers.{i}")


ALL = ("all", "all-linear")


def target_names(cfg) -> list[str]:
    """Every name a target may be given by, for this model: short, HF's, lmlab's."""
    parts = layout(cfg).parts
    names = [p.short for p in parts] + [p.hf.rpartition(".")[2] for p in parts] + sorted({p.module for p in parts})
    return list(dict.fromkeys(names))


def resolve_targets(cfg, targets) -> list[Part]:
    """The parts that ``targets`` names (short names q/k/v/o/gate/up/down, HF's q_proj... or paths
    self_attn.q_proj, lmlab's modules attn.qkv / mlp.up..., or "all"), in the block's order."""
    parts = layout(cfg).parts
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    if not targets:
        raise LmlabError("no LoRA target was given; name some, e.g. targets=q,k,v,o or targets=all.")
    chosen: set[Part] = set()
    for t in targets:
        if t in ALL:
            chosen.update(parts)
            continue
        hit = {
            p
            for p in parts
            if t in (p.short, p.module, p.module.rpartition(".")[2] if p.module == "attn.qkv" else None)
            or p.hf == t
            or p.hf.endswith("." + t)
        }
        if not hit:
            raise LmlabError(
                f"LoRA target {t!r} matches no module of this {cfg.family} model; the names there are "
                f"{', '.join(target_names(cfg))} (or all)."
            )
        chosen |= hit
    return [p for p in parts if p in chosen]


# ----------------------------------------------------------------------------- the spec


@dataclass
class LoRASpec:
    """r, alpha, dropout, targets and rsLoRA: what ``--lora r=16,alpha=32,...`` says."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def check(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise LmlabError(f"LoRA rank r must be a positive integer, got {self.r}; use e.g. --lora r=16.")
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"LoRA dropout must be in [0, 1), got {self.dropout}; use e.g. --lora dropout=0.05.")
        if not self.alpha > 0:
            raise LmlabError(f"LoRA alpha must be positive, got {self.alpha}; use e.g. --lora alpha=32.")

    def to_dict(self) -> dict:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "rslora": self.rslora,
        }

    @classmethod
    def parse(cls, text: str | None) -> "LoRASpec":
        """``r=16,alpha=32,dropout=0.05,targets=q,k,v,o,rslora=1``: every key optional; the values
        after ``targets=`` up to the next ``key=`` are its list."""
        spec = cls()
        if not text:
            return spec
        key, values = None, {}
        for item in [s.strip() for s in text.split(",") if s.strip()]:
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip().lower()
                values[key] = [value.strip()]
            elif key == "targets":
                values[key].append(item)
            else:
                raise LmlabError(f"--lora {text!r}: {item!r} is not key=value; write e.g. r=16,alpha=32,targets=q,v.")
        known = {"r", "alpha", "dropout", "targets", "rslora"}
        for k, v in values.items():
            if k not in known:
                raise LmlabError(f"--lora: unknown key {k!r}; use r, alpha, dropout, targets, rslora.")
            try:
                if k == "r":
                    spec.r = int(v[0])
                elif k == "alpha":
                    spec.alpha = float(v[0])
                elif k == "dropout":
                    spec.dropout = float(v[0])
                elif k == "rslora":
                    spec.rslora = v[0].lower() in ("1", "true", "yes", "on")
                else:
                    spec.targets = tuple(t for t in v if t)
            except ValueError:
                raise LmlabError(f"--lora {k}={v[0]!r} is not a number; write e.g. {k}=16.") from None
        if "alpha" not in values:
            spec.alpha = 2.0 * spec.r  # the usual alpha = 2r
        spec.check()
        return spec


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank update on some blocks of its output rows (see the module doc).

    ``lora_A[p]`` (r_p, in) and ``lora_B[p]`` (rows_p, r_p) for each part p; ``scales[p]``.
    ``weight`` and ``bias`` are the base's, so code that reads a Linear's shape still works;
    the update lives only in ``forward`` (``merge`` folds it into the base weight).
    """

    def __init__(
        self, base: nn.Module, parts: list[Part], ranks: dict[str, int], scales: dict[str, float], dropout: float = 0.0
    ):
        super().__init__()
        self.base = base
        self.parts = sorted(parts, key=lambda p: p.start)
        # nn.Linear and lmlab's QuantLinear both say their shape (a quantized base: the door left open)
        self.out_features, in_features = base.out_features, base.in_features
        device = next(iter(base.parameters()), torch.empty(0)).device
        self.scales = dict(scales)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in self.parts:
            r = ranks[p.short]
            a = torch.empty(r, in_features, dtype=torch.float32, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT initialises lora_A
            self.lora_A[p.short] = nn.Parameter(a)
            self.lora_B[p.short] = nn.Parameter(torch.zeros(p.stop - p.start, r, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def stacked(self, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): every part's A stacked (R, in), and B as one (out, R) matrix holding scale_p · B_p
        in part p's rows and rank columns, zeros elsewhere (R = the ranks summed). With
        ``scaled=False`` B holds the B_p as they are (the caller applies the one shared scale)."""
        A = (
            torch.cat([self.lora_A[p.short] for p in self.parts])
            if len(self.parts) > 1
            else self.lora_A[self.parts[0].short]
        )
        Bs = [self.lora_B[p.short] * self.scales[p.short] if scaled else self.lora_B[p.short] for p in self.parts]
        if (
            self.parts[0].start == 0
            and self.parts[-1].stop == self.out_features
            and all(a.stop == b.start for a, b in zip(self.parts, self.parts[1:]))
        ):  # the parts tile the output rows (q, k, v; gate, up; one whole matrix): block-diagonal
            return A, Bs[0] if len(Bs) == 1 else torch.block_diag(*Bs)
        R = A.shape[0]
        blocks, row, col = [], 0, 0
        for p, b in zip(self.parts, Bs):  # in row order
            if p.start > row:
                blocks.append(A.new_zeros(p.start - row, R))  # rows of an untargeted part
            blocks.append(F.pad(b, (col, R - col - b.shape[1])))
            col, row = col + b.shape[1], p.stop
        if row < self.out_features:
            blocks.append(A.new_zeros(self.out_features - row, R))
        return A, torch.cat(blocks)  # (R, in), (out, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in): y below is then a tensor of its own, not a view
        y = self.base(x)  # (N, out)
        scales = {self.scales[p.short] for p in self.parts}
        one = len(scales) == 1  # every part's scale the same (the usual): it rides on the matmul
        A, B = self.stacked(scaled=not one)  # (R, in), (out, R): every part in one matmul each
        alpha = scales.pop() if one else 1.0
        h = F.linear(self.dropout(x).to(A.dtype), A)  # (N, R)
        if h.dtype == y.dtype and y._base is None:
            # y += alpha · h @ B.T in place: no delta tensor, and no copy of y into a new output as
            # an out-of-place addmm makes (the base's backward does not read its output; an
            # in-place op on a view would copy the whole gradient in backward instead)
            y.addmm_(h, B.t().to(y.dtype), alpha=alpha)  # (autocast does not cast an in-place op's inputs)
        else:
            y = y + (F.linear(h, B) * alpha).to(y.dtype)
        return y.view(*lead, y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight (out, in), float32: what ``merge`` adds to the base weight."""
        A, B = self.stacked()
        return B @ A

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p.short}: r={self.lora_A[p.short].shape[0]}" for p in self.parts)
        return f"parts=[{parts}]"


# ----------------------------------------------------------------------------- on a model


def lora_modules(model) -> dict[str, LoRALinear]:
    """lmlab module name ("blocks.0.attn.qkv") -> its LoRALinear, for every wrapped Linear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _parent(model, name: str):
    path, _, leaf = name.rpartition(".")
    return model.get_submodule(path), leaf


def wrap(model, layer: int, module: str, parts: list[Part], ranks: dict, scales: dict, dropout: float) -> LoRALinear:
    """Wrap ``blocks.{layer}.{module}`` in a LoRALinear (or add parts to the one there)."""
    name = f"blocks.{layer}.{module}"
    parent, leaf = _parent(model, name)
    current = getattr(parent, leaf)
    if isinstance(current, LoRALinear):
        raise LmlabError(f"{name} already has a LoRA adapter; merge or remove it before adding another.")
    current.requires_grad_(False)
    wrapped = LoRALinear(current, parts, ranks, scales, dropout)
    setattr(parent, leaf, wrapped)
    return wrapped


def add_lora(model, spec: LoRASpec) -> dict[str, LoRALinear]:
    """Freeze every base parameter and wrap the targeted Linears of every block; returns them."""
    spec.check()
    parts = resolve_targets(model.cfg, spec.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[Part]] = {}
    for p in parts:
        by_module.setdefault(p.module, []).append(p)
    for i in range(model.cfg.n_layers):
        for module, ps in by_module.items():
            wrap(model, i, module, ps, {p.short: spec.r for p in ps}, {p.short: spec.scale for p in ps}, spec.dropout)
    return lora_modules(model)


def lora_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under lmlab's names ("blocks.0.attn.qkv.lora_A.q"): a checkpoint."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def merge_lora(model) -> int:
    """Fold every adapter into its base weight (W += scale·B·A, in float32, then the weight's dtype)
    and put the base Linear back in its place; returns how many Linears changed."""
    n = 0
    for name, m in lora_modules(model).items():
        w = m.base.weight
        if getattr(m.base, "qweight", None) is not None:
            raise LmlabError("merging a LoRA adapter into quantized weights is not supported; load the base in float.")
        w.copy_((w.float() + m.delta_weight().to(w.device)).to(w.dtype))
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, m.base)
        n += 1
    return n


def remove_lora(model) -> None:
    """Put every base Linear back, dropping the adapters unmerged."""
    for name, m in lora_modules(model).items():
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, m.base)
