"""lmlab finetune: LoRA learns a small task on SmolLM2, an adapter changes nothing at step 0,
merging it gives the same logits as applying it, PEFT reads lmlab's adapters and lmlab reads
PEFT's with the same logits, generation with an adapter is right (cached equals uncached),
a run resumes after Ctrl-C onto the same result, and bad input gets one sentence.

Most tests use a tiny random Llama saved as a HF folder (tests/tiny.py); one uses the bundled
SmolLM2. Tolerances: float32 logits of two computations agree to rounding (about 1e-6 of
their size here), so merged vs applied is held to 1e-5 and lmlab vs transformers + PEFT to 1e-4.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.cli.main import main
from lmlab.errors import LmlabError
from lmlab.finetune.adapter import save_adapter
from lmlab.finetune.lora import LoRASpec, add_lora, lora_modules, merge_lora, remove_lora
from tiny import FP32_TIE, assert_same_greedy, make_tiny, near_ties, save_char_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 3, 150, 7, 64, 23, 11, 88, 120]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, transformers model) of a tiny random Llama with a one-character tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf = make_tiny("llama", folder)
    save_char_tokenizer(folder)
    return folder, hf


def randomise_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every B a random value, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- exactness


def test_step_zero_equals_base_and_merged_equals_applied(base):
    folder, _ = base
    lm = lmlab.load(folder)
    want = lm(IDS)
    spec = LoRASpec(r=4, alpha=8, targets=("q", "v", "o", "gate", "down"))
    add_lora(lm.model, spec)
    assert torch.equal(lm(IDS), want), "B starts at zero: the adapted model is the base model"
    trained = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained), "only the adapter trains"
    randomise_b(lm.model)
    applied = lm(IDS)
    assert (applied - want).abs().max() > 0.1
    assert merge_lora(lm.model) == 2 * 4  # attn.qkv, attn.o, mlp.up, mlp.down in each of 2 layers
    assert not lora_modules(lm.model)
    merged = lm(IDS)
    assert (merged - applied).abs().max() <= 1e-5, (merged - applied).abs().max()


def test_rslora_scale_and_targets_by_any_name(base):
    folder, _ = base
    lm = lmlab.load(folder)
    H, D = lm.config.n_heads, lm.config.head_dim
    mods = add_lora(lm.model, LoRASpec(r=4, alpha=8, rslora=True, targets=("q_proj", "self_attn.v_proj", "mlp.up")))
    qkv = mods["blocks.0.attn.qkv"]
    assert [p.short for p in qkv.parts] == ["q", "v"] and qkv.scales["q"] == pytest.approx(8 / 2)
    assert qkv.lora_B["q"].shape == (H * D, 4)
    assert [p.short for p in mods["blocks.1.mlp.up"].parts] == ["gate", "up"]
    assert LoRASpec.parse("r=8,targets=q,k,v,dropout=0.1") == LoRASpec(8, 16.0, 0.1, ("q", "k", "v"))


# ----------------------------------------------------------------------------- PEFT interop


def test_peft_loads_lmlab_adapter_with_the_same_logits(base, tmp_path):
    import peft

    folder, hf = base
    lm = lmlab.load(folder)
    spec = LoRASpec(r=4, alpha=16, targets=("all",))
    add_lora(lm.model, spec)
    randomise_b(lm.model, seed=2)
    lm.native_decode = False
    ours = lm(IDS)
    save_adapter(lm.model, spec, tmp_path / "ad")
    names = set(json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"])
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    try:
        with torch.no_grad():
            theirs = peft_model(IDS).logits
    finally:
        peft_model.unload()  # the module-scoped transformers model is the base again
    assert (theirs - ours).abs().max() <= 1e-4, (theirs - ours).abs().max()


def test_lmlab_loads_a_peft_adapter_with_the_same_logits(base, tmp_path):
    import peft

    folder, hf = base
    torch.manual_seed(3)
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], use_rslora=True
    )
    peft_model = peft.get_peft_model(hf, cfg)
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            theirs = peft_model.eval()(IDS).logits
    finally:
        peft_model.unload()
    lm = lmlab.load(folder, adapter=tmp_path / "peft")
    assert lm.native_decode is False
    assert (lm(IDS) - theirs).abs().max() <= 1e-4, (lm(IDS) - theirs).abs().max()


def test_generation_with_an_adapter_is_cached_equal_to_uncached_and_hooks_see_it(base, tmp_path):
    folder, _ = base
    lm = lmlab.load(folder)
    spec = LoRASpec(r=4, alpha=8)
    add_lora(lm.model, spec)
    randomise_b(lm.model, std=0.2)
    save_adapter(lm.model, spec, tmp_path / "ad")
    plain = lmlab.load(folder)
    lm = lmlab.load(folder, adapter=tmp_path / "ad")
    prompt = [5, 17, 42, 99]
    kw = dict(max_new_tokens=16, temperature=0, ignore_eos=True, alternatives=3)
    uncached = lm.generate(prompt, use_cache=False, **kw)
    cached = lm.generate(prompt, use_cache=True, **kw)
    assert_same_greedy(uncached.token_ids, cached.token_ids, near_ties(uncached.alternatives, FP32_TIE), "adapter")
    assert plain.generate(prompt, **kw).token_ids != cached.token_ids, "the adapter changes what is generated"
    # hooks run inside the adapted model: the logits they see are the adapter's
    logits, cache = lm.run_with_cache(prompt, names=["logits"])
    assert torch.allclose(cache["logits"], lm(prompt), atol=1e-5)
    assert (cache["logits"] - plain(prompt)).abs().max() > 0.1


# ----------------------------------------------------------------------------- the CLI, end to end


def tiny_rows(n: int = 24) -> list[dict]:
    words = ["abc", "xyz", "hello", "qrs", "mno", "tuv", "ghi", "def"]
    return [{"prompt": f"w {words[i % 8]}{i}:", "completion": f" [{words[i % 8]}]"} for i in range(n)]


def test_cli_finetune_saves_a_peft_adapter_records_the_run_and_merges(base, tmp_path, home, capsys):
    import transformers as tf

    folder, _ = base
    data = write_rows(tmp_path / "train.jsonl", tiny_rows())
    out = tmp_path / "run"
    args = [
        "finetune",
        str(folder),
        "--data",
        str(data),
        "--lora",
        "r=4,alpha=8,targets=q,v,down",
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--val-fraction",
        "0.2",
        "--sample-tokens",
        "4",
        "--out",
        str(out),
        "--save-adapter",
        str(tmp_path / "ad"),
        "--no-progress",
        "--json",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "tokens are trained (coloured)" in captured.err  # the loss-mask preview
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert len(summary["samples_before"]) == 3 and summary["samples_after"][0]["expected"].startswith(" [")
    for d in (out / "adapter", tmp_path / "ad"):
        assert {p.name for p in d.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    from lmlab.runs import RunStore

    with RunStore() as store:
        run = store.get(summary["run_id"])
    assert run["command"] == "finetune" and run["status"] == "complete"
    assert run["metrics"]["val_loss_before"] > run["metrics"]["val_loss_after"]
    assert run["outputs"]["samples_before"] and run["outputs"]["samples_after"]

    # merge: a HF folder transformers loads, with the adapter's logits
    assert main(["lora", "merge", str(folder), str(tmp_path / "ad"), "-o", str(tmp_path / "merged")]) == 0
    applied = lmlab.load(folder, adapter=tmp_path / "ad")(IDS)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    assert (theirs - applied).abs().max() <= 1e-4
    assert (lmlab.load(tmp_path / "merged")(IDS) - applied).abs().max() <= 1e-5


def test_ctrl_c_saves_and_resume_reaches_the_uninterrupted_result(base, tmp_path, home, monkeypatch):
    import lmlab.train.loop as loop
    from lmlab.finetune import FinetuneConfig, finetune

    folder, _ = base
    data = write_rows(tmp_path / "train.jsonl", tiny_rows())
    kw = dict(
        model=str(folder),
        data=str(data),
        lora="r=4,alpha=8,dropout=0.1",
        steps=6,
        batch_size=4,
        lr=1e-2,
        val_fraction=0.2,
        samples=0,
        eval_every=100,
    )
    full = finetune(FinetuneConfig(**kw, out=str(tmp_path / "full")), record=False, log=lambda m: None)

    class StopAfterThree(loop._StopFlag):  # Ctrl-C arrives during step 3
        checks = 0

        @property
        def set(self):
            StopAfterThree.checks += 1
            return StopAfterThree.checks >= 3

        @set.setter
        def set(self, value):
            pass

    said = []
    monkeypatch.setattr(loop, "_StopFlag", StopAfterThree)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**kw, out=str(tmp_path / "cut")), record=False, log=said.append)
    assert f"Resume with: lmlab finetune --resume {tmp_path / 'cut'}" in said[-1]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    resumed = finetune(FinetuneConfig(), resume=str(tmp_path / "cut"), record=False, log=lambda m: None)
    assert resumed["steps"] == 6
    assert resumed["val_loss_after"] == pytest.approx(full["val_loss_after"], rel=1e-5)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["weights"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_messages_train_on_the_assistant_turns_only(base, tmp_path):
    from lmlab.finetune.data import encode_row, mask_preview

    folder, _ = base
    tok = lmlab.load(folder).tokenizer
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }};{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    ex = encode_row(tok, {"messages": msgs}, 1, "x.jsonl", 512)
    assert tok.decode(ex.ids) == "<s>be brief;<u>hi;<a>yo;<u>2+2;<a>4;"
    trained = "".join(tok.decode([i]) if m else "_" for i, m in zip(ex.ids, ex.mask))
    assert trained == "_" * len("<s>be brief;<u>hi;<a>") + "yo;" + "_" * len("<u>2+2;<a>") + "4;"
    assert mask_preview(tok, ex).plain == "<s>be brief;<u>hi;<a>yo;<u>2+2;<a>4;"


def test_full_fine_tuning_writes_a_model_folder(base, tmp_path, home, capsys):
    import transformers as tf

    folder, _ = base
    data = write_rows(tmp_path / "train.jsonl", tiny_rows(12))
    out = tmp_path / "run"
    args = [
        "finetune",
        str(folder),
        "--data",
        str(data),
        "--full",
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--samples",
        "0",
        "--out",
        str(out),
        "--no-progress",
        "--no-record",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trained_parameters"] == lmlab.load(folder).num_parameters and not summary["adapters"]
    tuned = lmlab.load(out / "model")
    assert (tuned(IDS) - lmlab.load(folder)(IDS)).abs().max() > 1e-3, "the weights were trained"
    hf = tf.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - tuned(IDS)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- bad input


def bad(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs_get_one_sentence(base, tmp_path, home, capsys):
    folder, _ = base
    rows = tiny_rows(6)

    def run(data, *extra):
        return bad(
            capsys,
            "finetune",
            str(folder),
            "--data",
            str(data),
            "--steps",
            "1",
            "--no-progress",
            "--no-record",
            "--out",
            str(tmp_path / "o"),
            *extra,
        )

    missing = write_rows(tmp_path / "a.jsonl", [*rows[:2], {"prompt": "w x:"}, *rows[2:]])
    assert "line 3" in run(missing) and "'completion' is missing" in run(missing)
    wrong = write_rows(tmp_path / "b.jsonl", [*rows, {"messages": [{"role": "user", "text": "hi"}]}])
    assert "line 7" in run(wrong) and "'content'" in run(wrong)
    typed = write_rows(tmp_path / "c.jsonl", [{"text": 5}, *rows])
    assert "line 1" in run(typed) and "'text' must be a string" in run(typed)
    empty = write_rows(tmp_path / "d.jsonl", ["", "  "])
    assert "is empty" in run(empty)
    zero = write_rows(tmp_path / "e.jsonl", [*rows, {"prompt": "a prompt longer than --max-len", "completion": "x"}])
    msg = run(zero, "--max-len", "10")
    assert "line 7" in msg and "no token of this row would be trained" in msg and "--max-len 10" in msg
    good = write_rows(tmp_path / "f.jsonl", rows)
    msg = run(good, "--lora", "r=4,targets=q,wq")
    assert "'wq' matches no module" in msg and "q_proj" in msg and "attn.qkv" in msg
    assert "positive integer" in run(good, "--lora", "r=0")
    assert "positive integer" in run(good, "--lora", "r=-2")

    # an adapter made for another base names the mismatching shape
    other = tmp_path / "other"
    make_tiny("llama", other, hidden_size=32, intermediate_size=64)
    lm = lmlab.load(other)
    add_lora(lm.model, LoRASpec(r=2, alpha=4))
    save_adapter(lm.model, LoRASpec(r=2, alpha=4), tmp_path / "other-ad")
    with pytest.raises(LmlabError, match=r"made for another base model: .*has lora_A \(2, 32\).*needs \(2, 64\)"):
        lmlab.load(folder, adapter=tmp_path / "other-ad")
    msg = bad(capsys, "lora", "merge", str(folder), str(tmp_path / "other-ad"), "-o", str(tmp_path / "m"))
    assert "another base model" in msg and not (tmp_path / "m").exists()


def test_a_full_disk_leaves_no_half_written_adapter(base, tmp_path, monkeypatch):
    import builtins

    folder, _ = base
    lm = lmlab.load(folder)
    add_lora(lm.model, LoRASpec(r=2, alpha=4))
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:100])  # part of the file goes out, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(path).endswith(".tmp") else f

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(LmlabError, match="the disk is full"):
        save_adapter(lm.model, LoRASpec(r=2, alpha=4), tmp_path / "ad")
    monkeypatch.undo()
    assert list((tmp_path / "ad").iterdir()) == []


# ----------------------------------------------------------------------------- LoRA learns, on SmolLM2


def test_lora_learns_a_fixed_answer_format_on_smollm2(tmp_path, home):
    """A made-up answer format (the word in double angle brackets): none of the held-out words is
    answered so before, nearly all are after a few LoRA steps on the others."""
    from answer_format import answer_format_task
    from bundled import smollm2_gguf_path
    from lmlab.finetune import finetune

    lm = lmlab.load(smollm2_gguf_path(), dtype="float32", prepack=False)
    rows, data, fc = answer_format_task(tmp_path, "smollm2-135m")
    from lmlab.finetune.data import load_examples, split

    _, held = split(load_examples(data, lm.tokenizer), fc.val_fraction, fc.seed)
    prompts = [rows[e.line - 1]["prompt"] for e in held]
    answers = [rows[e.line - 1]["completion"] for e in held]

    def accuracy() -> float:
        got = lm.generate(prompts, max_new_tokens=6, temperature=0)
        return sum(g.text.startswith(a) for g, a in zip(got, answers)) / len(answers)

    before = accuracy()
    summary = finetune(fc, lm=lm, record=False, log=lambda m: None)
    after = accuracy()
    assert len(held) == 9
    assert before == 0.0 and after >= 0.8, (before, after, summary["val_loss_before"], summary["val_loss_after"])
    assert summary["val_loss_after"] < summary["val_loss_before"] / 4
    remove_lora(lm.model)
