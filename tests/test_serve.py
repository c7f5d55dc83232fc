"""`lmlab serve` against real clients: a real server process on a free port, the bundled SmolLM2.

The official `openai` client and lm-evaluation-harness talk to it as they would to OpenAI or
vLLM; answers are checked against what lmlab computes in this process on the same tokens.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from bundled import smollm2_gguf_path
from serve_helpers import ServeProcess, free_port, metric_value, sse_events

MODEL = "smollm2-135m"
KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 8192  # SmolLM2's context (tokens)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The main server: the bundled model, an API key, 8 places in the batch."""
    smollm2_gguf_path()  # skip when the bundled model is not installed
    s = ServeProcess(["-m", MODEL, "--api-key", KEY, "--max-batch", "8"], tmp_path_factory.mktemp("serve"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def lm():
    """The same model in this process, for reference values."""
    import lmlab

    smollm2_gguf_path()
    return lmlab.load(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def log_probs(lm, ids: list[int]) -> torch.Tensor:
    """(T, V) float64 log-probabilities of the next token after each position, in this process."""
    return torch.log_softmax(lm(ids)[0].double(), dim=-1)


# ----------------------------------------------------------------------------- the openai client


def test_binds_loopback_by_default_and_lists_its_model(server, client):
    import psutil

    assert server.url.startswith("http://127.0.0.1:")
    proc = psutil.Process(server.proc.pid)
    conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
    listening = [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening == ["127.0.0.1"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_serve_quant_native_runs_the_files_own_blocks(tmp_path):
    from lmlab.runs import RunStore

    s = ServeProcess(["-m", MODEL, "--quant", "native", "--max-batch", "2"], tmp_path)
    try:
        s.wait_ready()
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith(" Paris") and r.json()["usage"]["completion_tokens"] == 4
        assert f"loading {MODEL} (float32, quant native, cpu)" in s.stderr()
        run_id = s.run()["id"]
    finally:
        s.stop()
    with RunStore() as store:
        assert store.get(run_id)["config"]["quant"] == "native"


def test_completions_streamed_equal_non_streamed_for_the_same_seed(client, lm):
    prompt = "Once upon a time, in a small village,"
    kw = dict(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True, "top_k": 50},
    )
    r = client.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and token_lp <= max(top.values())

    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]

    two = client.completions.create(**{**kw, "n": 2})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 24


def test_chat_with_logprobs_streamed_equal_non_streamed(client):
    kw = dict(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        max_tokens=10,
        temperature=0.8,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 10
    content = choice.logprobs.content
    assert len(content) == 10 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob <= e.top_logprobs[0].logprob for e in content)
    assert (
        bytes(b for e in content for b in e.bytes)
        .decode("utf-8", errors="ignore")
        .startswith(choice.message.content.rstrip("\ufffd"))
    )

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_echo_logprobs_equal_in_process_log_probabilities(client, server, lm):
    tok = lm.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog, and then it runs into the forest to find")
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=0, logprobs=5)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == tok.decode(ids) and lp.tokens == [tok.token_str(i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None

    logp = log_probs(lm, ids)
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(lp.token_logprobs[1:], dtype=torch.float64)
    assert (got - expected).abs().max().item() <= 1e-4
    best = logp[:-1].topk(2, dim=-1)
    flags_checked = 0
    for t in range(1, len(ids)):
        top = lp.top_logprobs[t]
        assert len(top) <= 5 and abs(max(top.values()) - best.values[t - 1, 0].item()) <= 1e-4
        if best.values[t - 1, 0] - best.values[t - 1, 1] > 1e-3:  # a clear argmax: rounding cannot flip it
            server_greedy = lp.token_logprobs[t] == max(top.values())  # lm-eval's test
            assert server_greedy == (best.indices[t - 1, 0].item() == ids[t]), t
            flags_checked += 1
    assert flags_checked >= len(ids) - 3

    # lm-eval's request: token ids, echo, one new token, one alternative
    body = {"model": MODEL, "prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0, "seed": 1}
    lp1 = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert len(lp1["tokens"]) == len(ids) + 1
    assert max(abs(a - b) for a, b in zip(lp1["token_logprobs"][1:-1], lp.token_logprobs[1:])) <= 1e-5
    last = logp[-1].topk(2)
    if last.values[0] - last.values[1] > 1e-3:
        assert lp1["tokens"][-1] == tok.token_str(last.indices[0].item())


# ----------------------------------------------------------------------------- lm-evaluation-harness

LM_EVAL_ITEMS = [
    {"question": "The capital of France is", "choices": ["Paris", "a banana", "seven"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "purple", "the ocean"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["green", "cold", "Tuesday"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "north"], "answer": 0},
    {"question": "A baby cat is called a", "choices": ["kitten", "puppy", "calf"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["west", "east", "north"], "answer": 1},
    {"question": "Bees make", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "The largest planet in the solar system is", "choices": ["Mars", "Jupiter", "the Moon"], "answer": 1},
]


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """How lm-eval splits a (context, continuation) into token ids: trailing spaces move to the continuation,
    the whole is encoded and the context's ids cut off (no special tokens, as its remote tokenizer asks)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special=False)
    ctx = tok.encode(context, add_special=False)
    return ctx, whole[len(ctx) :]


def test_lm_eval_multiple_choice_accuracy_equals_in_process(server, lm, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in LM_EVAL_ITEMS))
    (tmp_path / "lmlab_serve_mc.yaml").write_text(
        "task: lmlab_serve_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's local-completions sends it as the Bearer key
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": server.url + "/v1/completions",
            "tokenized_requests": True,
            "tokenizer_backend": "remote",
            "auth_token": KEY,
            "num_concurrent": 1,
        },
        tasks=["lmlab_serve_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    served_acc = out["results"]["lmlab_serve_mc"]["acc,none"]

    tok, correct = lm.tokenizer, 0
    served = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["lmlab_serve_mc"]}
    for i, item in enumerate(LM_EVAL_ITEMS):
        scores = []
        for choice in item["choices"]:
            ctx, cont = _encode_pair(tok, item["question"], " " + choice)  # lm-eval's target delimiter is " "
            logp = log_probs(lm, ctx + cont)
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        ranked = sorted(scores, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3, f"item {i} is too close to call; pick clearer choices"
        assert served[i] == pytest.approx(scores, abs=1e-3)
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    assert served_acc == correct / len(LM_EVAL_ITEMS)


# ----------------------------------------------------------------------------- concurrency

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "My favourite food is",
    "In 1969, the first",
    "The best way to learn is",
    "Once upon a time",
    "import numpy as np\n",
    "The weather today is",
]


def _greedy(client, prompt: str, stream: bool) -> tuple[list[str], list[dict]]:
    kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    if not stream:
        lp = client.completions.create(**kw).choices[0].logprobs
        return lp.tokens, lp.top_logprobs
    tokens, tops = [], []
    for chunk in client.completions.create(**kw, stream=True):
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            tops += chunk.choices[0].logprobs.top_logprobs
    return tokens, tops


def _assert_same_greedy(alone: tuple, together: tuple, prompt: str) -> None:
    """Equal tokens; where they part, the single request's top two must have been a near tie (a rounding
    difference between batch sizes may flip that, nothing else may)."""
    for i, (a, b) in enumerate(zip(alone[0], together[0])):
        if a != b:
            best = sorted(alone[1][i].values(), reverse=True)
            assert len(best) == 2 and best[0] - best[1] < 1e-3, f"{prompt!r}: token {i} differs: {a!r} vs {b!r}"
            return
    assert len(alone[0]) == len(together[0]) == 10


def test_eight_concurrent_clients_each_get_their_single_request_output(server, client):
    alone = [_greedy(client, p, stream=False) for p in PROMPTS]
    steps_before = metric_value(httpx.get(server.url + "/metrics").text, "lmlab_engine_steps_total")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda ip: _greedy(client, ip[1], stream=ip[0] % 2 == 0), enumerate(PROMPTS)))
    steps = metric_value(httpx.get(server.url + "/metrics").text, "lmlab_engine_steps_total") - steps_before
    for p, a, b in zip(PROMPTS, alone, together):
        _assert_same_greedy(a, b, p)
    # one at a time, 8 requests of 10 tokens take 8 x 9 decoding steps; batched together, far fewer
    assert steps < 0.75 * 8 * 9


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One place in the batch and one in the queue: easy to fill."""
    smollm2_gguf_path()
    s = ServeProcess(
        ["-m", MODEL, "--max-batch", "1", "--max-queue", "1", "--no-record"], tmp_path_factory.mktemp("small-home")
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


LONG = {
    "model": MODEL,
    "prompt": "Count: one, two,",
    "max_tokens": 4000,
    "temperature": 0,
    "stream": True,
    "ignore_eos": True,
}


def _wait_metric(url: str, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if metric_value(text, name) == value:
            return
        assert time.monotonic() < deadline, f"{name} did not become {value}:\n{text}"
        time.sleep(0.05)


def _served_at_once(url: str) -> None:
    """A short request is answered while the cancelled long one would still hold the only place."""
    start = time.monotonic()
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=short, timeout=60)
    elapsed = time.monotonic() - start
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert elapsed < 20, f"the next request waited {elapsed:.1f} s: the cancelled one kept the only place"
    _wait_metric(url, "lmlab_num_requests_running", 0)


def test_client_that_disconnects_frees_its_place(small_server):
    url = small_server.url
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=LONG) as resp:
            lines = resp.iter_lines()
            got = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
            assert len(got) == 3
        # leaving the block closes the connection after 3 of 4000 tokens
    _served_at_once(url)

    with pytest.raises(httpx.TimeoutException):  # not streamed: the client gives up after a second
        httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=1)
    _served_at_once(url)


def test_full_queue_answers_429_with_retry_after(small_server):
    url = small_server.url
    queued: list[httpx.Response] = []
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    waiter = threading.Thread(
        target=lambda: queued.append(httpx.post(url + "/v1/completions", json=short, timeout=120))
    )
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=LONG) as resp:  # takes the only place
            lines = resp.iter_lines()  # kept: dropping the iterator would close the connection
            next(line for line in lines if line.startswith("data: "))
            waiter.start()  # takes the only place in the queue
            _wait_metric(url, "lmlab_num_requests_waiting", 1)
            r = httpx.post(url + "/v1/completions", json=short, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "queue_full"
    waiter.join(60)
    assert queued and queued[0].status_code == 200  # served once the stream's client left


# ----------------------------------------------------------------------------- bad input

BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),  # OpenAI refuses it too
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": [49152]}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
        400,
        "messages[1].role",
    ),
    ("/v1/completions", {"temperature": 0}, 400, "prompt"),
    ("/v1/completions", {"prompt": [100] * (CONTEXT + 1)}, 400, "prompt"),
    ("/v1/completions", {"prompt": [100] * (CONTEXT - 2), "max_tokens": 16}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/completions", {"model": "gpt2", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": "/etc/passwd", "prompt": "hi"}, 404, "model"),  # requests never name files
    ("/v1/chat/completions", {"model": "./model.gguf", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize(
    "path,body,status,param",
    BAD_REQUESTS,
    ids=[f"{p.split('/')[-1]}-{param}-{i}" for i, (p, _, _, param) in enumerate(BAD_REQUESTS)],
)
def test_bad_input_gets_openai_error_json_naming_the_field(server, path, body, status, param):
    r = post(server, path, {"model": MODEL, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]
    if "prompt" in body and isinstance(body["prompt"], list) and len(body["prompt"]) > 100:
        assert str(len(body["prompt"])) in err["message"] and str(CONTEXT) in err["message"]  # both lengths


def test_a_developer_message_is_a_system_message(server):
    ask = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    answers = [
        post(
            server,
            "/v1/chat/completions",
            {**ask, "messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}]},
        ).json()
        for role in ("developer", "system")
    ]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    assert answers[0]["usage"] == answers[1]["usage"]


def test_keys_bodies_and_json_errors(server):
    import openai

    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(server, "/v1/completions", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()

    big = json.dumps({"model": MODEL, "prompt": "a" * (9 * 2**20)}).encode()
    r = httpx.post(
        server.url + "/v1/completions", content=big, headers={**AUTH, "Content-Type": "application/json"}, timeout=120
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    r = httpx.post(
        server.url + "/v1/completions",
        content=b"{not json",
        timeout=60,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- tokenizer and metrics


def test_tokenize_detokenize_and_tokenizer_info_use_vllm_names(server, lm):
    tok = lm.tokenizer
    text = "Hello world, héllo wörld!"
    r = post(server, "/tokenize", {"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert r["token_strs"] == [tok.id_to_token(i) for i in tok.encode(text, add_special=False)]
    messages = [{"role": "user", "content": "hi"}]
    r = post(server, "/tokenize", {"messages": messages}).json()
    assert r["tokens"] == tok.encode(tok.apply_chat_template(messages), add_special=False)
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == tok.decode(r["tokens"])
    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == CONTEXT
    assert info["chat_template"] == tok.chat_template


def test_metrics_in_prometheus_text(server):
    post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi"}, headers={})  # a 401
    r = httpx.get(server.url + "/metrics")  # open without the key, like /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric_value(text, "lmlab_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric_value(text, "lmlab_requests_total", endpoint="/v1/completions", status="401") >= 1
    assert metric_value(text, "lmlab_generation_tokens_total", model=MODEL) >= 3
    assert metric_value(text, "lmlab_prompt_tokens_total", model=MODEL) >= 1
    assert metric_value(text, "lmlab_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert metric_value(text, "lmlab_time_per_output_token_seconds_count", model=MODEL) >= 2
    assert metric_value(text, "lmlab_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") >= 1
    assert metric_value(text, "lmlab_max_batch", model=MODEL) == 8
    for name in ("lmlab_num_requests_running", "lmlab_num_requests_waiting", "lmlab_batch_occupancy"):
        assert 0 <= metric_value(text, name, model=MODEL)


# ----------------------------------------------------------------------------- binding, shutdown, recording


def test_non_loopback_host_without_api_key_warns(tmp_path):
    smollm2_gguf_path()
    s = ServeProcess(["-m", MODEL, "--host", "0.0.0.0", "--no-record"], tmp_path)
    try:
        s.wait_for(r"warning: --host 0\.0\.0\.0 .*--api-key", timeout=60)
    finally:
        s.stop()


def test_ctrl_c_while_the_models_load_stops_cleanly(tmp_path):
    """Two models, so the load lasts: Ctrl-C (SIGINT) while /health says loading. The server
    stops at once, exit 0, its run recorded, and no C++ abort from the loader thread torch is
    still running in."""
    from lmlab.runs import RunStore

    smollm2_gguf_path()
    port = free_port()
    s = ServeProcess(["-m", MODEL, "-m", "gemma3-270m"], tmp_path, port=port)
    seen = None
    while seen is None and s.proc.poll() is None:
        try:
            seen = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"]
        except httpx.TransportError:
            time.sleep(0.02)
    assert seen == "loading", s.stderr()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=60) == 0, s.stderr()
    err = s.stderr()
    assert "stopped" in err and "terminate called" not in err and "Traceback" not in err, err
    with RunStore() as store:
        assert [r for r in store.list(limit=None, command="serve") if r["pid"] == s.proc.pid]


def test_health_503_while_loading_and_sigterm_drains_running_streams(tmp_path, capsys):
    from lmlab.cli.main import main
    from lmlab.runs import RunStore

    smollm2_gguf_path()
    port = free_port()
    s = ServeProcess(["-m", MODEL], tmp_path, port=port)
    try:
        health = []  # (status code, status) from /health until it says ok
        deadline = time.monotonic() + 180  # a load slowed by other work on the machine still fits
        while not health or health[-1][0] != 200:
            assert s.proc.poll() is None and time.monotonic() < deadline, s.stderr()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                health.append((r.status_code, r.json()["status"]))
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(0.02)
        assert (503, "loading") in health and health[-1] == (200, "ok")
        url = s.wait_ready()
        first = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0},
            timeout=60,
        )
        assert first.status_code == 200
        body = {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            events = sse_events([next(line for line in lines if line.startswith("data: "))])
            s.proc.send_signal(signal.SIGTERM)  # mid-stream
            events += sse_events(lines)
        assert s.proc.wait(90) == 0
    finally:
        s.stop()
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    assert [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0]["finish_reason"]] == ["length"]
    streamed = "".join(e["choices"][0]["text"] for e in events[:-2])
    err = s.stderr()
    assert "stopping: 1 running request finish first" in err and "stopped after 2 requests" in err

    run = s.run()
    with RunStore() as store:
        rows = store.requests(run["id"])
    assert run["command"] == "serve" and run["status"] == "complete" and run["metrics"]["requests"] == 2
    assert [r["seq"] for r in rows] == [1, 2] and [r["status"] for r in rows] == [200, 200]
    assert rows[0]["prompt"] == "Hello" and rows[0]["output"] == [first.json()["choices"][0]["text"]]
    assert rows[1]["stream"] is True and rows[1]["output"] == [streamed] and rows[1]["finish_reasons"] == ["length"]
    assert rows[1]["completion_tokens"] == 40 and rows[1]["params"]["max_tokens"] == 40
    assert rows[1]["timings"]["ttft_ms"] > 0

    assert main(["runs", "show", run["id"]]) == 0
    assert re.search(r"requests\s+2\b", capsys.readouterr().out)


def test_no_log_text_keeps_prompts_and_outputs_out_of_the_store(home):
    from lmlab.cli.serve import redacted_argv
    from lmlab.runs import RunStore, record_run
    from lmlab.serve.recording import RequestLog

    store = RunStore()
    argv = redacted_argv(["lmlab", "serve", "--api-key", "s3cr3t-key"])
    with record_run("serve", model="m", store=store, argv=argv) as run:
        log = RequestLog(run, store, log_text=False)
        log.start()
        for i in range(300):  # more than one batch
            log.add(
                {
                    "request_id": f"cmpl-{i}",
                    "created": time.time(),
                    "endpoint": "/v1/completions",
                    "model": "m",
                    "status": 200,
                    "stream": False,
                    "prompt_tokens": 5,
                    "completion_tokens": 2,
                    "prompt": "a secret prompt",
                    "output": ["a secret answer"],
                    "params": {"temperature": 0},
                }
            )
        log.close()
    rows = store.requests(run.id)
    got = store.get(run.id)
    store.close()
    assert len(rows) == 300 and [r["seq"] for r in rows] == list(range(1, 301))
    assert all(r["prompt"] is None and r["output"] is None for r in rows) and rows[0]["params"] == {"temperature": 0}
    assert got["metrics"] == {"requests": 300, "errors": 0, "prompt_tokens": 1500, "completion_tokens": 600}
    assert got["argv"] == ["lmlab", "serve", "--api-key", "***"]
    stored = b"".join(p.read_bytes() for p in home.glob("runs.db*"))
    assert b"secret" not in stored and b"s3cr3t-key" not in stored


def test_lmlab_eval_through_the_server_gives_the_in_process_numbers(server, lm):
    """lmlab eval --endpoint: log-likelihoods from echoed prompt logprobs, split at the context's
    character offset, equal the in-process scores of the same model (fp32, within 1e-4)."""
    from lmlab.eval import evaluate, get_task
    from lmlab.eval.backends import EndpointBackend

    task = get_task("facts")
    remote = evaluate(EndpointBackend(server.url, MODEL, KEY, concurrency=4), task, shots=1, limit=6)
    local = evaluate(lm, task, shots=1, limit=6)
    assert remote.metrics["acc"] == local.metrics["acc"] and remote.metrics["acc_norm"] == local.metrics["acc_norm"]
    for r, loc in zip(remote.items, local.items):
        assert r["loglikelihoods"] == pytest.approx(loc["loglikelihoods"], abs=1e-4)
    gen = evaluate(EndpointBackend(server.url + "/v1", MODEL, KEY), get_task("pattern", n=4), shots=2, limit=2)
    assert gen.metrics["n"] == 2 and all(row["output"] is not None for row in gen.items)


def test_the_load_generator_times_every_token_at_each_concurrency(server):
    from lmlab.bench.load import load_test

    rows = load_test(server.url, MODEL, [1, 3], requests=1, max_tokens=5, api_key=KEY)
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] == 5 * r["concurrency"]  # ignore_eos: every token arrives
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and r["aggregate_tok_s"] > 0 and r["itl_p50_ms"] > 0
    bad = load_test(server.url, MODEL, [1], requests=1, max_tokens=5)  # no key: every request fails, and says why
    assert bad[0]["errors"] == 1 and "401" in bad[0]["first_error"]


def test_lmlab_bench_serve_load_tests_a_running_server(server, capsys):
    from lmlab.cli.main import main

    args = [
        "bench",
        "--serve",
        server.url,
        "--concurrency",
        "1,2",
        "--new-tokens",
        "3",
        "--api-key",
        KEY,
        "--json",
        "--no-record",
    ]
    assert main(args) == 0
    levels = json.loads(capsys.readouterr().out)["levels"]
    assert [r["concurrency"] for r in levels] == [1, 2] and all(r["errors"] == 0 for r in levels)
    assert [r["tokens"] for r in levels] == [6, 12]  # 2 requests per client, 3 tokens each


def test_bench_serve_peer_needs_llama_cpp_python_and_a_gguf_model(server, capsys, monkeypatch):
    """--peer llamacpp-server is checked before any load: a Python without llama_cpp.server, a model that is
    not a GGUF file, another peer with --serve: one sentence each, exit 2."""
    from lmlab.cli.main import main

    base = ["bench", "--serve", server.url, "--concurrency", "1", "--new-tokens", "3", "--no-record"]
    monkeypatch.setenv("LMLAB_LLAMACPP_PYTHON", sys.executable)  # this venv has no llama-cpp-python server
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        assert main([*base, "--peer", "llamacpp-server"]) == 2
        assert "pip install 'llama-cpp-python[server]'" in capsys.readouterr().err
    assert main([*base, "--peer", "hf"]) == 2
    assert "the only peer is llamacpp-server" in capsys.readouterr().err
