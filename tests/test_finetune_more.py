"""Adapters on the generating commands, LoRA over a quantized base, and merged folders of every family.

- ``--adapter DIR`` on generate / chat / serve gives what ``lmlab.load(MODEL, adapter=DIR)`` gives,
  is recorded in the run, and a missing folder or another base's adapter is one sentence;
- LoRA trains over a q8 / q4 base: the gradient through the quantized matrices (tile by tile,
  no float copy kept) equals the one through their dequantized float copy, the loss falls, and
  the adapter applies to the float base;
- ``lmlab lora merge`` and ``lmlab merge`` write folders that transformers loads with lmlab's
  logits for GPT-NeoX, Llama (llama3 RoPE, tied), Mistral, Qwen2, Qwen3 and Gemma 3.

Tolerances (float32): two computations of the same logits agree to about 1e-5 on these tiny
models (tests/tiny.py), so transformers vs lmlab is held to 1e-4 and merged vs applied (both lmlab)
to 1e-5 of the largest logit (Gemma 3's run to about 10 here, its sums round a little further);
gradients computed tile by tile vs in one matmul differ only in the order of float additions,
held to 1e-5 of the largest gradient entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.cli.main import main
from lmlab.errors import LmlabError
from lmlab.finetune.adapter import save_adapter
from lmlab.finetune.lora import LoRASpec, add_lora, lora_modules
from tiny import FP32_TIE, assert_same_greedy, make_tiny, near_ties, save_char_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 3, 150, 7, 64, 23, 11, 88, 120]])


def randomise_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every B a random value, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def make_adapter(folder, out, *, targets=("all",), std=0.05, seed=1) -> Path:
    lm = lmlab.load(folder)
    spec = LoRASpec(r=4, alpha=8, targets=targets)
    add_lora(lm.model, spec)
    randomise_b(lm.model, seed=seed, std=std)
    save_adapter(lm.model, spec, out)
    return Path(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, adapter folder) of a tiny random Llama with a one-character tokenizer, and a
    non-zero adapter for it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", folder)
    save_char_tokenizer(folder)
    ad = make_adapter(folder, tmp_path_factory.mktemp("adapter") / "ad", std=0.2)
    return folder, ad


def bad(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- --adapter on the commands


def test_generate_with_adapter_equals_load_with_adapter_and_is_recorded(base, home, capsys):
    from lmlab.runs import RunStore

    folder, ad = base
    prompt = "hello world"

    def cli(*extra) -> dict:
        argv = ["generate", prompt, "-m", str(folder), "--temperature", "0", "-t", "16", "--ignore-eos", "--json"]
        assert main(argv + list(extra)) == 0
        return json.loads(capsys.readouterr().out)

    got = cli("--adapter", str(ad))
    plain = cli()
    want = lmlab.load(folder, adapter=ad).generate(
        prompt, max_new_tokens=16, temperature=0, ignore_eos=True, alternatives=3
    )
    ties = near_ties(want.alternatives, FP32_TIE)
    assert_same_greedy(want.token_ids, got["results"][0]["token_ids"], ties, "generate --adapter")
    assert plain["results"][0]["token_ids"] != got["results"][0]["token_ids"], "the adapter changes the output"
    with RunStore() as store:
        run = store.get(got["run_id"])
        assert run["config"]["adapter"] == str(ad.resolve())
        assert store.get(plain["run_id"])["config"]["adapter"] is None


def test_chat_and_serve_load_the_adapter(base, home, capsys, monkeypatch):
    from lmlab.cli import serve
    from lmlab.runs import RunStore

    folder, ad = base
    turns = iter(["hello"])

    def fake_input(_prompt=""):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    argv = ["chat", "-m", str(folder), "--adapter", str(ad), "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    capsys.readouterr()
    with RunStore() as store:
        (run,) = [r for r in store.list() if r["command"] == "chat"]
        assert store.get(run["id"])["config"]["adapter"] == str(ad.resolve())
    # the server's loader applies the adapter the way lmlab.load does
    served = serve._load(lmlab, str(folder), "float32", "cpu", str(ad.resolve()))
    capsys.readouterr()
    assert served.native_decode is False
    assert (served(IDS) - lmlab.load(folder, adapter=ad)(IDS)).abs().max() <= 1e-5


def test_adapter_flag_bad_inputs_get_one_sentence(base, tmp_path, home, capsys):
    folder, _ = base
    missing = tmp_path / "nope"
    msg = bad(capsys, "generate", "hi", "-m", str(folder), "--adapter", str(missing), "--no-record")
    assert "does not exist" in msg and str(missing) in msg
    assert "does not exist" in bad(capsys, "chat", "-m", str(folder), "--adapter", str(missing), "--no-record")
    assert "does not exist" in bad(capsys, "serve", "-m", str(folder), "--adapter", str(missing), "--no-record")
    two = bad(capsys, "serve", "-m", str(folder), "-m", "smollm2-135m", "--adapter", str(missing), "--no-record")
    assert "one model" in two
    (tmp_path / "empty").mkdir()
    assert "has no adapter_config.json" in bad(
        capsys, "generate", "hi", "-m", str(folder), "--adapter", str(tmp_path / "empty"), "--no-record"
    )
    other = tmp_path / "other"
    make_tiny("llama", other, hidden_size=32, intermediate_size=64)
    other_ad = make_adapter(other, tmp_path / "other-ad")
    msg = bad(capsys, "generate", "hi", "-m", str(folder), "--adapter", str(other_ad), "--no-record")
    assert "made for another base model" in msg and "(4, 32)" in msg and "(4, 64)" in msg


# ----------------------------------------------------------------------------- LoRA over a quantized base


def dequantized_copy(lm) -> None:
    """Replace every quantized matrix of ``lm`` by a float copy of its dequantized values."""
    from torch import nn

    from lmlab.quant import QuantEmbedding, QuantLinear

    for module in list(lm.model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.qweight.dequantize())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, name, lin)
            elif isinstance(child, QuantEmbedding):
                setattr(module, name, nn.Embedding.from_pretrained(child.qweight.dequantize()))


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_gradient_through_the_quantized_base_equals_the_dequantized_one(base, kind, monkeypatch):
    import lmlab.finetune.quantbase as qb
    from lmlab.finetune.run import masked_loss
    from lmlab.quant import is_quantized

    folder, _ = base
    monkeypatch.setattr(qb, "TILE_VALUES", 16 * 64)  # tiles of 16 rows: the tiling itself is exercised
    quant, deq = lmlab.load(folder, quant=kind), lmlab.load(folder, quant=kind)
    dequantized_copy(deq)
    assert is_quantized(quant.model) and not is_quantized(deq.model)
    assert qb.make_trainable(quant.model) == 2 * 4 + 1  # the four matrices of each block and the head
    ids = torch.randint(0, 160, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :6] = False
    shapes = {tuple(m.qweight.shape) for m in quant.model.modules() if hasattr(m, "qweight")}
    grads, losses, saved = [], [], []
    for lm in (quant, deq):
        torch.manual_seed(0)  # the same A in both
        add_lora(lm.model, LoRASpec(r=4, alpha=8, targets=("q", "v", "down")))  # o, gate/up and the head pass it
        randomise_b(lm.model)
        lm.model.train()
        kept = []  # the shapes of what autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            loss, n = masked_loss(lm.model, ids, mask)
        saved.append(shapes & set(kept))
        (loss / n).backward()
        losses.append(float(loss.detach() / n))
        grads.append({k: p.grad for k, p in lm.model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert not saved[0] and saved[1], "no float copy of a quantized matrix is kept for backward (the float model's are)"
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2  # A and B of q, v, down per layer
    for k, want in grads[1].items():
        scale = want.abs().max()
        assert scale > 0, k
        assert (grads[0][k] - want).abs().max() <= 1e-5 * scale, (k, (grads[0][k] - want).abs().max(), scale)


def tiny_rows(n: int = 24) -> list[dict]:
    words = ["abc", "xyz", "hello", "qrs", "mno", "tuv", "ghi", "def"]
    return [{"prompt": f"w {words[i % 8]}{i}:", "completion": f" [{words[i % 8]}]"} for i in range(n)]


def test_qlora_cli_loss_falls_and_the_adapter_applies_to_the_float_base(base, tmp_path, home, capsys):
    from lmlab.finetune.data import load_examples
    from lmlab.finetune.run import heldout_loss
    from lmlab.runs import RunStore

    folder, _ = base
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()))
    args = ["finetune", str(folder), "--data", str(data), "--quant", "q4", "--lora", "r=4,alpha=8,targets=q,v,o,down"]
    args += ["--steps", "8", "--lr", "1e-2", "--val-fraction", "0.2", "--samples", "1", "--sample-tokens", "4"]
    args += ["--out", str(tmp_path / "run"), "--save-adapter", str(tmp_path / "ad"), "--no-progress", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "quantized base, q4" in captured.err
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.2, summary
    with RunStore() as store:
        assert store.get(summary["run_id"])["config"]["base_quant"] == "q4"

    # the adapter, trained against q4 weights, applies to the float base and helps there too
    examples = load_examples(data, lmlab.load(folder).tokenizer)
    plain = lmlab.load(folder)
    adapted = lmlab.load(folder, adapter=tmp_path / "ad")
    assert adapted.quant == "none"
    before = heldout_loss(plain.model, examples, 8, plain.device, "float32")
    after = heldout_loss(adapted.model, examples, 8, adapted.device, "float32")
    assert after < before - 0.2, (before, after)


def test_quantized_base_bad_inputs(base, tmp_path, home, capsys):
    folder, _ = base
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows(6)))
    common = ["finetune", str(folder), "--data", str(data), "--no-progress", "--no-record"]
    common += ["--out", str(tmp_path / "o")]
    assert "quantized weights (--quant q8) cannot be trained" in bad(capsys, *common, "--full", "--quant", "q8")
    assert "unknown --quant 'q3'" in bad(capsys, *common, "--quant", "q3")
    assert "is not a GGUF file" in bad(capsys, *common, "--quant", "native")  # from lmlab.load, one sentence


# ----------------------------------------------------------------------------- merged folders of every family

FAMILIES = ["gpt_neox", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    made = {}

    def get(family: str, seed: int = 0) -> Path:
        if (family, seed) not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{seed}")
            make_tiny(family, folder, seed=seed)
            save_char_tokenizer(folder)
            made[family, seed] = folder
        return made[family, seed]

    return get


def hf_logits(folder) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merge_writes_a_folder_transformers_loads_for_each_family(family_dirs, family, tmp_path, capsys):
    import peft
    import transformers as tf

    folder = family_dirs(family)
    ad = make_adapter(folder, tmp_path / "ad")
    applied = lmlab.load(folder, adapter=ad)(IDS)  # IDS are longer than the sliding windows (8) of mistral, gemma3
    assert (applied - lmlab.load(folder)(IDS)).abs().max() > 1e-2, "the adapter changes the logits"
    # PEFT applies lmlab's adapter to transformers' model of this family with the same logits
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(ad)).eval()(IDS).logits
    assert (theirs - applied).abs().max() <= 1e-4, (theirs - applied).abs().max()

    assert main(["lora", "merge", "-m", str(folder), str(ad), "-o", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert (hf_logits(tmp_path / "merged") - applied).abs().max() <= 1e-4
    merged = lmlab.load(tmp_path / "merged")(IDS)
    assert (merged - applied).abs().max() <= 1e-5 * applied.abs().max(), (merged - applied).abs().max()
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == original["model_type"] and written["architectures"] == original["architectures"]


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_of_two_models_loads_in_transformers_for_each_family(family_dirs, family, tmp_path):
    from lmlab.merge import merge, spec_from_options

    a, b = family_dirs(family, 0), family_dirs(family, 1)
    merge(spec_from_options([str(a), str(b)], "linear", weights="0.5,0.5"), tmp_path / "m")
    ours = lmlab.load(tmp_path / "m")(IDS)
    assert (hf_logits(tmp_path / "m") - ours).abs().max() <= 1e-4
    assert (ours - lmlab.load(a)(IDS)).abs().max() > 1e-2, "the merge is neither input"


def test_a_config_a_folder_cannot_hold_is_refused_in_one_sentence(family_dirs):
    from lmlab.finetune.export import check_exportable

    cfg = lmlab.load(family_dirs("llama3")).config
    check_exportable(cfg)
    for change in ({"sliding_window": 8}, {"attn_logit_softcap": 30.0}, {"family": "gpt_neox"}):
        with pytest.raises(LmlabError, match=r"lmlab writes merged HF folders .* keep the adapter unmerged"):
            check_exportable(cfg.replace(**change))


# ----------------------------------------------------------------------------- QLoRA on the bundled SmolLM2


def test_qlora_on_smollm2_own_q4_1_blocks_learns_and_the_adapter_works_on_the_float_base(tmp_path):
    """LoRA over the GGUF file's own blocks (Q4_1, kept quantized): a made-up answer format is
    learnt, and the adapter, applied to the float (dequantized) model, answers the held-out
    words in that format too."""
    from answer_format import answer_format_task
    from bundled import smollm2_gguf_path
    from lmlab.finetune import finetune
    from lmlab.finetune.data import load_examples, split

    path = str(smollm2_gguf_path())
    rows, data, fc = answer_format_task(tmp_path, path, quant="native", save_adapter=str(tmp_path / "ad"))
    summary = finetune(fc, record=False, log=lambda m: None)
    # the base does not know the format (held-out loss ~4.7 nats per token; the float base answers
    # 0 of these 9 so: test_finetune.py), and learns it
    assert summary["val_loss_before"] > 3 and summary["val_loss_after"] < summary["val_loss_before"] / 4, summary

    adapted = lmlab.load(path, dtype="float32", prepack=False, adapter=tmp_path / "ad")
    assert adapted.quant == "none"
    _, held = split(load_examples(data, adapted.tokenizer), fc.val_fraction, fc.seed)
    got = adapted.generate([rows[e.line - 1]["prompt"] for e in held], max_new_tokens=6, temperature=0)
    right = sum(g.text.startswith(rows[e.line - 1]["completion"]) for g, e in zip(got, held))
    assert len(held) == 9 and right >= 8, [g.text for g in got]
