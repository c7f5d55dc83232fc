"""Quantized decoding: speed against the float paths (and llama.cpp where installed), and quality.

    python benchmarks/quant_vs_llamacpp.py                      # both bundled models
    python benchmarks/quant_vs_llamacpp.py --models smollm2-135m --rounds 5 --threads 1

Speed: one decoding step (batch 1, a 64-token cache) through the engine's step
(``engine.steps.decode_one_token``: the native step where it applies), for each way of holding
the weights, interleaved round by round (each round times every row once; the median is
reported), so drift of a shared machine hits every row alike. llama.cpp (llama-cpp-python, an
optional extra) runs the same GGUF file in the same rounds when it is installed.

Quality: on a fixed text (the standard library's ``json/decoder.py``, 512 tokens), each
quantization's next-token distributions against the float32 model's (the GGUF file
dequantized): perplexity, mean KL(fp32 || quant) in nats, top-1 agreement. The text is scored
one token at a time through the cache (the decoding path, where the int8 inputs apply).
``q8``/``q4`` quantize the dequantized float weights again (groups of 32). Prints tables; not a test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch

import lmlab
from lmlab.engine.cache import KVCache
from lmlab.engine.steps import decode_one_token, prefill


def load_variant(name: str, variant: str):
    if variant in ("native", "float32", "bfloat16"):
        return lmlab.load(name, dtype=None if variant == "native" else variant)
    # q8 / q4 from the float weights of the same file
    from lmlab.loading.gguf import GGUFSource
    from lmlab.loading.hf import lmlab_tensors
    from lmlab.quant.build import build, float_tensors_quantized

    base = lmlab.load(name, dtype="float32")
    source = GGUFSource(base.resolved.path)
    cfg = base.config
    model = build(cfg, float_tensors_quantized(cfg, lmlab_tensors(cfg, source, torch.float32), variant))
    from lmlab import kernels
    from lmlab.lm import LM

    kernels.speed_up(model)
    lm = LM(model, base.tokenizer, name=name, resolved=base.resolved)
    lm.quant = variant
    return lm


def step_timer(lm, prompt_len=64):
    ids = torch.arange(1, prompt_len + 1)[None] % lm.config.vocab_size
    cache = KVCache(lm.config, 1, prompt_len + 4096, torch.float32, "cpu")
    with torch.inference_mode():
        prefill(lm.model, ids, torch.arange(prompt_len)[None], cache, None)

    def step(n=16):
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                if cache.length + 1 >= cache.max_len:
                    cache.length = prompt_len
                pos = torch.tensor([[cache.length]])
                decode_one_token(lm.model, torch.tensor([[5]]), pos, cache, None)
        return (time.perf_counter() - t) / n

    return step


def llama_timer(path: str, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
    llm.eval(list(range(1, 65)))

    def step(n=16):
        t = time.perf_counter()
        for _ in range(n):
            if llm.n_tokens + 1 >= 500:
                llm.n_tokens = 64
            llm.eval([5])
        return (time.perf_counter() - t) / n

    return step


def quality(lm, ref_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    logits = score(lm, ids)
    lp, lq = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    nll = -lq[:-1].gather(-1, ids[0, 1:, None]).mean().item()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return {"ppl": float(torch.tensor(nll).exp()), "kl": kl, "top1": top1}


def score(lm, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (T, V) for each position, one token per cached step (the decoding path)."""
    T = ids.shape[1]
    cache = KVCache(lm.config, 1, T, torch.float32, "cpu")
    out = []
    with torch.inference_mode():
        out.append(prefill(lm.model, ids[:, :1], torch.zeros(1, 1, dtype=torch.long), cache, None))
        for t in range(1, T):
            out.append(decode_one_token(lm.model, ids[:, t : t + 1], torch.tensor([[t]]), cache, None))
    return torch.cat(out).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-tokens", type=int, default=512)
    ap.add_argument("--no-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    results = {}
    for name in args.models.split(","):
        variants = ["native", "q8", "q4", "float32", "bfloat16"]
        lms = {v: load_variant(name, v) for v in variants}
        timers = {v: step_timer(lm) for v, lm in lms.items()}
        path = str(lms["native"].resolved.path)
        lc = llama_timer(path, args.threads)
        if lc:
            timers["llama.cpp"] = lc
        times = {k: [] for k in timers}
        for _ in range(args.rounds):
            for k, fn in timers.items():
                fn(2)
                times[k].append(fn())
        from lmlab.quant import quant_bytes

        print(f"\n{name}: batch-1 decode step, 64-token cache, {args.threads} threads, median of {args.rounds} rounds")
        print(f"{'weights':<12}{'MB':>8}{'ms/token':>10}{'tok/s':>8}{'vs fp32':>9}")
        f32 = statistics.median(times["float32"])
        for k, ts in times.items():
            med = statistics.median(ts)
            if k in lms:
                mb = (quant_bytes(lms[k].model) or lms[k].weight_bytes) / 1e6
            else:
                mb = os.path.getsize(path) / 1e6
            print(f"{k:<12}{mb:>8.0f}{med * 1e3:>10.2f}{1 / med:>8.1f}{f32 / med:>8.2f}×")
        results[name] = {k: statistics.median(ts) for k, ts in times.items()}
        if not args.no_quality:
            text = open(inspect.getsourcefile(json.decoder)).read()
            ids = torch.tensor([lms["float32"].encode(text)[: args.quality_tokens]])
            ref = score(lms["float32"], ids)
            print(f"quality against float32 on {ids.shape[1]} tokens of json/decoder.py (one cached step per token)")
            print(f"{'weights':<12}{'ppl':>8}{'KL nats':>10}{'top-1':>8}")
            base_ppl = quality(lms["float32"], ref, ids)["ppl"]
            print(f"{'float32':<12}{base_ppl:>8.3f}{0:>10.4f}{1:>8.3f}")
            for v in ("bfloat16", "native", "q8", "q4"):
                q = quality(lms[v], ref, ids)
                print(f"{v:<12}{q['ppl']:>8.3f}{q['kl']:>10.4f}{q['top1']:>8.3f}")
        del lms, timers
    print(
        f"\nload average (1, 5, 15 min): start {load0}, end {os.getloadavg()}; llama.cpp: "
        + ("in the rounds" if "llama.cpp" in str(results) else "not installed (pip install 'lmlab[llamacpp]')")
    )


if __name__ == "__main__":
    main()
