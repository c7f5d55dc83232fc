"""The native decoding step (lmlab.native.decode_step) against the PyTorch forward pass it replaces.

Every family's tiny random model takes the same cached steps twice, through the engine's
``decode_one_token``: once through ``csrc/native.c`` and once through ``model.py``
(``use_native=False``); the logits must agree within 1e-4 in float32 (the parity bar) and
within bf16 rounding in bfloat16. Ragged batches, sliding windows, more rows than one pass of
the kernel serves, buffers that grow, hooks and replaced parameters are covered too.
"""

import pytest
import torch
from torch import nn

import lmlab
from lmlab import native
from lmlab.engine.cache import KVCache, kv_dtype
from lmlab.engine.steps import decode_one_token, prefill
from tiny import FAMILIES, VOCAB, make_tiny

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native code {native.status()}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            make_tiny(family, made[family])
        return made[family]

    return get


def feed(n_rows, steps, seed=0):
    """The tokens fed at each step, (rows, steps): row i gets the same tokens in any batch."""
    return torch.randint(0, VOCAB, (n_rows, steps), generator=torch.Generator().manual_seed(seed))


def run_steps(lm, prompts, steps, use_native, tokens=None):
    """Prefill ragged prompts (left-padded, as the engine does), then `steps` decode steps; logits (B, steps, V)."""
    m, cfg = lm.model, lm.config
    B, T0 = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T0, dtype=torch.long)
    key_mask = torch.ones(B, T0 + steps, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p) :] = torch.tensor(p)
        key_mask[i, : T0 - len(p)] = False
    padded = bool((~key_mask).any())
    positions = (key_mask[:, :T0].long().cumsum(-1) - 1).clamp(min=0)
    next_pos = torch.tensor([len(p) for p in prompts])
    cache = KVCache(cfg, B, T0 + steps, kv_dtype(lm.dtype, "cpu"), "cpu")
    tokens = feed(B, steps) if tokens is None else tokens
    out = []
    with torch.inference_mode():
        prefill(m, ids, positions, cache, key_mask[:, :T0] if padded else None)
        for j in range(steps):
            nxt = tokens[:, j : j + 1]
            km = key_mask[:, : cache.length + 1] if padded else None
            logits = decode_one_token(m, nxt, next_pos[:, None], cache, km, use_native=use_native)  # (B, V)
            out.append(logits[:, None].float())
            next_pos = next_pos + 1
    return torch.cat(out, dim=1)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def count_native_calls(monkeypatch):
    """The native steps taken: one entry per call of native.decode_step that gave logits (not None)."""
    calls = []
    real = native.decode_step

    def counted(*a):
        logits = real(*a)
        if logits is not None:
            calls.append(1)
        return logits

    monkeypatch.setattr(native, "decode_step", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_native_step_equals_the_pytorch_forward_float32(family, folders, monkeypatch):
    lm = lmlab.load(folders(family))
    # 3 ragged rows; 14 steps carry the gemma3/mistral rows past their 8-token sliding window
    prompts = prompts_of([5, 11, 2])
    calls = count_native_calls(monkeypatch)
    got = run_steps(lm, prompts, 14, use_native=True)
    assert len(calls) == 14 and native.plan_for(lm.model).reason is None
    want = run_steps(lm, prompts, 14, use_native=False)
    assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())
    one = run_steps(
        lm, prompts[1:2], 14, use_native=True, tokens=feed(3, 14)[1:2]
    )  # a row alone computes what it does in the batch
    assert (one[0] - got[1]).abs().max().item() < 1e-4 * (1 + want.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "qwen3", "gpt_neox"])
def test_native_step_bfloat16_rounds_where_the_pytorch_forward_does(family, folders):
    lm = lmlab.load(folders(family), dtype="bfloat16")
    ref = lmlab.load(folders(family))
    prompts = prompts_of([6, 13])
    got = run_steps(lm, prompts, 10, use_native=True)
    want = run_steps(lm, prompts, 10, use_native=False)
    exact = run_steps(ref, prompts, 10, use_native=False)
    scale = 1 + exact.abs().max().item()
    # both bf16 paths round at the same points; they differ by the order of fp32 sums, which
    # can move a value by one bf16 step now and then: far less than bf16 is from fp32
    assert (got - want).abs().max().item() < 0.03 * scale
    assert (got - exact).abs().max().item() < 0.05 * scale
    assert (got - want).abs().mean().item() < 0.25 * (want - exact).abs().mean().item() + 1e-3


def test_more_rows_than_one_pass_serves(folders):
    lm = lmlab.load(folders("llama"))
    prompts = prompts_of([3, 7, 4, 9, 1, 6, 8, 2, 5, 10, 4])  # 11 rows: passes of 8 and 3
    got = run_steps(lm, prompts, 4, use_native=True)
    want = run_steps(lm, prompts, 4, use_native=False)
    assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())


def test_one_model_steps_batches_caches_and_thread_counts_of_any_size(folders):
    """The step's buffers are made once per model and grow when a call needs more rows, cache
    slots or threads: every call computes what model.py does."""
    lm = lmlab.load(folders("gemma3"))
    before = torch.get_num_threads()
    try:
        for lengths, steps, threads in (
            ([4], 3, 1),
            ([6, 2, 9], 12, 1),
            ([3], 2, 1),
            ([5, 12], 10, 3),
            (list(range(1, 12)), 4, 2),
        ):
            torch.set_num_threads(threads)
            prompts = prompts_of(lengths)
            got = run_steps(lm, prompts, steps, use_native=True)
            want = run_steps(lm, prompts, steps, use_native=False)
            assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item()), (lengths, steps, threads)
    finally:
        torch.set_num_threads(before)


def test_generation_uses_the_native_step_and_hooks_turn_it_off(folders, monkeypatch):
    lm = lmlab.load(folders("llama"))
    ids = prompts_of([9])[0]
    calls = count_native_calls(monkeypatch)
    fast = lm.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True).token_ids
    assert len(calls) == 9  # every step after the first token
    calls.clear()
    seen = []
    with lm.hooks({"blocks.0.resid_post": lambda x, name: seen.append(x.shape)}):
        hooked = lm.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True).token_ids
    assert calls == [] and len(seen) == 10  # the prefill and every step ran model.py, hook and all
    assert hooked == fast


def test_a_replaced_or_edited_weight_is_seen(folders):
    lm = lmlab.load(folders("qwen2"))
    prompts = prompts_of([7])
    before = run_steps(lm, prompts, 3, use_native=True)
    down = lm.model.blocks[1].mlp.down
    down.weight = nn.Parameter(torch.randn_like(down.weight) * 0.3, requires_grad=False)  # a new tensor
    with torch.no_grad():
        lm.model.blocks[0].attn.qkv.bias.mul_(-1)  # an edit in place
    got = run_steps(lm, prompts, 3, use_native=True)
    want = run_steps(lm, prompts, 3, use_native=False)
    assert (got - before).abs().max().item() > 1e-2
    assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())


def test_what_the_native_step_does_not_take_falls_back(folders, monkeypatch):
    lm = lmlab.load(folders("llama"))
    lm.model.half()  # float16: not a dtype the native step runs
    assert native.plan_for(lm.model).reason == "dtype torch.float16"
    lm.model.float()
    assert native.plan_for(lm.model).reason is None
    monkeypatch.setenv("LMLAB_NATIVE", "0")
    assert not native.enabled_by_env()


def test_the_portable_avx2_build_computes_the_same(folders, tmp_path):
    """The vector code as an AVX2-only CPU (most laptops) compiles it, run on this machine: the decoding
    step, and training's fused RMSNorm, activation and RoPE (test_fused)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if " avx2" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True:
        pytest.skip("not an x86 CPU with AVX2")
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import lmlab, torch
from lmlab import native
from test_native_step import run_steps, prompts_of
from test_fused import check_activations, check_rmsnorm, check_rope
assert native.status().startswith("on") and "AVX2" in native.status(), native.status()
check_activations()  # training's fused steps, in the AVX2 build's vectors
check_rmsnorm()
check_rope()
for family, folder in {{"llama": {str(folders("llama"))!r}, "gemma3": {str(folders("gemma3"))!r}}}.items():
    for dtype in ("float32", "bfloat16"):
        lm = lmlab.load(folder, dtype=dtype)
        got = run_steps(lm, prompts_of([4, 10]), 12, use_native=True)
        want = run_steps(lm, prompts_of([4, 10]), 12, use_native=False)
        tol = (1e-4 if dtype == "float32" else 0.03) * (1 + want.abs().max().item())
        assert (got - want).abs().max().item() < tol, (family, dtype, (got - want).abs().max().item())
print("ok")
"""
    env = {**os.environ, "LMLAB_HOME": str(tmp_path), "LMLAB_NATIVE_MARCH": "x86-64-v3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_logits(folders, threads):
    lm = lmlab.load(folders("gemma3"))  # one k/v head: the slot ranges split what one group attends to
    prompts = prompts_of([5, 12])
    want = run_steps(lm, prompts, 12, use_native=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_steps(lm, prompts, 12, use_native=True)
    finally:
        torch.set_num_threads(before)
    assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())


def test_a_build_without_openmp_is_used_only_on_one_thread(folders, tmp_path):
    """A compiler without OpenMP (Apple's clang) gives a one-thread library: lmlab then keeps
    torch's threads for anything run on more than one."""
    import os
    import shutil
    import stat
    import subprocess
    import sys
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        '#!/bin/sh\nargs=""\n'
        'for a in "$@"; do [ "$a" = "-fopenmp" ] || args="$args \'$a\'"; done\n'
        f"eval exec {cc} $args\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import lmlab, torch
from lmlab import native
from test_native_step import run_steps, prompts_of, count_native_calls
from lmlab.engine.cache import KVCache
assert "one thread" in native.status(), native.status()
lm = lmlab.load({str(folders("llama"))!r})
torch.set_num_threads(2)
with torch.inference_mode():
    ids = torch.zeros(1, 1, dtype=torch.long)
    cache = KVCache(lm.config, 1, 4, torch.float32, "cpu")
    assert native.decode_step(lm.model, ids, ids.clone(), cache, None) is None and cache.length == 0
    torch.set_num_threads(1)
    assert native.decode_step(lm.model, ids, ids.clone(), cache, None) is not None  # the same call, on one thread
torch.set_num_threads(1)
got = run_steps(lm, prompts_of([4, 9]), 6, use_native=True)
want = run_steps(lm, prompts_of([4, 9]), 6, use_native=False)
assert (got - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())
print("ok")
"""
    env = {**os.environ, "LMLAB_HOME": str(tmp_path / "home"), "CC": str(wrapper)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_activation_codes_are_the_c_enum():
    """native.py's ACT_CODES and enum lmlab_act in csrc/native.c give the same code to each name."""
    lib = native._lib  # loaded: the module is skipped where native.available() is False
    for name, code in native.ACT_CODES.items():
        assert lib.lmlab_act_code(name.encode()) == code, name
    assert lib.lmlab_act_code(b"relu") == -1


def test_the_parameter_hook_is_registered_at_the_first_plan_only(folders):
    """Importing lmlab puts no hook on every nn.Module; the first DecodePlan registers one, once."""
    import subprocess
    import sys

    code = f"""
import lmlab, torch
from lmlab import native
from torch.nn.modules import module
assert not module._global_parameter_registration_hooks
lm = lmlab.load({str(folders("llama"))!r})
assert not module._global_parameter_registration_hooks
native.plan_for(lm.model)
native.plan_for(lmlab.load({str(folders("qwen2"))!r}).model)
assert len(module._global_parameter_registration_hooks) == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
