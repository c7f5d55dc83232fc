"""Quantized decoding against llama.cpp on the same GGUF files: speed, greedy agreement, quality.

    python benchmarks/quant_vs_llamacpp.py --llama-bench /tmp/llamacpp/bin/llama-bench
    python benchmarks/quant_vs_llamacpp.py --models smollm2-135m --rounds 5 --threads 1 --parts speed
    python benchmarks/quant_vs_llamacpp.py --parts big          # a random ~1.1B Llama as Q4_0 and Q8_0

llama.cpp is found as ``--llama-bench PATH`` (its folder also holds ``llama-simple``), else in
``$LMLAB_LLAMACPP_DIR`` (or its ``bin/``), else on PATH. It is never a dependency: without it the
llama.cpp rows are left out. Built from llama.cpp's sources (e.g. ``vendor/llama.cpp`` in the
llama-cpp-python sdist) for the README's numbers; on a CPU whose AMX matmul crashes (this VM),
with AMX off instead of ``-DGGML_NATIVE=ON``::

    cmake -S llama.cpp -B /tmp/llamacpp -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    cmake --build /tmp/llamacpp -j2 --target llama-bench llama-simple

Parts (``--parts``, comma-separated; default all but big):
- speed: batch-1 decode (one token at a time from a 64-token cache) and prefill (a 128-token
  prompt) for each way lmlab holds the weights (the file's own blocks, q8/q4 from the dequantized
  weights, float32, bfloat16) and for llama-bench on the same file (``-n 32 -d 64`` and
  ``-p 128``), same thread count. Rounds are interleaved: each round times every row once,
  llama-bench included (one subprocess per round), and the median is reported, so the drift of a
  shared machine hits every row alike.
- greedy: 32 greedy tokens from lmlab (the file's own blocks) and from ``llama-simple`` on the
  same file; the first divergence, if any, with lmlab's logit gap between the two tokens there.
- quantize: ``lmlab quantize`` (q4 and q8) of SmolLM2's float weights (the bundled file
  dequantized, saved as a HF folder), then the written file through ``llama-simple`` and lmlab.
- hooks: generation on the file's own blocks with a no-op hook on every block's ``resid_post``
  against none (the issue's bar: at most 15% slower).
- memory: peak RSS of a native load, and of the load plus a short generation, in a fresh process,
  over the process's RSS after importing what a load imports, against the file's tensor bytes
  plus the KV cache (bar: 1.3x).
- quality: each variant's next-token distributions against float32 (the file dequantized) on
  ``json/decoder.py``: perplexity, mean KL(fp32 || variant) in nats, top-1 agreement.
- big: a random Llama-shaped model of ~1.1B parameters (TinyLlama's shapes) written as Q4_0 and
  as Q8_0 with the ``gguf`` library into ``--work-dir``; decode speed against llama-bench and the
  fraction of the machine's read bandwidth (``lmlab.bench.machine.measure_bandwidth``) each gets.

Prints tables; not a test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmlab
from lmlab.engine.cache import KVCache
from lmlab.engine.steps import decode_one_token, prefill

DECODE_DEPTH, DECODE_TOKENS, PREFILL_TOKENS = 64, 32, 128

# ----------------------------------------------------------------------------- llama.cpp


def find_llamacpp(arg: str | None) -> Path | None:
    """The folder holding llama-bench (and llama-simple), or None."""
    if arg:
        p = Path(arg)
        exe = p if p.is_file() else p / "llama-bench"
        if not exe.is_file():
            sys.exit(f"--llama-bench: no llama-bench at {arg}")
        return exe.parent
    env = os.environ.get("LMLAB_LLAMACPP_DIR")
    for d in [Path(env), Path(env) / "bin"] if env else []:
        if (d / "llama-bench").is_file():
            return d
    found = shutil.which("llama-bench")
    return Path(found).parent if found else None


def llama_bench(bin_dir: Path, path: str, threads: int, *, prompt: int, gen: int, depth: int, reps: int = 2) -> float:
    """tokens/s llama-bench measures for one test (a prompt of ``prompt`` tokens, or ``gen``
    tokens generated one at a time), after ``depth`` tokens already in the cache."""
    cmd = [str(bin_dir / "llama-bench"), "-m", path, "-t", str(threads), "-p", str(prompt), "-n", str(gen)]
    cmd += ["-d", str(depth), "-r", str(reps), "-o", "json", "-ngl", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-500:]}")
    rows = json.loads(out.stdout)
    return float(rows[-1]["avg_ts"])


def llama_simple(bin_dir: Path, path: str, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation of ``prompt`` (n tokens at most; it stops at end-of-generation)."""
    out = subprocess.run(
        [str(bin_dir / "llama-simple"), "-m", path, "-n", str(n), prompt], capture_output=True, text=True, timeout=600
    )
    if out.returncode:
        raise RuntimeError(f"llama-simple failed on {path}: {out.stderr[-800:]}")
    text = out.stdout.rstrip("\n")
    at = text.find(prompt)
    return text[at + len(prompt) :] if at >= 0 else text


# ----------------------------------------------------------------------------- lmlab


def load_variant(name: str, variant: str):
    if variant in ("native", "float32", "bfloat16"):
        return lmlab.load(name, dtype=None if variant == "native" else variant)
    # q8 / q4 from the float weights of the same file
    from lmlab import kernels
    from lmlab.lm import LM
    from lmlab.loading.gguf import GGUFSource
    from lmlab.loading.hf import lmlab_tensors
    from lmlab.quant.build import build, float_tensors_quantized

    base = lmlab.load(name, dtype="float32")
    source = GGUFSource(base.resolved.path)
    cfg = base.config
    model = build(cfg, float_tensors_quantized(cfg, lmlab_tensors(cfg, source, torch.float32), variant))
    kernels.speed_up(model)
    lm = LM(model, base.tokenizer, name=name, resolved=base.resolved)
    lm.quant = variant
    return lm


def decode_timer(lm, depth=DECODE_DEPTH):
    """Seconds per decoding step from a cache of ``depth`` tokens (the steps llama-bench -d times)."""
    ids = torch.arange(1, depth + 1)[None] % lm.config.vocab_size
    cache = KVCache(lm.config, 1, depth + 256, torch.float32, "cpu")
    with torch.inference_mode():
        prefill(lm.model, ids, torch.arange(depth)[None], cache, None)

    def step(n=DECODE_TOKENS):
        cache.length = depth  # every call times the same steps: tokens depth .. depth + n
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                pos = torch.tensor([[cache.length]])
                decode_one_token(lm.model, torch.tensor([[5]]), pos, cache, None)
        return (time.perf_counter() - t) / n

    return step


def prefill_timer(lm, tokens=PREFILL_TOKENS):
    """Seconds per prompt token of one prefill of ``tokens`` tokens into an empty cache."""
    ids = torch.arange(1, tokens + 1)[None] % lm.config.vocab_size
    cache = KVCache(lm.config, 1, tokens, torch.float32, "cpu")

    def run():
        cache.length = 0
        t = time.perf_counter()
        with torch.inference_mode():
            prefill(lm.model, ids, torch.arange(tokens)[None], cache, None)
        return (time.perf_counter() - t) / tokens

    return run


def weight_mb(lm) -> float:
    from lmlab.quant import quant_bytes

    return (quant_bytes(lm.model) or lm.weight_bytes) / 1e6


def rounds(timers: dict, n: int) -> dict:
    """Median seconds of each timer over n interleaved rounds (one warm-up call each first)."""
    times = {k: [] for k in timers}
    for k, fn in timers.items():
        if "llama.cpp" not in k:  # llama-bench warms up by itself
            fn()
    for _ in range(n):
        for k, fn in timers.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def part_speed(name, lms, bin_dir, args) -> dict:
    path = str(lms["native"].resolved.path)
    timers = {f"decode {v}": decode_timer(lm) for v, lm in lms.items()}
    timers.update({f"prefill {v}": prefill_timer(lm) for v, lm in lms.items() if v in ("native", "q8", "float32")})
    if bin_dir:
        timers["decode llama.cpp"] = lambda: (
            1 / llama_bench(bin_dir, path, args.threads, prompt=0, gen=DECODE_TOKENS, depth=DECODE_DEPTH)
        )
        timers["prefill llama.cpp"] = lambda: (
            1 / llama_bench(bin_dir, path, args.threads, prompt=PREFILL_TOKENS, gen=0, depth=0)
        )
    med = rounds(timers, args.rounds)
    print(f"\n{name} ({Path(path).name}): {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(
        f"batch-1 decode ({DECODE_TOKENS} steps from a {DECODE_DEPTH}-token cache); prefill of {PREFILL_TOKENS} tokens"
    )
    lc = med.get("decode llama.cpp")
    lcp = med.get("prefill llama.cpp")
    print(f"{'weights':<12}{'MB':>7}{'decode tok/s':>14}{'vs llama.cpp':>14}{'prefill tok/s':>15}{'vs llama.cpp':>14}")
    for v in list(lms) + (["llama.cpp"] if bin_dir else []):
        d, p = med[f"decode {v}"], med.get(f"prefill {v}")
        mb = weight_mb(lms[v]) if v in lms else os.path.getsize(path) / 1e6
        row = f"{v:<12}{mb:>7.0f}{1 / d:>14.1f}" + (f"{lc / d:>13.2f}×" if lc else f"{'':>14}")
        if p:
            row += f"{1 / p:>15.1f}" + (f"{lcp / p:>13.2f}×" if lcp else "")
        print(row)
    return med


# ----------------------------------------------------------------------------- greedy agreement


def greedy_ids(lm, prompt: str, n: int) -> tuple[list[int], list[int]]:
    r = lm.generate(prompt, max_new_tokens=n, temperature=0)
    return r.prompt_ids, r.token_ids


def step_logits(lm, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """(len(token_ids), V) logits lmlab had before each generated token, on the decoding path."""
    ids = torch.tensor([prompt_ids + token_ids])
    P = len(prompt_ids)
    cache = KVCache(lm.config, 1, ids.shape[1], torch.float32, "cpu")
    out = []
    with torch.inference_mode():
        out.append(prefill(lm.model, ids[:, :P], torch.arange(P)[None], cache, None))
        for t in range(P, ids.shape[1] - 1):
            out.append(decode_one_token(lm.model, ids[:, t : t + 1], torch.tensor([[t]]), cache, None))
    return torch.cat(out).float()


def compare_greedy(lm, path: str, bin_dir: Path, prompt: str, n: int = 32, ref=None) -> str:
    """One line: how many of lmlab's n greedy tokens llama.cpp's text reproduces, and at a
    divergence lmlab's logit gap between its token and the one llama.cpp's text goes on with
    (also under ``ref``, the file dequantized to float32, where given: the exact weights)."""
    prompt_ids, ours = greedy_ids(lm, prompt, n)
    theirs = llama_simple(bin_dir, path, prompt, n)
    agree, text = 0, ""
    for t in ours:
        piece = lm.decode([t])
        if not theirs.startswith(text + piece):
            break
        text += piece
        agree += 1
    if agree == len(ours):
        if theirs == text or len(ours) == n:
            return f"{agree}/{len(ours)} tokens agree"
        return (
            f"{agree}/{len(ours)} agree; lmlab stopped (end of generation), llama.cpp went on: {theirs[len(text) :]!r}"
        )
    rest = theirs[len(text) :]
    their_next = lm.encode(rest, add_special=False)[:1] if rest else []
    if not their_next:
        if ours[agree] in (lm.tokenizer.eos_ids or []):
            return f"{agree}/{len(ours) - 1} tokens agree, then both stop (end of generation)"
        return f"{agree}/{len(ours)} agree; llama.cpp stopped there (end of generation), lmlab went on"
    mine, other = ours[agree], their_next[0]
    line = f"{agree}/{len(ours)} agree; then lmlab {lm.decode([mine])!r}, llama.cpp {lm.decode([other])!r}: "
    gaps = []
    for what, model in (("lmlab", lm), ("float32", ref)):
        if model is not None:
            logits = step_logits(model, prompt_ids, ours)[agree]
            gaps.append(f"{what} {(logits[mine] - logits[other]).item():.3f}")
    return line + "logit gap " + ", ".join(gaps)


GREEDY_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


def part_greedy(name, lm, bin_dir):
    path = str(lm.resolved.path)
    ref = lmlab.load(name, dtype="float32")
    print(f"\n{name}: greedy 32 tokens, lmlab (the file's own blocks) against llama-simple on {Path(path).name}")
    print("  (at a divergence: the logit gap between the two tokens, lmlab's and float32's on the same weights)")
    for p in GREEDY_PROMPTS:
        _, a = greedy_ids(lm, p, 32)
        _, b = greedy_ids(ref, p, 32)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"  {p!r}: {compare_greedy(lm, path, bin_dir, p, ref=ref)}; lmlab vs its float32: {same} agree")


# ----------------------------------------------------------------------------- lmlab quantize in llama.cpp


def part_quantize(bin_dir, work: Path):
    from safetensors.torch import save_file

    from lmlab.cli.main import main as cli_main
    from lmlab.train.export import hf_config, hf_tensors

    base = lmlab.load("smollm2-135m", dtype="float32")
    folder = work / "smollm2-float"  # a HF folder: the file's weights dequantized, its tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(base.model, base.config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(base.config)))
    (folder / "tokenizer.json").write_text(base.tokenizer.backend.to_str())
    del base
    print("\nlmlab quantize (SmolLM2's weights dequantized to a float HF folder, then quantized) in llama.cpp")
    for kind in ("q4", "q8"):
        out = work / f"smollm2-{kind}.gguf"
        if cli_main(["quantize", str(folder), "--to", kind, "-o", str(out)]) != 0:
            print(f"  {kind}: lmlab quantize failed")
            continue
        lm = lmlab.load(out)
        for p in GREEDY_PROMPTS[:2]:
            try:
                line = compare_greedy(lm, str(out), bin_dir, p)
            except RuntimeError as e:
                line = f"llama.cpp could not run it: {e}"
            print(f"  {kind} ({out.stat().st_size / 1e6:.0f} MB) {p!r}: {line}")


# ----------------------------------------------------------------------------- hooks


def part_hooks(name, lm, args):
    # longer than engine.steps.SHORT_PROMPT: a hook keeps a prompt on model.py, and so does this
    # prompt without one, so both runs decode from the same prefill and only the hooks differ
    # (a short prompt's native prefill left the unhooked steps 4-5% faster: warmer caches)
    prompt = "The capital of France is Paris, the capital of Italy is Rome, and the capital of Spain is"

    def gen(hooked):
        def run():
            if hooked:
                with lm.hooks({"blocks.*.resid_post": lambda x, name: None}):
                    r = lm.generate(prompt, max_new_tokens=48, temperature=0, ignore_eos=True)
            else:
                r = lm.generate(prompt, max_new_tokens=48, temperature=0, ignore_eos=True)
            return r.timings["decode_s"] / max(1, r.timings["decode_steps"])

        return run

    # 48 tokens take ~0.2 s a side: at least 15 rounds, so the median is not one noisy moment
    # (3 rounds on this VM read anywhere from +7% to +18% for the same code; 15 read +10-11%)
    med = rounds({"none": gen(False), "hook": gen(True)}, max(args.rounds, 15))
    slower = med["hook"] / med["none"] - 1
    print(
        f"\n{name}: decoding from the file's own blocks, 48 tokens: no hook {1 / med['none']:.1f} tok/s, a no-op hook "
        f"on every blocks.*.resid_post {1 / med['hook']:.1f} tok/s: {slower:+.0%} (bar: at most +15%)"
    )


# ----------------------------------------------------------------------------- memory

_MEM_CHILD = r"""
import json, sys, torch, lmlab
# the libraries a load imports (sympy through torch, tokenizers...) are in the baseline: ~50 MB
import sympy, tokenizers, torch.distributed, lmlab.quant.build, lmlab.engine.generate, lmlab.tokenizer
from lmlab import native
from lmlab.loading.gguf import GGUFSource
native.available()
def rss(field="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss()
torch.set_num_threads(int(sys.argv[2]))
lm = lmlab.load(sys.argv[1])
load_peak = rss("VmHWM:")
r = lm.generate("The capital of France is", max_new_tokens=32, temperature=0, ignore_eos=True)
# VmHWM, this process image's own peak: ru_maxrss keeps the peak of the forked parent from before
# exec (a parent holding five loaded models made this child report 2-5 GB)
peak = rss("VmHWM:")
print(json.dumps({"base": base, "load_peak": load_peak, "peak": peak, "kv": r.timings["kv_cache_bytes"],
                  "file": GGUFSource(lm.resolved.path).weight_bytes_on_disk()}))
"""


def part_memory(name, threads):
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, name, str(threads)], capture_output=True, text=True)
    if out.returncode:
        print(f"\n{name}: memory run failed: {out.stderr[-400:]}")
        return
    m = json.loads(out.stdout.strip().splitlines()[-1])
    load, over = m["load_peak"] - m["base"], m["peak"] - m["base"]
    bar = m["file"] + m["kv"]
    print(
        f"\n{name}: peak RSS over the imports (a load's libraries included), for {m['file'] / 2**20:.0f} MiB of "
        f"file tensors + {m['kv'] / 2**20:.1f} MiB KV (bar: 1.3x): the load {load / 2**20:.0f} MiB, "
        f"{load / bar:.2f}x; the load and 32 generated tokens {over / 2**20:.0f} MiB, {over / bar:.2f}x"
    )


# ----------------------------------------------------------------------------- quality


def quality(lm, ref_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    logits = score(lm, ids)
    lp, lq = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    nll = -lq[:-1].gather(-1, ids[0, 1:, None]).mean().item()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return {"ppl": float(torch.tensor(nll).exp()), "kl": kl, "top1": top1}


def score(lm, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (T, V) for each position, one token per cached step (the decoding path)."""
    return step_logits(lm, ids[0, :1].tolist(), ids[0, 1:].tolist() + [0])


def part_quality(lms, tokens):
    text = open(inspect.getsourcefile(json.decoder)).read()
    ids = torch.tensor([lms["float32"].encode(text)[:tokens]])
    ref = score(lms["float32"], ids)
    print(f"quality against float32 on {ids.shape[1]} tokens of json/decoder.py (one cached step per token)")
    print(f"{'weights':<12}{'ppl':>8}{'KL nats':>10}{'top-1':>8}")
    print(f"{'float32':<12}{quality(lms['float32'], ref, ids)['ppl']:>8.3f}{0:>10.4f}{1:>8.3f}")
    for v in ("bfloat16", "native", "q8", "q4"):
        q = quality(lms[v], ref, ids)
        print(f"{v:<12}{q['ppl']:>8.3f}{q['kl']:>10.4f}{q['top1']:>8.3f}")


# ----------------------------------------------------------------------------- a random ~1.1B model

BIG = dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, vocab=32000)  # TinyLlama-1.1B's shapes


def write_random_gguf(path: Path, type_name: str, seed: int = 0) -> None:
    """A Llama-shaped model with random weights, every matrix in ``type_name`` (Q4_0 or Q8_0)
    blocks written directly (random quants, float16 scales of a sane size); norms are ones."""
    import gguf

    from lmlab.quant.export import _add_tokenizer

    c = BIG
    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random-1.1b-{type_name}")
    w.add_file_type({"Q4_0": 2, "Q8_0": 7}[type_name])
    w.add_block_count(c["n_layers"])
    w.add_context_length(2048)
    w.add_embedding_length(c["d_model"])
    w.add_feed_forward_length(c["d_ff"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_dimension_count(c["d_model"] // c["n_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)

    class _Vocab:  # placeholder tokens: llama-bench feeds token ids, not text
        tokenizer = None

        class config:
            vocab_size = c["vocab"]

    _add_tokenizer(w, _Vocab)

    def blocks(rows, cols):
        nb = rows * cols // 32
        if type_name == "Q8_0":
            raw = np.empty((nb, 34), np.uint8)
            raw[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
            scale = 0.02 / 127 * np.sqrt(2048 / cols)
        else:
            raw = np.empty((nb, 18), np.uint8)
            raw[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
            scale = 0.02 / 8 * np.sqrt(2048 / cols)
        raw[:, :2] = np.full((nb, 1), scale, np.float16).view(np.uint8)
        return raw.reshape(rows, -1)

    def mat(name, rows, cols):
        w.add_tensor(name, blocks(rows, cols), raw_dtype=qtype)

    C, D, F = c["d_model"], c["d_model"] // c["n_heads"], c["d_ff"]
    mat("token_embd.weight", c["vocab"], C)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(C, np.float32))
        mat(p + "attn_q.weight", C, C)
        mat(p + "attn_k.weight", c["n_kv_heads"] * D, C)
        mat(p + "attn_v.weight", c["n_kv_heads"] * D, C)
        mat(p + "attn_output.weight", C, C)
        w.add_tensor(p + "ffn_norm.weight", np.ones(C, np.float32))
        mat(p + "ffn_gate.weight", F, C)
        mat(p + "ffn_up.weight", F, C)
        mat(p + "ffn_down.weight", C, F)
    w.add_tensor("output_norm.weight", np.ones(C, np.float32))
    mat("output.weight", c["vocab"], C)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def part_big(bin_dir, args):
    from lmlab.bench.machine import measure_bandwidth
    from lmlab.loading.gguf import GGUFSource

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth("cpu")
    read = max(bw["read_gb_s"], bw.get("native_matvec_gb_s") or 0)
    print(
        f"\nrandom Llama of TinyLlama-1.1B's shapes, {args.threads} threads; the machine reads {read:.1f} GB/s "
        f"(the best of a sum and lmlab's float32 mat-vec over 1 GiB, measured now)"
    )
    print(
        f"{'file':<8}{'MB/token':>10}{'lmlab tok/s':>13}{'GB/s':>7}{'roofline':>10}"
        f"{'llama.cpp':>11}{'GB/s':>7}{'ratio':>8}"
    )
    for type_name in ("Q4_0", "Q8_0"):
        path = work / f"random-1.1b-{type_name}.gguf"
        if not path.is_file():
            write_random_gguf(path, type_name)
        src = GGUFSource(path)
        # bytes one token reads from the file: every tensor but the input embedding (only gathered)
        file_bytes = src.weight_bytes_on_disk() - src._tensors["model.embed_tokens.weight"].nbytes
        lm = lmlab.load(path)
        from lmlab.quant import quant_bytes

        ours_bytes = quant_bytes(lm.model) - lm.model.tok_embed.qweight.nbytes
        timers = {"lmlab": decode_timer(lm)}
        if bin_dir:
            timers["llama.cpp"] = lambda p=str(path): (
                1 / llama_bench(bin_dir, p, args.threads, prompt=0, gen=DECODE_TOKENS, depth=DECODE_DEPTH, reps=1)
            )
        med = rounds(timers, max(3, args.rounds // 2))
        ours = 1 / med["lmlab"]
        gbs = ours * ours_bytes / 1e9
        row = f"{type_name:<8}{ours_bytes / 1e6:>10.0f}{ours:>13.2f}{gbs:>7.1f}{gbs / read:>9.0%} "
        if bin_dir:
            theirs = 1 / med["llama.cpp"]
            row += f"{theirs:>11.2f}{theirs * file_bytes / 1e9:>7.1f}{ours / theirs:>7.2f}×"
        print(row)
        del lm


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--parts", default="speed,greedy,quantize,hooks,memory,quality")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-tokens", type=int, default=512)
    ap.add_argument(
        "--llama-bench", default=None, help="llama-bench (or its folder); default $LMLAB_LLAMACPP_DIR, PATH"
    )
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "lmlab-quant-bench"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    bin_dir = find_llamacpp(args.llama_bench)
    load0 = os.getloadavg()
    print(f"llama.cpp: {bin_dir or 'not found (--llama-bench PATH or LMLAB_LLAMACPP_DIR)'}; load average {load0}")
    for name in args.models.split(","):
        if parts & {"speed", "quality"}:
            variants = ["native", "q8", "q4", "float32", "bfloat16"]
            lms = {v: load_variant(name, v) for v in variants}
            if "speed" in parts:
                part_speed(name, lms, bin_dir, args)
            if "quality" in parts:
                part_quality(lms, args.quality_tokens)
            del lms
        if parts & {"greedy", "hooks"}:
            lm = lmlab.load(name)
            if "greedy" in parts and bin_dir:
                part_greedy(name, lm, bin_dir)
            if "hooks" in parts:
                part_hooks(name, lm, args)
            del lm
        if "memory" in parts:
            part_memory(name, args.threads)
    if "quantize" in parts and bin_dir:
        part_quantize(bin_dir, Path(args.work_dir))
    if "big" in parts:
        part_big(bin_dir, args)
    print(f"\nload average (1, 5, 15 min): start {load0}, end {os.getloadavg()}")


if __name__ == "__main__":
    main()
