"""The training loop: lmlab's own Transformer, trained from scratch, in a few named steps.

``train(tc)`` runs a whole training run and records it; the steps it is made of:

- ``setup_distributed``: one process, or DDP under ``torchrun`` (gloo on CPU, nccl on GPU);
- ``choose_precision``: bf16 autocast where the hardware multiplies bf16 (AVX512-BF16 / AMX,
  or a GPU that supports it), else float32;
- ``init_weights``: GPT-2's initialisation (normal 0.02, residual projections scaled by
  1/sqrt(2·layers)) on the model ``model.py`` builds;
- ``make_optimizer``: AdamW, fused where torch has it, weight decay on matrices only;
- ``lr_at``: linear warmup, then cosine decay to ``min_lr``;
- ``planned_workers``, ``row_split``: on a CPU, the threads each batch's rows are split between;
- ``train_step``: gradient accumulation, the global norm clipped, one optimiser step;
- ``estimate_loss``: mean train and val loss over fixed batches;
- ``sample``: text from the model, with a KV cache, so a person sees it learn.

The speed comes from outside the model: ``torch.compile`` of the loss, a fused AdamW, batches
read from a memory map, and on a CPU each batch's rows split between the threads
(``lmlab.train.split``). The model is ``lmlab.model.Transformer``, unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.host import keep_freed_memory
from lmlab.train.checkpoint import (
    CHECKPOINT,
    RESUMABLE_CHANGES,
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from lmlab.train.config import TrainConfig, model_config

# ----------------------------------------------------------------------------- set-up


class Dist:
    """Where this process stands: rank, world size, device, and whether it is the writer (rank 0)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of a number over all processes (itself in one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when any process says True (a Ctrl-C on one stops all at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def setup_distributed(device: str) -> Dist:
    """One process, or DDP when ``torchrun`` set WORLD_SIZE > 1: gloo on CPU, nccl on GPU."""
    from lmlab.loading import parse_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=parse_device(device))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def choose_precision(asked: str, device: torch.device) -> str:
    """'bfloat16' (autocast) or 'float32'. auto: bf16 where the hardware has bf16 matmul."""
    if asked != "auto":
        if asked == "bfloat16" and not bf16_supported(device):
            raise LmlabError(
                f"--dtype bfloat16 was asked for, but this {device.type} has no bf16 matmul; use --dtype float32."
            )
        return asked
    return "bfloat16" if bf16_supported(device) else "float32"


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from lmlab.host import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def autocast(device: torch.device, precision: str):
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases 0, norms 1, and the projections that
    write into the residual stream (attn.o, mlp.down) N(0, 0.02 / sqrt(2 · layers))."""
    for name, p in model.named_parameters():
        if name.endswith(("attn.o.weight", "mlp.down.weight")):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))
        elif p.dim() >= 2:
            nn.init.normal_(p, 0.0, 0.02)
        elif name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.zeros_(p)


def new_model(cfg, device: torch.device) -> nn.Module:
    """A Transformer to train, in train mode: GPT-2's initialisation (``init_weights``, from
    torch's current seed), and the Linear layers a loaded model has (``kernels.speed_up``), whose
    products in training take the fastest route for their shape (``fused.linear``)."""
    from lmlab import kernels
    from lmlab.model import Transformer

    model = Transformer(cfg).to(device)
    init_weights(model, cfg.n_layers)
    kernels.speed_up(model)
    return model.train()


def make_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (embeddings and Linear weights) only:
    norms and biases are not decayed. Fused (one kernel over all parameters) where torch has it."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # a device or torch without the fused kernel
        return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine
    decay to ``min_lr`` at ``steps`` (nanoGPT's schedule)."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / (tc.warmup + 1)
    if step >= tc.steps:
        return tc.min_lr
    ratio = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


class LossModel(nn.Module):
    """The model and its loss in one module, so torch.compile fuses the cross-entropy too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_step(
    net, model, opt, batches, tc: TrainConfig, step: int, dist: Dist, precision: str, split=None
) -> torch.Tensor:
    """One optimiser step: ``grad_accum`` micro-batches (DDP syncs gradients on the last only;
    ``split``, a ``RowSplit``, divides each one's rows between threads), the gradient norm
    clipped, AdamW at this step's learning rate. Returns the mean loss as a tensor (reading it
    waits for the step, so the loop reads it only when it reports)."""
    with split.step() if split is not None else contextlib.nullcontext():
        return _train_step(net, model, opt, batches, tc, step, dist, precision, split)


def _train_step(net, model, opt, batches, tc: TrainConfig, step: int, dist: Dist, precision: str, split):
    lr = lr_at(step, tc)
    for g in opt.param_groups:
        g["lr"] = lr
    total = torch.zeros((), device=dist.device)
    for micro in range(tc.grad_accum):
        x, y = batches.next()
        if split is not None:
            total += split.forward_backward(x, y, 1 / tc.grad_accum)
            continue
        x, y = x.to(dist.device), y.to(dist.device)
        last = micro == tc.grad_accum - 1
        sync = net.no_sync() if dist.world > 1 and not last else contextlib.nullcontext()
        with sync, autocast(dist.device, precision):
            loss = net(x, y) / tc.grad_accum
        loss.backward()
        total += loss.detach()
    if split is not None:
        split.reduce()
    if tc.grad_clip > 0:
        clip_gradients(model, opt, tc.grad_clip, split)
    adamw_step(opt, split)
    opt.zero_grad(set_to_none=True)
    return total


def clip_gradients(model: nn.Module, opt: torch.optim.Optimizer, max_norm: float, split=None) -> None:
    """``clip_grad_norm_(model.parameters(), max_norm)`` before ``opt.step()``. A fused AdamW takes
    the scaling as its ``grad_scale`` (it divides each gradient as it reads it), which saves the
    pass that multiplies every gradient in place; the norm is the same ``_foreach_norm`` (with
    ``split``, a ``RowSplit``, its threads each take a part of the parameters)."""
    if not opt.defaults.get("fused"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norms = torch._foreach_norm(grads) if split is None else split.map(torch._foreach_norm, grads, _sizes(grads))
    total = torch.linalg.vector_norm(torch.stack(norms))
    opt.grad_scale = (total + 1e-6).div(max_norm).clamp_(min=1.0)  # 1 / clip_grad_norm_'s clip_coef_clamped


def _sizes(tensors: list) -> list[int]:
    return [t.numel() for t in tensors]


def adamw_step(opt: torch.optim.Optimizer, split=None) -> None:
    """``opt.step()`` for the fused AdamW ``make_optimizer`` builds, as one ``_fused_adamw_`` call per
    group on lists made here: the same kernel, the same arguments and the same state tensors
    (``opt.state_dict()`` is unchanged), without ``Optimizer.step``'s per-step Python (hooks,
    grouping by device and dtype, state checks): 0.78 -> 0.50 ms at nanoGPT's baby shape. The first
    step, and any optimizer this does not describe, goes through ``opt.step()``. With ``split``
    (a ``RowSplit``) its threads each update a part of the parameters."""
    d = opt.defaults
    if not (d.get("fused") and d.get("decoupled_weight_decay", True)) or d.get("amsgrad") or d.get("maximize"):
        return opt.step()
    groups = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        if any(not st or p.device.type != "cpu" for p, st in zip(params, states)):
            return opt.step()  # the first step makes the state
        groups.append((group, params, states))
    scale = getattr(opt, "grad_scale", None)
    for group, params, states in groups:
        if not params:
            continue
        beta1, beta2 = group["betas"]

        def update(part, group=group, beta1=beta1, beta2=beta2):
            if not part:
                return
            ps, sts = [p for p, _ in part], [st for _, st in part]
            steps = [st["step"] for st in sts]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                ps, [p.grad for p in ps], [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, grad_scale=scale, found_inf=None,
            )  # fmt: skip

        pairs = list(zip(params, states))
        update(pairs) if split is None else split.map(update, pairs, _sizes(params))


# ----------------------------------------------------------------------------- estimates


def flops_per_token(cfg, block: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward; position embeddings left
    out) plus attention's 12 · layers · heads · head_dim · block (nanoGPT's estimate_mfu)."""
    n = sum(p.numel() for name, p in _named_shapes(cfg) if name != "pos_embed.weight")
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * block


def _named_shapes(cfg):
    from lmlab.model import Transformer

    with torch.device("meta"):
        m = Transformer(cfg)
    return list(m.named_parameters())


def count_parameters(cfg) -> int:
    return sum(p.numel() for _, p in _named_shapes(cfg))


def estimate_memory(cfg, tc: TrainConfig, precision: str, world: int = 1, workers: int = 1) -> int:
    """Bytes one process needs, estimated: weights, gradients and AdamW's two moments (16 bytes a
    parameter, and 4 more for each thread's replica beyond the first: its own gradients) and the
    activations autograd keeps (per layer and token about 34·C + 5·H·T values, Korthikanti et
    al. 2022, plus the logits' 3·V), in the activations' width."""
    params = count_parameters(cfg)
    rows = max(1, tc.batch_size // world)
    width = 2 if precision == "bfloat16" else 4
    T, C, H, V = tc.block_size, cfg.d_model, cfg.n_heads, cfg.vocab_size
    acts = rows * T * (cfg.n_layers * (34 * C + 5 * H * T) + 3 * V) * width
    return (16 + 4 * (workers - 1)) * params + acts


def planned_workers(tc: TrainConfig, cfg, dist: Dist, compiled: bool) -> int:
    """The threads that each take a share of every batch's rows (``lmlab.train.split``; 1: none):
    on the CPU, in one process, without torch.compile, ``tc.workers``, or where that is 0 the
    most of torch's threads that divide the batch evenly into shares of enough work each
    (``split.MIN_SHARE_FLOPS``)."""
    from lmlab.train.split import split_workers

    if dist.device.type != "cpu" or dist.world > 1 or compiled:
        return 1
    row_flops = flops_per_token(cfg, tc.block_size) * tc.block_size
    return split_workers(tc.workers, tc.batch_size, torch.get_num_threads(), row_flops)


def time_step(net, model: nn.Module, split, tc: TrainConfig, dist: Dist, precision: str) -> float:
    """Seconds a step's forward and backward passes take here (its ``grad_accum`` micro-batches,
    not AdamW's update): one micro-batch of zeros through the step's own path (``split`` or
    ``net``), timed on the second of two passes (the first loads the native library, times each
    product's routes and warms the allocator). The weights, AdamW's state, the data's position
    and the RNG are untouched; the gradients are dropped."""
    x = torch.zeros(tc.batch_size // dist.world, tc.block_size, dtype=torch.long, device=dist.device)
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        if split is not None:
            with split.step():
                split.forward_backward(x, x, 1.0)
        else:
            with autocast(dist.device, precision):
                loss = net(x, x)
            loss.backward()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    for params in split.params if split is not None else [list(model.parameters())]:
        for p in params:
            p.grad = None
    return seconds * tc.grad_accum


def row_split(model: nn.Module, workers: int, dist: Dist, precision: str):
    """The ``RowSplit`` of ``workers`` threads a run trains with (``close()`` ends its threads),
    or None for one."""
    from lmlab.train.split import RowSplit

    return RowSplit(model, workers, LossModel, lambda: autocast(dist.device, precision)) if workers > 1 else None


# ----------------------------------------------------------------------------- sampling and eval


@torch.no_grad()
def sample(
    model, prompt_ids: list[int], n_tokens: int, *, temperature: float = 0.8, top_k: int = 50, seed: int = 0
) -> list[int]:
    """``n_tokens`` ids after the prompt, sampled with its own generator (training's RNG is
    untouched). A KV cache serves up to the model's context; past it, each step recomputes the
    last ``max_seq_len`` tokens, as nanoGPT's generate does."""
    from lmlab.engine.cache import KVCache

    was_training = model.training
    model.eval()
    cfg = model.cfg
    dev = model.tok_embed.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids = list(prompt_ids)[-cfg.max_seq_len :]
    cache = KVCache(cfg, 1, cfg.max_seq_len, torch.float32, dev)
    new: list[int] = []
    logits = model(torch.tensor([ids], device=dev), cache=cache, last_only=True)
    for _ in range(n_tokens):
        probs = logits[0, -1].float().div(max(temperature, 1e-5))
        if top_k and top_k < probs.shape[-1]:
            kth = torch.topk(probs, top_k).values[-1]
            probs = probs.masked_fill(probs < kth, float("-inf"))
        nxt = int(torch.multinomial(probs.softmax(-1), 1, generator=gen))
        new.append(nxt)
        ids.append(nxt)
        if cache is not None and cache.length < cfg.max_seq_len:
            logits = model(torch.tensor([[nxt]], device=dev), cache=cache, last_only=True)
        else:
            cache = None
            logits = model(torch.tensor([ids[-cfg.max_seq_len :]], device=dev), last_only=True)
    model.train(was_training)
    return new


@torch.no_grad()
def estimate_loss(model, batches_by_split: dict, iters: int, device, precision: str, dist: Dist) -> dict:
    """Mean loss over ``iters`` fixed batches of each split (the same batches at every eval)."""
    was_training = model.training
    model.eval()
    out = {}
    for split, make in batches_by_split.items():
        b = make()
        total = 0.0
        for _ in range(iters):
            x, y = b.next()
            with autocast(device, precision):
                logits = model(x.to(device))
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item()
        out[split] = dist.mean(total / iters)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the run


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary, save and exit;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.set = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def train(
    tc: TrainConfig,
    *,
    resume: str | None = None,
    asked: dict | None = None,
    record: bool = True,
    wandb: bool | None = None,
    log=_say,
    progress: bool | None = None,
) -> dict:
    """Train a model as ``tc`` says (or continue ``resume``); returns the summary (losses,
    tokens/s, MFU, wall time, output folder). ``asked``: the options the user gave explicitly,
    checked against a resumed checkpoint. Only rank 0 writes files and records the run."""
    from lmlab.runs import record_run

    t_start = time.perf_counter()
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        saved = TrainConfig.from_dict(state["train_config"])
        check_compatible(saved.to_dict(), asked or {}, checkpoint_path(resume))
        keep = {k: v for k, v in (asked or {}).items() if k in RESUMABLE_CHANGES and k != "out"}
        tc = saved.replace(out=str(checkpoint_path(resume).parent), **keep)
    tc.check()
    dist = setup_distributed(tc.device)
    if tc.batch_size % dist.world:
        raise LmlabError(
            f"--batch-size {tc.batch_size} does not split over {dist.world} processes; use a multiple of {dist.world}."
        )
    device = dist.device
    out = Path(tc.out)
    if state is None and (out / CHECKPOINT).exists():
        raise LmlabError(
            f"{out} already holds a training checkpoint; continue it with lmlab train --resume {out}, "
            "or pass another --out."
        )
    precision = state["precision"] if state is not None else choose_precision(tc.dtype, device)
    if state is not None and tc.dtype not in ("auto", precision):
        raise LmlabError(f"--resume: the checkpoint trained in {precision}; a resumed run keeps it, drop --dtype.")

    from lmlab.train.data import Batches, prepare
    from lmlab.train.tokenizing import TrainTokenizer

    if dist.world > 1 and not dist.main:
        torch.distributed.barrier()  # rank 0 tokenizes into the cache first; the others then read it
    data = prepare(tc.data, tc.tokenizer, log=log if dist.main else None)
    if dist.world > 1 and dist.main:
        torch.distributed.barrier()
    if state is not None and state.get("data_hash") not in (None, data.data_hash):
        raise LmlabError(
            f"--resume {out}: the data changed since that checkpoint was written; restore it, or start "
            "a new run with another --out."
        )
    tok = data.tokenizer if state is None else TrainTokenizer.from_json(state["tokenizer_json"], state["tokenizer"])
    cfg = model_config(tc, tok.vocab_size, bos=tok.bos_id, eos=[tok.eos_id] if tok.eos_id is not None else [])

    n_params = count_parameters(cfg)
    compiled = tc.compile if tc.compile is not None else device.type == "cuda"
    workers = planned_workers(tc, cfg, dist, compiled)
    mem = estimate_memory(cfg, tc, precision, dist.world, workers)
    _check_memory(mem, tc)
    flops_tok = flops_per_token(cfg, tc.block_size)
    peak = _peak_gflops(device, precision, log if dist.main else None) if dist.main else None

    torch.manual_seed(tc.seed)
    model = new_model(cfg, device)
    opt = make_optimizer(model, tc, device)
    batches = Batches(data.train, tc.block_size, tc.batch_size, tc.seed, dist.rank, dist.world)
    history = {"points": [], "samples": [], "evals": []}
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        batches.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_step = state["step"]
        history = state["history"]

    net: nn.Module = LossModel(model)
    if compiled:
        net = torch.compile(net)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net)

    eval_batches = {
        "train": lambda: Batches(data.train, tc.block_size, tc.batch_size, tc.seed + 1, dist.rank, dist.world),
        "val": lambda: Batches(data.val, tc.block_size, tc.batch_size, tc.seed + 2, dist.rank, dist.world),
    }
    eval_batches["val"]()  # a validation split too short for the block fails now, not at the first eval
    prompt = _sample_prompt(tok)
    unigram = data.unigram_loss() if dist.main else None

    tokens_step = tc.tokens_per_step
    if dist.main:
        log(
            f"model {cfg.family}-shaped Transformer · {n_params / 1e6:.2f}M parameters · {cfg.n_layers} layers · "
            f"{cfg.d_model} wide · {cfg.n_heads} heads · block {tc.block_size} · "
            f"vocab {cfg.vocab_size} ({tc.tokenizer})"
        )
        log(
            f"data {data.description}: {len(data.train):,} train / {len(data.val):,} val tokens · unigram baseline "
            f"{unigram:.3f} nats/token"
        )
        log(
            f"batch {tc.batch_size} x {tc.block_size} tokens x {tc.grad_accum} accumulation = {tokens_step:,} tokens a "
            f"step over {dist.world} process{'es' if dist.world > 1 else ''} · {precision}"
            f"{' autocast' if precision == 'bfloat16' else ''} · compile {'on' if compiled else 'off'}"
            + (
                f" · each batch's rows split over {workers} threads ({tc.batch_size // workers} rows each)"
                if workers > 1
                else ""
            )
        )

    config_record = {
        **tc.to_dict(),
        "precision": precision,
        "world_size": dist.world,
        "workers": workers,
        "parameters": n_params,
        "model_config": cfg.to_dict(),
        "resumed_from_step": start_step or None,
    }
    inputs = {
        "data": data.description,
        "data_hash": data.data_hash,
        "tokenizer": tc.tokenizer,
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
    }
    run_ctx = record_run(
        "train",
        model=str(out),
        config=config_record,
        seed=tc.seed,
        inputs=inputs,
        record=record and dist.main,
        wandb=wandb if dist.main else False,
    )
    with run_ctx as run, _StopFlag() as stop, keep_freed_memory():  # steps reuse their memory
        split = row_split(model, workers, dist, precision)
        try:
            step_s = time_step(net, model, split, tc, dist, precision)
            if dist.main:
                log(
                    f"estimated memory {mem / 2**20:,.0f} MiB a process · "
                    + f"about {_fmt_time(1000 * step_s)} per 1,000 steps here (one step's passes timed)"
                    + (f" · resuming at step {start_step}" if start_step else "")
                )
            loop = _Loop(
                tc,
                cfg,
                model,
                net,
                opt,
                batches,
                eval_batches,
                tok,
                prompt,
                dist,
                precision,
                history,
                run,
                data,
                unigram,
                peak,
                flops_tok,
                log,
                progress,
                split,
            )
            summary = loop.run(start_step, stop)
        finally:
            if split is not None:
                split.close()
        summary["wall_s"] = round(time.perf_counter() - t_start, 2)
        run.add_metrics(wall_s=summary["wall_s"])
        if dist.main:
            from lmlab.runs import file_hash

            try:
                run.model_hash = file_hash(out / "model.safetensors")
            except OSError:
                pass
            summary["run_id"] = run.id
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return summary


def _check_memory(need: int, tc: TrainConfig) -> None:
    import psutil

    free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise LmlabError(
            f"this model needs about {need / 2**30:.1f} GiB to train (weights, gradients, AdamW state, activations) "
            f"but {free / 2**30:.1f} GiB are free; choose a smaller --size or --batch-size."
        )


def _peak_gflops(device, precision: str, log) -> float | None:
    """The machine's measured matmul peak (GFLOP/s) for this precision (``lmlab bench --machine``; cached)."""
    from lmlab.bench.machine import machine_limits

    try:
        entry = machine_limits(device, on_measure=log)
        return (entry.get("matmul_gflops") or {}).get(precision)
    except Exception:  # noqa: BLE001 - MFU is a nicety: never stop training for it
        return None


def _sample_prompt(tok) -> list[int]:
    ids = tok.encode("\n")
    if tok.eos_id is not None:
        return [tok.eos_id]
    return ids[-1:] if ids else [0]


def _fmt_time(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class _Loop:
    """The steps of one run, with the state they share."""

    def __init__(
        self,
        tc,
        cfg,
        model,
        net,
        opt,
        batches,
        eval_batches,
        tok,
        prompt,
        dist,
        precision,
        history,
        record,
        data,
        unigram,
        peak,
        flops_tok,
        log,
        progress,
        split,
    ):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.out = Path(tc.out)
        self.train_time = 0.0  # seconds in training steps after the first (compile, warm-up)
        self.train_tokens = 0
        self.last_loss = float("nan")

    # -- one optimiser step

    def train_step(self, step: int) -> torch.Tensor:
        return train_step(
            self.net, self.model, self.opt, self.batches, self.tc, step, self.dist, self.precision, self.split
        )

    # -- the loop

    def run(self, start: int, stop: _StopFlag) -> dict:
        tc, dist = self.tc, self.dist
        bar = self._progress(start)
        save_every = tc.save_every or tc.eval_every
        step = start
        interrupted = False
        try:
            while step < tc.steps:
                if step % tc.eval_every == 0 and not (step == start and start > 0):
                    self.evaluate(step, bar)
                if tc.sample_every and step % tc.sample_every == 0 and step > 0 and step != start:
                    self.show_sample(step, bar)
                t0 = time.perf_counter()
                loss = self.train_step(step)
                step += 1
                is_log = step % tc.log_every == 0 or step == tc.steps
                if is_log or step - start <= 1:
                    self.last_loss = dist.mean(float(loss))  # reading the loss waits for the step
                dt = time.perf_counter() - t0
                if step - start > 1:  # the first step compiles and warms up: not a measure of speed
                    self.train_time += dt
                    self.train_tokens += tc.tokens_per_step
                if is_log:
                    self.history["points"].append(
                        {"step": step, "train_loss": round(self.last_loss, 6), "lr": lr_at(step - 1, tc)}
                    )
                self._tick(bar, step)
                if dist.any(stop.set):
                    interrupted = True
                    break
                if step % save_every == 0 and step < tc.steps:
                    self.save(step)
            if not interrupted:
                self.evaluate(step, bar)
                if self.tc.sample_tokens:
                    self.show_sample(step, bar)
        finally:
            if bar is not None:
                bar.stop()
        self.save(step, final=True)
        summary = self.summary(step)
        if interrupted:
            if dist.main:
                self.log(
                    f"interrupted at step {step}/{tc.steps}; the checkpoint is saved in {self.out}. "
                    f"Resume with: lmlab train --resume {self.out}"
                )
            self.run_record_update(summary)
            raise KeyboardInterrupt
        self.run_record_update(summary)
        return summary

    def evaluate(self, step: int, bar) -> None:
        losses = estimate_loss(
            self.model, self.eval_batches, self.tc.eval_iters, self.dist.device, self.precision, self.dist
        )
        self.history["evals"].append(
            {"step": step, "train_loss": round(losses["train"], 6), "val_loss": round(losses["val"], 6)}
        )
        # the val loss joins the curve's point at this step (or starts one)
        points = self.history["points"]
        if points and points[-1]["step"] == step:
            points[-1]["val_loss"] = round(losses["val"], 6)
        else:
            points.append({"step": step, "val_loss": round(losses["val"], 6)})
        if self.dist.main:
            self._print(
                bar,
                f"step {step}/{self.tc.steps} · train loss {losses['train']:.4f} · val loss "
                f"{losses['val']:.4f}" + self._speed_text(),
            )
        self.run_record_update(None)

    def show_sample(self, step: int, bar) -> None:
        if not self.dist.main:
            return
        ids = sample(self.model, self.prompt, min(self.tc.sample_tokens, 10_000), seed=self.tc.seed)
        text = self.tok.decode(ids)
        self.history["samples"].append({"step": step, "text": text})
        self._print(bar, f"--- sample at step {step} ---\n{text}\n---")

    def save(self, step: int, final: bool = False) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "train_config": self.tc.to_dict(),
            "model_config": self.cfg.to_dict(),
            "precision": self.precision,
            "tokenizer": self.tok.meta(),
            "tokenizer_json": self.tok.to_json(),
            "data_rng": self.batches.state,
            "torch_rng": torch.get_rng_state(),
            "data_hash": self.data.data_hash,
            "history": self.history,
        }
        save_checkpoint(state, self.out / CHECKPOINT)
        if final:
            from lmlab.train.export import save_hf_folder

            save_hf_folder(self.model, self.cfg, self.tok, self.out)

    # -- reporting

    def tokens_per_s(self) -> float | None:
        return self.train_tokens / self.train_time if self.train_time > 0 else None

    def mfu(self) -> float | None:
        tps = self.tokens_per_s()
        if not tps or not self.peak:
            return None
        return tps * self.flops_tok / (self.peak * 1e9 * self.dist.world)

    def _speed_text(self) -> str:
        tps, mfu = self.tokens_per_s(), self.mfu()
        s = f" · {tps:,.0f} tok/s" if tps else ""
        return s + (f" · MFU {100 * mfu:.1f}%" if mfu else "")

    def summary(self, step: int) -> dict:
        evals = self.history["evals"]
        last = evals[-1] if evals else {}
        tps, mfu = self.tokens_per_s(), self.mfu()
        return {
            "steps": step,
            "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"),
            "last_step_loss": round(self.last_loss, 6),
            "unigram_loss": round(self.unigram, 4) if self.unigram is not None else None,
            "tokens_per_s": round(tps, 1) if tps else None,
            "mfu": round(mfu, 4) if mfu else None,
            "tokens": step * self.tc.tokens_per_step,
            "precision": self.precision,
            "world_size": self.dist.world,
            "out": str(self.out),
            "points": self.history["points"],
            "samples": self.history["samples"],
        }

    def run_record_update(self, summary: dict | None) -> None:
        run = self.record
        if run is None or not self.dist.main:
            return
        evals = self.history["evals"]
        last = evals[-1] if evals else {}
        tps, mfu = self.tokens_per_s(), self.mfu()
        run.add_metrics(
            train_loss=last.get("train_loss"),
            val_loss=last.get("val_loss"),
            loss=last.get("val_loss"),
            tokens_per_s=round(tps, 1) if tps else None,
            mfu=round(mfu, 4) if mfu else None,
            unigram_loss=self.unigram,
            points=self.history["points"],
        )
        run.outputs = {
            "out": str(self.out),
            "folder": str(Path(self.out).resolve()),  # what `lmlab train --compare FOLDER` finds the run by
            "samples": self.history["samples"],
            "resume": f"lmlab train --resume {self.out}",
        }
        if summary is not None:
            run.add_metrics(steps=summary["steps"], tokens=summary["tokens"])
        run.checkpoint()

    def _progress(self, start: int):
        if not self.dist.main:
            return None
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        bar.add_task("train", total=self.tc.steps, completed=start, stats="")
        bar.start()
        return bar

    def _tick(self, bar, step: int) -> None:
        if bar is None:
            return
        stats = f"loss {self.last_loss:.4f}" + self._speed_text()
        bar.update(bar.task_ids[0], completed=step, stats=stats)

    def _print(self, bar, text: str) -> None:
        if bar is not None:
            bar.console.print(text, markup=False, highlight=False)
        else:
            self.log(text)
