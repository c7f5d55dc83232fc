"""The playground's server side (serve/lab.py) against a real `lmlab serve` process.

One server serves two tiny random models: a Llama with grouped-query attention and a chat template,
and a Gemma 3 with an 8-token sliding window, both with a one-character-per-token tokenizer.
Answers are checked against what this process computes: the tokenizer's own ids and template, the
sampler's own stages, softmax rows, the causal mask.
"""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
import torch

from serve_helpers import ServeProcess, sse_events
from tiny import FP32_TIE, make_tiny, save_char_tokenizer

PLAYGROUND = {"X-Lmlab-Client": "playground"}
CONTEXT = 1024  # the tiny llama's context (tokens): long enough for a stream that lasts a while
PROMPT = "The cat <script>alert(1)</script> sat"
TEMPLATE = (  # a chat template in the characters the tiny tokenizer has (no newline)
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("llama", "gemma3"):
        folder = tmp_path_factory.mktemp(f"lab-{family}")
        make_tiny(family, folder, **({"max_position_embeddings": CONTEXT} if family == "llama" else {}))
        save_char_tokenizer(folder)
        out[family] = folder
    (out["llama"] / "chat_template.jinja").write_text(TEMPLATE)
    return out


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    args = ["-m", str(folders["llama"]), "-m", str(folders["gemma3"]), "--max-batch", "4"]
    s = ServeProcess(args, tmp_path_factory.mktemp("lab-serve"))
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def llama(server, folders):
    return str(folders["llama"])


@pytest.fixture(scope="module")
def gemma(server, folders):
    return str(folders["gemma3"])


@pytest.fixture(scope="module")
def tokenizer(folders):
    from lmlab.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(folders["llama"])


def post(server, path: str, body, headers=None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers or {}, timeout=120)


def get(server, path: str, **kw) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60, **kw)


def stream_tokens(server, body: dict, headers=PLAYGROUND) -> tuple[list[dict], str, list[dict]]:
    """(the lmlab token entries, the streamed text, the chunks) of one streamed completion."""
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1]]
    tokens, text = [], ""
    for c in chunks:
        for choice in c["choices"]:
            text += choice["text"]
            tokens += choice["lmlab"]["tokens"]
    return tokens, text, chunks


def prompt_ids(server, model: str, text: str = PROMPT) -> list[int]:
    r = post(server, "/lab/prompt", {"model": model, "text": text, "mode": "base"})
    assert r.status_code == 200, r.text
    return r.json()["ids"]


# ----------------------------------------------------------------------------------------- the page


def test_page_and_static_files_are_served_with_their_types(server):
    r = get(server, "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script" in r.text and 'type="module"' in r.text
    js = get(server, "/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    css = get(server, "/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for bad in ("/static/nothing.js", "/static/..%2Fserve%2Fapp.py", "/static/.hidden"):
        r = get(server, bad)
        assert r.status_code == 404 and "error" in r.json(), bad


def test_every_lab_route_is_documented_with_its_request_model(server):
    spec = get(server, "/openapi.json").json()
    paths = spec["paths"]
    for route in (
        "/lab/models",
        "/lab/runs",
        "/lab/runs/{run_id}",
        "/lab/runs/{run_id}/export",
        "/lab/bench",
        "/lab/stats",
    ):
        assert "get" in paths[route], route
    for route, model in (
        ("/lab/prompt", "PromptRequest"),
        ("/lab/inside", "InsideRequest"),
        ("/lab/attention", "AttentionRequest"),
        ("/lab/intervene", "InterveneRequest"),
    ):
        schema = paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(model), route


def test_models_list_shape_memory_and_windows(server, llama, gemma):
    models = {m["id"]: m for m in get(server, "/lab/models").json()["models"]}
    m = models[llama]
    assert m["state"] == "loaded" and m["family"] == "llama" and m["memory_bytes"] > 0
    assert (m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"]) == (2, 4, 2, 16)
    assert m["sliding_window"] == [None, None] and m["has_chat_template"] is True
    assert models[gemma]["sliding_window"] == [8, 8, None] and models[gemma]["has_chat_template"] is False


# ----------------------------------------------------------------------------------------- prompts


def test_prompt_count_equals_the_tokenizers_and_script_stays_plain_text(server, llama, gemma, tokenizer):
    r = post(server, "/lab/prompt", {"model": llama, "text": PROMPT, "mode": "base"}).json()
    assert r["ids"] == tokenizer.encode(PROMPT) and r["count"] == len(r["ids"])
    assert r["text"] == PROMPT and "".join(r["pieces"]) == PROMPT  # no escaping, no stripping
    fake = post(server, "/lab/prompt", {"model": llama, "text": "Hi?", "mode": "fake-chat", "shots": [["a", "b"]]})
    fake = fake.json()
    assert fake["text"].endswith("User: a\nAssistant: b\n\nUser: Hi?\nAssistant:") and fake["stop"]
    assert fake["count"] == len(tokenizer.encode(fake["text"]))
    r = post(server, "/lab/prompt", {"model": gemma, "text": "x", "mode": "chat"})  # gemma has no template
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"


def test_chat_prompt_equals_the_models_template(server, llama, tokenizer):
    body = {"model": llama, "text": "Why <b>?", "mode": "chat", "system": "Be brief.", "shots": [["2+2?", "4"]]}
    r = post(server, "/lab/prompt", body).json()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Why <b>?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|system|>Be brief. <|user|>2+2? <|assistant|>4 <|user|>Why <b>? <|assistant|>"
    assert r["text"] == text and r["ids"] == tokenizer.encode(text, add_special=False) and r["count"] == len(text)
    assert "".join(r["pieces"]) == text


# ----------------------------------------------------------------------------------------- generation


def test_streamed_token_ids_alternatives_and_the_recorded_run(server, llama, tokenizer):
    ids = prompt_ids(server, llama)
    body = {
        "model": llama,
        "prompt": ids,
        "max_tokens": 12,
        "seed": 7,
        "temperature": 0.8,
        "top_k": 20,
        "logprobs": 5,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    tokens, text, chunks = stream_tokens(server, body)
    assert len(tokens) == 12
    assert tokenizer.decode([t["id"] for t in tokens]) == text  # the ids spell the streamed text
    assert "".join(t["text"] for t in tokens) == text
    openai_lps = [
        lp for c in chunks for ch in c["choices"] if ch["logprobs"] for lp in ch["logprobs"]["token_logprobs"]
    ]
    now = time.time() * 1e3
    for t, raw in zip(tokens, openai_lps):
        assert t["entropy"] >= 0 and t["logprob"] <= 0
        assert t["raw_logprob"] == pytest.approx(raw, abs=1e-6)  # the model's own, as OpenAI's logprobs
        top_ids = [a[0] for a in t["top"]]
        assert t["id"] in top_ids  # the sampled token is among its alternatives
        mine = next(a for a in t["top"] if a[0] == t["id"])
        assert mine[2] == pytest.approx(t["logprob"], abs=1e-6)
        assert sum(math.exp(a[2]) for a in t["top"]) <= 1 + 1e-5
        assert 0 < now - t["t_ms"] < 120_000
        assert t["piece"] == tokenizer.token_str(t["id"])
    assert [t["t_ms"] for t in tokens] == sorted(t["t_ms"] for t in tokens)
    run_id = chunks[-1]["choices"][0]["lmlab"]["run_id"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    again, _, _ = stream_tokens(server, body)  # the same seed gives the same tokens
    assert [t["id"] for t in again] == [t["id"] for t in tokens]
    plain = {k: v for k, v in body.items() if k not in ("return_token_ids", "logprobs")}
    assert post(server, "/v1/completions", plain).json()["choices"][0]["text"] == text  # the engine's usual draw

    deadline = time.monotonic() + 20
    while True:  # the run is closed in a thread once the stream has ended
        run = get(server, f"/lab/runs/{run_id}").json()
        if run["status"] == "complete" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert run["status"] == "complete" and run["command"] == "generate" and run["seed"] == 7
    assert run["inputs"]["prompt_ids"] == [ids] and run["outputs"]["token_ids"] == [[t["id"] for t in tokens]]
    assert run["outputs"]["texts"] == [text] and run["config"]["temperature"] == 0.8
    listed = get(server, "/lab/runs", params={"kind": "generate", "model": llama}).json()["runs"]
    assert run_id in [r["id"] for r in listed]
    export = get(server, f"/lab/runs/{run_id}/export")
    assert "attachment" in export.headers["content-disposition"] and export.json()["id"] == run_id
    stats = get(server, "/lab/stats").json()
    assert stats["last"]["ttft_ms"] > 0 and stats["models"][llama]["weight_bytes"] > 0


def test_non_streamed_completion_carries_the_tokens_too(server, llama):
    ids = prompt_ids(server, llama)
    body = {
        "model": llama,
        "prompt": ids,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = post(server, "/v1/completions", body).json()  # no playground header: not recorded as a run of its own
    choice = r["choices"][0]
    assert len(choice["lmlab"]["tokens"]) == 5 and "run_id" not in choice["lmlab"]
    streamed, text, _ = stream_tokens(server, body)
    assert [t["id"] for t in streamed] == [t["id"] for t in choice["lmlab"]["tokens"]] and text == choice["text"]


# ----------------------------------------------------------------------------------------- inside


def _final_probs_from_candidates(candidates, temperature, top_k, top_p) -> dict[int, float]:
    """The sampler's warpers written out again, independently, on the candidates' raw logits."""
    logits = sorted(((c["logit"] / temperature, c["id"]) for c in candidates), reverse=True)[:top_k]
    z = max(v for v, _ in logits)
    weights = [(i, math.exp(v - z)) for v, i in logits]
    total = sum(w for _, w in weights)
    kept, mass = [], 0.0
    for i, w in weights:
        if mass >= top_p:
            break
        kept.append((i, w))
        mass += w / total
    total = sum(w for _, w in kept)
    return {i: w / total for i, w in kept}


def test_inside_chain_is_the_distribution_the_engine_sampled_from(server, llama):
    ids = prompt_ids(server, llama)
    sampling = {"temperature": 0.7, "top_k": 12, "top_p": 0.9}
    body = {
        "model": llama,
        "prompt": ids,
        "max_tokens": 6,
        "seed": 3,
        "ignore_eos": True,
        "logprobs": 5,
        "return_token_ids": True,
        **sampling,
    }
    tokens, _, _ = stream_tokens(server, body)
    full = ids + [t["id"] for t in tokens]
    for j in (0, 3, 5):
        position = len(ids) + j
        r = post(server, "/lab/inside", {"model": llama, "ids": full, "position": position, "sampling": sampling})
        assert r.status_code == 200, r.text
        d = r.json()
        chain = d["chain"]
        assert chain["sampled"]["id"] == full[position] == d["token"]["id"]
        # its final probability is the one the engine drew it with
        assert chain["sampled"]["prob"] == pytest.approx(math.exp(tokens[j]["logprob"]), rel=1e-4)
        assert [s["name"] for s in chain["stages"]] == ["logits", "penalties", "temperature", "top_k", "top_p", "min_p"]
        assert chain["stages"][3]["kept"] == 12 and chain["stages"][4]["kept"] <= 12
        want = _final_probs_from_candidates(chain["candidates"], **sampling)
        last = chain["stages"][-1]
        assert {t["id"] for t in last["top"]} == set(want) and last["kept"] == len(want)
        for t in last["top"]:
            assert t["prob"] == pytest.approx(want[t["id"]], abs=1e-5)
        # the lens's last layer is the model's own output
        raw_top = chain["stages"][0]["top"]
        if raw_top[0]["logit"] - raw_top[1]["logit"] > FP32_TIE:
            assert d["lens"][-1]["top"][0]["id"] == raw_top[0]["id"]
        assert [row["layer"] for row in d["lens"]] == [0, 1] and len(d["lens"][0]["top"]) == 10
        att = d["attention"]
        assert (att["layers"], att["heads"], att["kv_group"]) == (2, 4, [0, 0, 1, 1])
        for layer in att["rows"]:
            for row in layer:
                assert len(row) == position and sum(row) == pytest.approx(1, abs=1e-5)
        assert d["timing"]["forward_ms"] > 0 and d["timing"]["capture_ms"] > 0
        assert "".join(d["context"]["pieces"]) == PROMPT + "".join(t["text"] for t in tokens[:j])


def test_greedy_chain_takes_the_argmax(server, llama):
    ids = prompt_ids(server, llama)
    body = {
        "model": llama,
        "prompt": ids,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "repetition_penalty": 1.3,
    }
    tokens, _, _ = stream_tokens(server, body)
    full = ids + [t["id"] for t in tokens]
    for j in range(4):
        sampling = {"temperature": 0, "repetition_penalty": 1.3}
        d = post(
            server, "/lab/inside", {"model": llama, "ids": full, "position": len(ids) + j, "sampling": sampling}
        ).json()
        chain = d["chain"]
        assert chain["greedy"] and [s["name"] for s in chain["stages"]] == ["logits", "penalties"]
        top = chain["stages"][-1]["top"]
        if top[0]["logit"] - top[1]["logit"] > FP32_TIE:
            assert chain["sampled"]["id"] == chain["sampled"]["argmax"] == top[0]["id"]
        # the penalty lowered every token seen in the context, and only those
        seen = set(full[: len(ids) + j])
        for c in chain["candidates"][:50]:
            changed = c["penalized"] != pytest.approx(c["logit"], abs=1e-6)
            assert changed == (c["id"] in seen and c["logit"] != 0)


def test_chain_stages_equal_the_samplers_own():
    """In this process: the chain's last stage is Sampler.process, for every knob at once."""
    from lmlab.engine.sampling import Sampler, SamplingParams
    from lmlab.serve.lab import sampling_chain

    torch.manual_seed(0)
    logits = torch.randn(1, 160) * 3
    context = torch.randint(0, 160, (1, 30))
    for kw in (
        dict(
            temperature=0.7,
            top_k=40,
            top_p=0.8,
            min_p=0.05,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            presence_penalty=0.4,
            no_repeat_ngram_size=2,
        ),
        dict(temperature=1.3, typical_p=0.7),
        dict(temperature=0.0, repetition_penalty=1.5),
    ):
        params = SamplingParams(**kw)
        counts = torch.zeros(1, 160).scatter_add_(1, context, torch.ones(1, 30))
        want = Sampler(params, 160, "cpu").process(logits, counts, context)
        got = sampling_chain(logits, context, params)[-1][1]
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), kw
        assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)], atol=1e-6), kw


# ----------------------------------------------------------------------------------------- attention


def test_attention_rows_sum_to_one_causal_and_windowed(server, llama, gemma):
    ids = prompt_ids(server, llama)[:20]
    d = post(server, "/lab/attention", {"model": llama, "ids": ids}).json()
    assert (d["layers"], d["heads"], len(d["pieces"])) == (2, 4, 20)
    for layer in d["weights"]:
        for head in layer:
            for q, row in enumerate(head):
                assert sum(row) == pytest.approx(1, abs=1e-5)
                assert all(w == 0 for w in row[q + 1 :])  # nothing above the diagonal
    g = post(server, "/lab/attention", {"model": gemma, "ids": ids}).json()
    assert g["window"] == [8, 8, None] and g["kv_group"] == [0, 0, 0, 0]
    outside_full = 0.0
    for layer, window in enumerate(g["window"]):
        for head in g["weights"][layer]:
            for q, row in enumerate(head):
                assert sum(row) == pytest.approx(1, abs=1e-5) and all(w == 0 for w in row[q + 1 :])
                far = row[: max(0, q - 7)]  # keys 8 or more tokens back
                if window is not None:
                    assert all(w == 0 for w in far)
                else:
                    outside_full += sum(far)
    assert outside_full > 0  # the full layer does look further back
    one = post(server, "/lab/attention", {"model": gemma, "ids": ids, "layer": 1}).json()
    assert one["layers"] == 1 and one["layer_index"] == [1]
    for head, full in zip(one["weights"][0], g["weights"][1]):  # the other layers' kernels round differently
        for row, want in zip(head, full):
            assert row == pytest.approx(want, abs=1e-5)
    # /lab/inside's row is the same pattern's last row, windowed too
    inside = post(server, "/lab/inside", {"model": gemma, "ids": ids, "position": 19}).json()
    for layer in range(3):
        for h in range(4):
            row = inside["attention"]["rows"][layer][h]
            assert row == pytest.approx(g["weights"][layer][h][18][:19], abs=1e-5)


# ----------------------------------------------------------------------------------------- interventions


def test_ablation_changes_the_metrics_and_no_intervention_changes_nothing(server, llama):
    ids = prompt_ids(server, llama)
    base = {
        "model": llama,
        "ids": ids,
        "max_tokens": 8,
        "seed": 5,
        "sampling": {"temperature": 0.9},
        "ignore_eos": True,
    }
    empty = post(server, "/lab/intervene", base).json()
    assert empty["baseline"]["ids"] == empty["intervened"]["ids"] and empty["first_diff"] is None
    assert len(empty["per_position"]) == 8 and all(p["kl"] == 0 and p["dlogit"] == 0 for p in empty["per_position"])
    assert empty["lens"]["baseline"] == empty["lens"]["intervened"]
    ablated = post(server, "/lab/intervene", {**base, "ablate": [[0, 1], [1, 2]]}).json()
    assert ablated["baseline"]["ids"] == empty["baseline"]["ids"]  # same seed, same baseline
    assert max(p["kl"] for p in ablated["per_position"]) > 1e-4
    assert ablated["lens"]["baseline"] != ablated["lens"]["intervened"]
    skipped = post(
        server, "/lab/intervene", {**base, "skip_layers": [1], "steer": {"positive": "a", "negative": "z", "layer": 0}}
    ).json()
    assert max(p["kl"] for p in skipped["per_position"]) > 1e-4 and len(skipped["interventions"]) == 2
    runs = get(server, "/lab/runs", params={"kind": "inspect intervene"}).json()["runs"]
    assert ablated["run_id"] in [r["id"] for r in runs]
    run = get(server, f"/lab/runs/{ablated['run_id']}").json()
    assert run["config"]["ablate"] == [[0, 1], [1, 2]] and run["outputs"]["intervened"] == ablated["intervened"]
    assert post(server, "/lab/intervene", {**base, "ablate": [[0, 9]]}).status_code == 400
    after = get(server, "/lab/runs", params={"kind": "inspect intervene"}).json()["runs"]
    assert len(after) == len(runs)  # a refused request is not a run


def test_inspection_while_a_stream_runs_leaves_the_stream_unchanged(server, llama):
    """Looks inside run in the engine's thread between steps: hooks and ablations never reach the batch."""
    ids = prompt_ids(server, llama)
    body = {
        "model": llama,
        "prompt": ids,
        "max_tokens": CONTEXT - len(ids),
        "temperature": 0.8,
        "seed": 11,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    alone, _, _ = stream_tokens(server, body)
    result = {}
    t = threading.Thread(target=lambda: result.update(tokens=stream_tokens(server, body)[0]))
    t.start()
    looks = []  # (sent, answered) in ms, the clock of the tokens' t_ms
    while t.is_alive():
        sent = time.time() * 1e3
        r = post(server, "/lab/intervene", {"model": llama, "ids": ids, "max_tokens": 2, "ablate": [[0, 0], [1, 3]]})
        r2 = post(server, "/lab/inside", {"model": llama, "ids": ids, "position": len(ids) - 1})
        assert r.status_code == r2.status_code == 200, (r.text, r2.text)
        looks.append((sent, time.time() * 1e3))
    t.join(120)
    got = result["tokens"]
    assert [x["id"] for x in got] == [x["id"] for x in alone]
    first, last = got[0]["t_ms"], got[-1]["t_ms"]
    assert any(first < a and b < last for a, b in looks), "no look inside ran while the stream was decoding"


def test_capture_of_a_long_context_equals_the_one_forward_capture(folders, monkeypatch):
    """In this process: past FULL_CAPTURE_TOKENS the row and lens come from a cached last step; same numbers."""
    import lmlab
    from lmlab.engine.sampling import SamplingParams
    from lmlab.serve import lab

    lm = lmlab.load(folders["gemma3"])
    ids = list(range(3, 40))
    params = SamplingParams(temperature=0.5)
    one = lab.look_inside(lm, ids, 30, 5, params)
    monkeypatch.setattr(lab, "FULL_CAPTURE_TOKENS", 0)
    cached = lab.look_inside(lm, ids, 30, 5, params)
    for a, b, window in zip(one["attention"]["rows"], cached["attention"]["rows"], one["attention"]["window"]):
        for ra, rb in zip(a, b):
            assert ra == pytest.approx(rb, abs=1e-5) and sum(rb) == pytest.approx(1, abs=1e-5)
            if window is not None:  # the query (position 29) sees keys 22..29 only
                assert all(w == 0 for w in ra[:22]) and all(w == 0 for w in rb[:22])
    for la, lb in zip(one["lens"], cached["lens"]):
        assert [t["prob"] for t in la["top"]] == pytest.approx([t["prob"] for t in lb["top"]], abs=1e-5)
    assert one["chain"] == cached["chain"]


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/lab/inside", {"model": "nope", "ids": [1, 2], "position": 1}, 404, "model"),
        ("/lab/inside", {"ids": [1, 2, 3], "position": 3}, 400, "position"),
        ("/lab/inside", {"ids": [1, 2, 3], "position": 0}, 400, "position"),
        ("/lab/inside", {"ids": [1, 160, 3], "position": 1}, 400, "ids"),
        ("/lab/inside", {"ids": [1, -1, 3], "position": 1}, 400, "ids"),
        ("/lab/inside", {"ids": [], "position": 1}, 400, "ids"),
        ("/lab/inside", {"ids": [1] * (CONTEXT + 1), "position": 1}, 400, "ids"),
        ("/lab/inside", {"ids": [1, 2], "position": 1, "k": 0}, 400, "k"),
        ("/lab/inside", {"ids": [1, 2], "position": 1, "sampling": {"temperature": -1}}, 400, "sampling.temperature"),
        ("/lab/inside", {"ids": [1, 2], "position": 1, "sampling": {"top_p": 1.5}}, 400, "sampling.top_p"),
        ("/lab/inside", {"ids": [1, 2], "position": 1, "sampling": {"min_p": 1}}, 400, "sampling.min_p"),
        ("/lab/inside", {"ids": [1, 2], "position": 1, "sampling": {"top_k": -3}}, 400, "sampling.top_k"),
        (
            "/lab/inside",
            {"ids": [1, 2], "position": 1, "sampling": {"repetition_penalty": 0}},
            400,
            "sampling.repetition_penalty",
        ),
        (
            "/lab/inside",
            {"ids": [1, 2], "position": 1, "sampling": {"presence_penalty": 3}},
            400,
            "sampling.presence_penalty",
        ),
        ("/lab/inside", {"ids": "1,2", "position": 1}, 400, "ids"),
        ("/lab/attention", {"ids": [1] * 513}, 400, "ids"),
        ("/lab/attention", {"ids": [1, 2], "layer": 2}, 400, "layer"),
        ("/lab/intervene", {"ids": [1, 2], "ablate": [[0, 4]]}, 400, "ablate[0]"),
        ("/lab/intervene", {"ids": [1, 2], "skip_layers": [5]}, 400, "skip_layers[0]"),
        ("/lab/intervene", {"ids": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
        ("/lab/intervene", {"ids": [1] * (CONTEXT - 10), "max_tokens": 20}, 400, "max_tokens"),
        (
            "/lab/intervene",
            {"ids": [1, 2], "steer": {"positive": "", "negative": "b", "layer": 0}},
            400,
            "steer.positive",
        ),
        (
            "/lab/intervene",
            {"ids": [1, 2], "steer": {"positive": "a", "negative": "b", "layer": 9}},
            400,
            "steer.layer",
        ),
        ("/lab/prompt", {"text": "x", "mode": "poem"}, 400, "mode"),
        ("/lab/prompt", {"mode": "base"}, 400, "text"),
    ],
)
def test_bad_input_gets_an_error_naming_the_field(server, llama, path, body, status, param):
    r = post(server, path, {"model": llama, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].endswith(".")
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_runs_are_searched_as_plain_text_and_unknown_ones_named(server, llama):
    ids = prompt_ids(server, llama, "<script>x</script> q7")
    body = {"model": llama, "prompt": ids, "max_tokens": 2, "seed": 1, "return_token_ids": True}
    _, _, chunks = stream_tokens(server, body)
    run_id = chunks[-1]["choices"][0]["lmlab"]["run_id"]
    found = get(server, "/lab/runs", params={"q": "<script>x</script> q7", "kind": "generate"}).json()["runs"]
    assert [r["id"] for r in found] == [run_id] and found[0]["summary"].startswith("<script>x</script> q7")
    assert found[0]["playground"] is True and found[0]["model"] == llama
    r = get(server, "/lab/runs/ffffffffffff")
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    r = get(server, "/lab/runs", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_bench_points_of_the_store_become_the_two_plots(server):
    """A bench run as `lmlab bench` writes it (metrics.points, lmlab's engine and a peer) -> the plots' series."""
    from lmlab.runs import RunStore, record_run

    points = [
        {
            "model": "m",
            "engine": "lmlab",
            "dtype": "float32",
            "quant": "none",
            "batch": b,
            "prompt_len": 64,
            "new_tokens": 32,
            "decode_tok_s": 10.0 * b,
            "peak_mem_bytes": 1000 + b,
        }
        for b in (1, 4)
    ] + [
        {
            "model": "m",
            "engine": "hf",
            "batch": 1,
            "prompt_len": 64,
            "new_tokens": 32,
            "decode_tok_s": 3.0,
            "peak_mem_bytes": 5,
        }
    ]
    with RunStore() as store, record_run("bench", model="m", config={}, store=store, wandb=False) as run:
        run.metrics = {"points": points}
    bench = get(server, "/lab/bench", params={"model": "m"}).json()
    mine = [p for p in bench["tps_vs_batch"] if p["run_id"] == run.id]
    assert [(p["batch"], p["tok_s"]) for p in sorted(mine, key=lambda p: p["batch"])] == [(1, 10.0), (4, 40.0)]
    mem = [p for p in bench["mem_vs_seq"] if p["run_id"] == run.id]
    assert {(p["seq_len"], p["peak_bytes"]) for p in mem} == {(96, 1001), (96, 1004)}


def test_with_an_api_key_the_page_is_open_and_the_api_is_not(folders):
    """In this process (the app without its lifespan: no model is loaded): / and /static/* need no key."""
    from fastapi.testclient import TestClient

    from lmlab.serve import create_app

    client = TestClient(create_app({"m": lambda: None}, api_key="k"))
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    assert client.get("/lab/models").status_code == 401
    assert client.post("/lab/inside", json={}).status_code == 401


def test_no_log_text_keeps_prompts_and_outputs_out_of_the_playgrounds_runs(folders, tmp_path):
    """In this process (the app with its lifespan, a private store): --no-log-text holds for these runs too."""
    from fastapi.testclient import TestClient

    import lmlab
    from lmlab.runs import RunStore, record_run
    from lmlab.serve import create_app
    from lmlab.serve.recording import RequestLog

    with RunStore(tmp_path / "runs.db") as store, record_run("serve", store=store, wandb=False) as session:
        log = RequestLog(session, store, log_text=False)
        app = create_app({"m": lambda: lmlab.load(folders["llama"])}, log=log)
        with TestClient(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            body = {"prompt": [40, 41, 42], "max_tokens": 3, "seed": 2, "return_token_ids": True}
            choice = client.post("/v1/completions", json=body, headers=PLAYGROUND).json()["choices"][0]
            iv = client.post(
                "/lab/intervene",
                json={
                    "ids": [40, 41],
                    "max_tokens": 2,
                    "ablate": [[0, 0]],
                    "steer": {"positive": "ab", "negative": "cd", "layer": 1},
                },
            )
            assert iv.status_code == 200, iv.text
            deadline = time.monotonic() + 20
            while client.get(f"/lab/runs/{choice['lmlab']['run_id']}").json()["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            gen = client.get(f"/lab/runs/{choice['lmlab']['run_id']}").json()
            look = client.get(f"/lab/runs/{iv.json()['run_id']}").json()
        log.close()
    assert len(choice["lmlab"]["tokens"]) == 3  # the answer itself is whole
    assert gen["outputs"] == {"finish_reasons": ["length"]} and "prompt_ids" not in gen["inputs"]
    assert "40" not in json.dumps(gen["inputs"]) and "baseline" not in look["outputs"]
    assert look["config"]["steer"]["positive"] is None and "prompt" not in look["inputs"]
    assert look["outputs"]["per_position"] == iv.json()["per_position"]
