"""lmlab.eval: perplexity windows, log-likelihood scoring against lm-evaluation-harness, tasks, voting."""

import json
import math
import random

import pytest
import torch

import lmlab
from lmlab.cli.main import main
from lmlab.errors import LmlabError
from lmlab.eval import evaluate, get_task, load_jsonl, majority, paired_test, perplexity, score_texts
from lmlab.eval.perplexity import windows
from tiny import char_vocab, make_tiny, save_char_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_eval")
    make_tiny("llama", d)
    save_char_tokenizer(d)
    # lm-evaluation-harness needs an end-of-text token; neither side adds a BOS
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(eos_token=char_vocab()[0], add_bos_token=False)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def lm(folder):
    return lmlab.load(folder)


def mc_items(n=12, seed=0):
    rng = random.Random(seed)
    words = ["cat", "dog", "a bird", "the sun", "blue", "green", "seven", "ten", "x", "yes", "no", "maybe so"]
    items = []
    for i in range(n):
        choices = rng.sample(words, 4)
        items.append(
            {
                "prompt": f"Question {i}: pick one of {', '.join(choices)}.\nAnswer:",
                "choices": choices,
                "answer": rng.randrange(4),
            }
        )
    return items


def test_loglikelihood_is_the_sum_of_the_models_token_log_probabilities(lm):
    ctx, cont = "The cat sat ", "on the mat"
    (s,) = score_texts(lm, [(ctx, cont)])
    ids = lm.tokenizer.encode("The cat sat on the mat", add_special=False)
    n_ctx = len(lm.tokenizer.encode("The cat sat", add_special=False))  # the trailing space moved to the continuation
    logp = torch.log_softmax(lm([ids])[0].float(), -1)
    want = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
    assert s.n_tokens == len(ids) - n_ctx and s.logprob == pytest.approx(want, abs=1e-4)
    assert s.is_greedy == all(int(logp[t - 1].argmax()) == ids[t] for t in range(n_ctx, len(ids)))
    # batched with other requests of other lengths (left-padded), the score is the same
    many = score_texts(lm, [("Hi", " there"), (ctx, cont), ("A much longer context than the others", " ok")])
    assert many[1].logprob == pytest.approx(s.logprob, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers, a window of 8 tokens
def test_shared_prefix_scoring_equals_scoring_each_request_alone(family, lm, tmp_path):
    from lmlab.eval.loglik import score_tokens

    if family != "llama":
        make_tiny(family, tmp_path)
        save_char_tokenizer(tmp_path)
        lm = lmlab.load(tmp_path)
    rng = random.Random(1)
    requests = []  # items of 1-4 choices of 1-6 tokens; some contexts empty, some too long for the context
    for length in [0, 3, 20, 40, 90, 127, 140, 20]:
        ctx = [rng.randrange(1, 60) for _ in range(length)]
        for _ in range(rng.randint(1, 4)):
            requests.append((ctx, [rng.randrange(1, 60) for _ in range(rng.randint(1, 6))]))
    ctx = [rng.randrange(1, 60) for _ in range(10)]  # 45 choices of 6 tokens: at 200 tokens a batch, cut in two
    requests += [(ctx, [rng.randrange(1, 60) for _ in range(6)]) for _ in range(45)]
    alone = [score_tokens(lm, [r], share_prefix=False)[0] for r in requests]
    for batch_tokens in (4096, 200):  # one batch, and several (the contexts packed differently)
        shared = score_tokens(lm, requests, batch_tokens=batch_tokens)
        for a, b in zip(shared, alone):
            assert a.n_tokens == b.n_tokens and a.is_greedy == b.is_greedy
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_multiple_choice_equals_lm_evaluation_harness(folder, lm, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    items = mc_items()
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    theirs = out["results"]["tiny_mc"]
    ours = evaluate(lm, load_jsonl(data), shots=0, fmt="base")
    assert ours.metrics["acc"] == pytest.approx(theirs["acc,none"])
    assert ours.metrics["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for sample, row in zip(samples, ours.items):
        their_lls = [float(r[0][0]) for r in sample["resps"]]
        assert row["loglikelihoods"] == pytest.approx(their_lls, abs=1e-4)


def test_multiple_choice_picks_the_choice_with_the_highest_total_loglikelihood(lm):
    task = load_jsonl_from(mc_items(6, seed=3))
    res = evaluate(lm, task, shots=0, fmt="base")  # prompts within the tiny model's 128-token context
    for row in res.items:
        # recomputed here from the model's logits, one choice at a time
        lls = []
        for c in row["choices"]:
            ids = lm.tokenizer.encode(row["prompt"] + " " + c, add_special=False)
            n = len(lm.tokenizer.encode(row["prompt"], add_special=False))
            logp = torch.log_softmax(lm([ids])[0].float(), -1)
            lls.append(sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids))))
        assert row["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert row["prediction"] == row["choices"][max(range(4), key=lambda j: lls[j])]
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        assert row["correct_norm"] == (max(range(4), key=lambda j: norm[j]) == row["gold"])


def load_jsonl_from(items, tmp=[]):  # noqa: B006  (a scratch folder for the session)
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "items.jsonl"
    p.write_text("".join(json.dumps(it) + "\n" for it in items))
    return load_jsonl(p)


def test_perplexity_windows_cover_every_token_once():
    # strided: every token but the first is scored once
    for n, w, s in [(100, 32, 16), (33, 32, 8), (10, 32, 16), (64, 32, 32), (65, 32, 32), (7, 4, 4)]:
        scored = sum(k for _, _, k in windows(n, w, s))
        assert scored == (n if s >= w else n - 1), (n, w, s)


def test_perplexity_matches_a_direct_computation(lm):
    text = "the quick brown fox jumps over the lazy dog. " * 2  # 90 tokens: within the 128-token context
    ids = lm.tokenizer.encode(text, add_special=False)
    logp = torch.log_softmax(lm([ids])[0].float(), -1)
    whole = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
    # one window holds the whole text: the strided result is the direct one
    res = perplexity(lm, text, window=len(ids), stride=len(ids) // 2)
    assert res.method == "strided" and res.tokens == len(ids) - 1
    assert res.loglikelihood == pytest.approx(whole, abs=1e-3)
    assert res.perplexity == pytest.approx(math.exp(-whole / (len(ids) - 1)), rel=1e-4)
    assert res.bits_per_byte == pytest.approx(-whole / len(text.encode()) / math.log(2), rel=1e-4)
    disjoint = perplexity(lm, text, window=16, stride=16)
    assert disjoint.method == "disjoint" and disjoint.tokens == len(ids)  # the first token too, after the prefix


def test_builtin_tasks_and_voting(lm):
    for name in ("arithmetic", "copy", "reverse", "pattern", "sentiment", "facts"):
        t = get_task(name, n=5)
        assert t.items and all(it.prompt and it.answer for it in t.items)
        assert get_task(name, n=5).items == t.items  # seeded: the same items every time
    res = evaluate(lm, get_task("arithmetic", n=4), shots=1, limit=3, vote=3, temperature=1.0, max_new_tokens=4)
    assert [n for n, _ in res.vote_curve] == [1, 2, 3] and len(res.items[0]["samples"]) == 3
    assert majority(["1", "2", "2", "1"]) == "1" and majority(["", "", "3"]) == "3"
    assert paired_test([True, True, False], [False, True, False]) == {"only_a": 1, "only_b": 0, "p_value": 1.0}


def test_bad_task_files_name_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(LmlabError, match="bad.jsonl:2 is not valid JSON"):
        load_jsonl(bad)
    bad.write_text('{"prompt": "a", "answer": "z", "choices": ["x", "y"]}\n')
    with pytest.raises(LmlabError, match="bad.jsonl:1: the answer 'z' is not one of its choices"):
        load_jsonl(bad)
    code = main(["eval", "run", "--task", str(tmp_path / "missing.jsonl"), "--no-record"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(LmlabError, match="--items must be >= 1"):
        get_task("arithmetic", n=0)
    with pytest.raises(LmlabError, match="--limit must be >= 1"):
        evaluate(object(), get_task("facts"), limit=-1)


def test_eval_cli_records_runs_and_compares_them(folder, capsys, home, tmp_path):
    task = home.parent / "t.jsonl"
    task.write_text("".join(json.dumps(it) + "\n" for it in mc_items(8)))
    assert main(["eval", "run", str(folder), "--task", str(task), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["eval", "run", str(folder), "--task", str(task), "-k", "2", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert 0 <= a["metrics"]["acc"] <= 1 and a["run_id"] != b["run_id"]
    assert main(["eval", "compare", a["run_id"], b["run_id"], "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in cmp["runs"]] == [a["metrics"]["acc"], b["metrics"]["acc"]]
    test = cmp["paired_test"]
    assert test["only_a"] + test["only_b"] + test["both_right"] + test["both_wrong"] == 8
    assert test["both_right"] + test["only_a"] == round(8 * a["metrics"]["acc"])
    # the comparison is a run of its own, and the HTML report draws it
    from lmlab.runs import RunStore

    rec = RunStore().get(cmp["run_id"])
    assert rec["command"] == "eval compare" and rec["outputs"]["paired_test"] == test
    assert rec["metrics"]["p_value"] == test["p_value"]
    page = tmp_path / "cmp.html"
    assert main(["runs", "export", cmp["run_id"], "--html", "-o", str(page)]) == 0
    capsys.readouterr()
    html = page.read_text()
    assert html.count("<svg") == 1 and "McNemar" in html and f"only {a['run_id'][:8]}" in html
    # a paired test on different items is refused
    other = home.parent / "other.jsonl"
    other.write_text("".join(json.dumps(it) + "\n" for it in mc_items(8, seed=5)))
    assert main(["eval", "run", str(folder), "--task", str(other), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert main(["eval", "compare", a["run_id"], c["run_id"], "--no-record"]) == 2
    assert "scored different items" in capsys.readouterr().err
    text = home.parent / "text.txt"
    text.write_text("some text to score, " * 20)
    assert main(["eval", "perplexity", str(folder), "--data", str(text), "--window", "64", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert ppl["method"] == "strided" and ppl["perplexity"] > 1
    argv = ["eval", "perplexity", str(folder), "--data", str(text), "--window", "64", "--json", "--quant", "q8"]
    assert main(argv) == 0
    q8 = json.loads(capsys.readouterr().out)
    assert q8["perplexity"] != ppl["perplexity"] and abs(q8["perplexity"] / ppl["perplexity"] - 1) < 0.05


def test_judge_counts_both_orders_and_never_drops_an_unparsed_verdict():
    from lmlab.eval.judge import judge_pairs, parse_rating, parse_verdict

    assert parse_verdict("Verdict: A") == "A" and parse_verdict("**B** is better") == "B"
    assert parse_verdict("verdict: tie.") == "tie" and parse_verdict("I cannot decide") is None
    assert parse_rating("Rating: 7") == 7 and parse_rating("Rating: 11") is None

    class Scripted:  # a judge that always prefers the first answer it is shown, and once says nothing useful
        tokenizer = None

        def __init__(self):
            self.calls = 0

        def generate(self, prompt, **kw):
            self.calls += 1
            return ["hmm"] if self.calls == 4 else ["Verdict: A"]

    report = judge_pairs(Scripted(), ["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    s = report.summary()
    # q1: A first -> A; swapped, the judge again picks the first shown (B) -> an inconsistent pair
    assert s["verdicts"] == 4 and s["unparsed"] == 1 and s["pairs_parsed_both_ways"] == 1
    assert s["consistency"] == 0.0 and s["win_rate_a"] == pytest.approx(2 / 3)


def test_eval_judge_cli_on_two_generate_runs(tmp_path, capsys, home):
    folder = tmp_path / "judge"  # a context long enough for the judge's prompt, one character per token
    folder.mkdir()
    make_tiny("llama", folder, max_position_embeddings=2048)
    save_char_tokenizer(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nwhat is up\n")
    ids = []
    for t in ("0", "1.0"):
        args = [
            "generate",
            "-m",
            str(folder),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "4",
            "--temperature",
            t,
            "--seed",
            "1",
            "--json",
        ]
        assert main(args) == 0
        ids.append(json.loads(capsys.readouterr().out)["run_id"])
    assert main(["eval", "judge", "--runs", ids[0], "--runs", ids[1], "--judge", str(folder), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["result"]
    assert res["questions"] == 2 and res["verdicts"] == 4  # a random judge: its unparsed verdicts are counted
    assert res["unparsed"] + round(res["verdicts"] * (res["win_rate_a"] + res["win_rate_b"] + res["tie_rate"])) == 4


def test_endpoint_requests_go_out_concurrently_and_bad_settings_are_named(capsys):
    import threading
    import time

    from lmlab.eval.backends import EndpointBackend

    backend = EndpointBackend("http://127.0.0.1:9/v1", model="m", concurrency=3)  # a model named: no request yet
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def request(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return i * i

    assert backend.map(request, range(7)) == [i * i for i in range(7)]  # in order
    assert state["most"] == 3
    with pytest.raises(LmlabError, match="--concurrency must be at least 1"):
        EndpointBackend("http://127.0.0.1:9", model="m", concurrency=0)
    with pytest.raises(LmlabError, match=r"could not reach http://127.0.0.1:9/v1/completions"):
        backend.generate("hi", max_new_tokens=2, stop=[])
    code = main(["eval", "run", "--task", "arithmetic", "--endpoint", "http://127.0.0.1:9", "--no-record"])
    assert code == 2 and "could not reach http://127.0.0.1:9/v1/models" in capsys.readouterr().err
    # the default model's name, given, is the served model asked for (no listing of the models)
    argv = ["eval", "run", "smollm2-135m", "--task", "arithmetic", "--endpoint", "http://127.0.0.1:9", "--no-record"]
    assert main(argv) == 2 and "could not reach http://127.0.0.1:9/v1/completions" in capsys.readouterr().err
