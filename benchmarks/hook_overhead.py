"""What do hook points cost? Forward (prefill) and decode speed with and without hooks.

    python benchmarks/hook_overhead.py                       # SmolLM2-135M shapes, random weights
    python benchmarks/hook_overhead.py --model smollm2-135m  # real weights (same speed)

Rows:
- baseline: lmlab.model with every hook statement removed by an AST transform of its source
  (``if hook is not None: ...`` blocks dropped, ``hook is not None`` -> False). It is the same
  forward pass as if hooks had never been written, sharing the same weight tensors.
- no hooks: the real model with ``model.hooks == {}``. Target: within 3%.
- identity hook on every resid_post: a look-only hook per block (attention stays fused).
- identity hooks at every point: includes attn.scores/pattern, so attention runs eagerly.

Every row prefills and decodes through the engine's steps (``lmlab.engine.steps``). The first
four decode through model.py (``use_native=False``, what ``lm.native_decode = False`` gives):
they measure what hook points cost in the PyTorch forward. The last row is what a user runs
with no hook: the decode steps go to the native step (``lmlab.native.decode_step``); any hook
sends them back to model.py.

Runs are interleaved (each round times every row once) and the median is reported, so
drift of the machine hits every row alike. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import statistics
import sys
import time
import types

import torch

import lmlab.model
from lmlab.config import ModelConfig
from lmlab.engine.cache import KVCache
from lmlab.engine.steps import decode_one_token, prefill
from lmlab.inspect.hooks import hook_names, registered

SMOLLM2_135M = dict(
    family="llama",
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_seq_len=8192,
    rope_theta=100000.0,
    tie_embeddings=True,
)


class _StripHooks(ast.NodeTransformer):
    """Remove every trace of hooks from lmlab/model.py's source."""

    @staticmethod
    def _is_hook_test(node) -> bool:
        return (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == "hook"
            and isinstance(node.ops[0], ast.IsNot)
        )

    def visit_Compare(self, node):
        return ast.Constant(False) if self._is_hook_test(node) else node

    def visit_If(self, node):
        self.generic_visit(node)
        if isinstance(node.test, ast.Constant) and node.test.value is False:
            return node.orelse or None  # the `if hook is not None:` block disappears
        return node

    def visit_Assign(self, node):
        targets = node.targets[0]
        if isinstance(targets, ast.Name) and targets.id == "hook":
            node.value = ast.Constant(None)  # hook = None: no HookSet is built
            return node
        if isinstance(targets, ast.Tuple) and any(
            isinstance(t, ast.Attribute) and t.attr.startswith("step_") for t in targets.elts
        ):
            return None  # the step_start / step_positions bookkeeping
        return self.generic_visit(node)


def stripped_model_module() -> types.ModuleType:
    tree = _StripHooks().visit(ast.parse(inspect.getsource(lmlab.model)))
    ast.fix_missing_locations(tree)
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hook"
    ]
    assert not calls, f"{len(calls)} hook calls survived the strip"
    module = types.ModuleType("lmlab_model_without_hooks")
    exec(compile(tree, "<lmlab.model without hooks>", "exec"), module.__dict__)
    return module


def baseline_copy(model):
    """The hook-free Transformer, sharing the weight tensors of ``model``."""
    mod = stripped_model_module()
    with torch.device("meta"):
        base = mod.Transformer(model.cfg)
    base.load_state_dict(model.state_dict(), assign=True)
    if model.cfg.tie_embeddings:
        base.lm_head.weight = base.tok_embed.weight
    return base.eval()


def time_prefill(model, ids, sync) -> float:
    sync()
    t0 = time.perf_counter()
    model(ids, last_only=True)
    sync()
    return time.perf_counter() - t0


def time_decode(model, ids, steps: int, sync, use_native: bool) -> float:
    """Seconds per decode step after a prefill of ids (the prefill is not timed)."""
    cfg = model.cfg
    B, T = ids.shape
    cache = KVCache(cfg, B, T + steps, next(model.parameters()).dtype, ids.device)
    positions = torch.arange(T, device=ids.device).expand(B, T)
    nxt = prefill(model, ids, positions, cache, None).argmax(-1, keepdim=True)  # (B, 1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        pos = torch.full((B, 1), cache.length, device=ids.device)
        nxt = decode_one_token(model, nxt, pos, cache, None, use_native=use_native).argmax(-1, keepdim=True)
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="load real weights (default: SmolLM2-135M shapes, random weights)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = lmlab.load(args.model, device=args.device).model
        label = args.model
    else:
        cfg = ModelConfig(**SMOLLM2_135M)
        model = lmlab.model.Transformer(cfg).eval().to(args.device)
        label = "SmolLM2-135M shapes (random weights)"
    base = baseline_copy(model)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), device=args.device)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    look = lambda x, name: None  # noqa: E731
    every = hook_names(model.cfg)
    rows = {  # name: (model, hooks, native decoding step)
        "baseline (hooks stripped from the source)": (base, [], False),
        "lmlab, no hook registered": (model, [], False),
        "identity hook on every resid_post": (model, [(n, look) for n in every if n.endswith("resid_post")], False),
        "identity hooks at every point (eager attention)": (model, [(n, look) for n in every], False),
        "no hook, native decoding step (the default)": (model, [], True),
    }
    times = {name: {"prefill": [], "decode": []} for name in rows}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (m, hooks, native_step) in rows.items():
                with registered(m, hooks):
                    p = time_prefill(m, ids, sync)
                    d = time_decode(m, ids, args.decode_steps, sync, use_native=native_step)
                if r:
                    times[name]["prefill"].append(p)
                    times[name]["decode"].append(d)

    where = torch.cuda.get_device_name() if ids.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{label}, {where}, prompt {args.prompt_len} tokens, {args.decode_steps} decode steps, "
        f"median of {args.rounds} rounds, torch {torch.__version__}"
    )
    ref = {k: statistics.median(v) for k, v in times["baseline (hooks stripped from the source)"].items()}
    print(f"| {'':48} | prefill ms | vs baseline | decode ms/token | vs baseline |")
    print(f"|{'-' * 50}|-----------:|------------:|----------------:|------------:|")
    for name in rows:
        p, d = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        print(
            f"| {name:48} | {p * 1e3:10.2f} | {100 * (p / ref['prefill'] - 1):+10.1f}% | {d * 1e3:15.2f} | "
            f"{100 * (d / ref['decode'] - 1):+10.1f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
