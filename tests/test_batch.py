"""lmlab.engine.batch: continuous batching gives each request what it gets alone.

Greedy comparisons between a batch and a request alone use the margin check of tiny.py: the
native step computes each row the same way in any batch, within float32 rounding (FP32_TIE).
"""

import threading
import time

import pytest
import torch

import lmlab
from lmlab.engine.batch import BatchEngine, BatchRequest, PromptLogprobs, QueueFull, RequestEnd
from lmlab.engine.generate import TokenEvent
from lmlab.engine.sampling import SamplingParams
from lmlab.errors import LmlabError
from tiny import FP32_TIE, VOCAB, assert_same_greedy, make_tiny, near_ties


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, d)  # gemma3: sliding-window layers, so slot shifts must keep windows right
    return lmlab.load(d)


def prompt(n, seed):
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Collector:
    """Events of one request, and a flag set at its end."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, RequestEnd):
            self.done.set()

    @property
    def ids(self):
        return [e.id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def end(self) -> RequestEnd:
        return self.events[-1]


def greedy(n):
    return BatchRequest(prompt_ids=[], max_new_tokens=n, params=SamplingParams(temperature=0), ignore_eos=True)


def run_all(engine, requests):
    """Queue every request, then start the engine: the first max_batch are admitted one after
    another (each longer prompt shifts the rows already placed), the rest join the running batch
    as rows finish."""
    got = []
    for req in requests:
        c = Collector()
        engine.submit(req, c)
        got.append(c)
    engine.start()
    for c in got:
        assert c.done.wait(60)
    return got


def test_requests_joining_a_running_batch_get_what_they_get_alone(lm):
    engine = BatchEngine(lm, max_batch=4)
    try:
        # lengths chosen so that later prompts are longer than the batch's write slot: the rows shift
        lengths = [3, 20, 7, 40, 2, 11]
        reqs = []
        for i, n in enumerate(lengths):
            r = greedy(12 + i)
            r.prompt_ids = prompt(n, i)
            reqs.append(r)
        got = run_all(engine, reqs)
        for r, c in zip(reqs, got):
            alone = lm.generate(
                r.prompt_ids, max_new_tokens=r.max_new_tokens, temperature=0, ignore_eos=True, alternatives=2
            )
            assert c.end.finish_reason == "length" and c.end.completion_tokens == r.max_new_tokens
            assert_same_greedy(alone.token_ids, c.ids, near_ties(alone.alternatives, FP32_TIE), "batch vs alone")
            logprobs = [e.logprob for e in c.events if isinstance(e, TokenEvent)]
            assert logprobs == pytest.approx(alone.logprobs[: len(logprobs)], abs=1e-4)
        assert engine.stats()["active"] == 0
    finally:
        engine.stop()


def test_a_seeded_sampled_request_equals_generate_with_that_seed(lm):
    engine = BatchEngine(lm, max_batch=4)
    try:
        reqs = [
            BatchRequest(
                prompt_ids=prompt(5 + i, 10 + i),
                max_new_tokens=10,
                ignore_eos=True,
                params=SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i),
            )
            for i in range(3)
        ]
        got = run_all(engine, reqs)
        for r, c in zip(reqs, got):
            alone = lm.generate(
                r.prompt_ids, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=r.params.seed, ignore_eos=True
            )
            assert c.ids == alone.token_ids
    finally:
        engine.stop()


def test_prompt_logprobs_are_the_models_log_probabilities(lm):
    engine = BatchEngine(lm)
    try:
        ids = prompt(9, 3)
        c = run_all(engine, [BatchRequest(prompt_ids=ids, max_new_tokens=0, prompt_logprobs=3)])[0]
        scored = c.events[0]
        assert isinstance(scored, PromptLogprobs) and c.end.finish_reason == "length" and c.end.completion_tokens == 0
        logp = torch.log_softmax(lm([ids])[0].float(), -1)
        want = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert scored.logprobs[0] is None and scored.top[0] == []
        assert scored.logprobs[1:] == pytest.approx(want, abs=1e-5)
        for t in range(1, len(ids)):
            top_ids = [i for i, _ in scored.top[t]]
            assert top_ids[0] == int(logp[t - 1].argmax()) and len(top_ids) == 3
            assert scored.top[t][0][1] == pytest.approx(logp[t - 1].max().item(), abs=1e-5)
    finally:
        engine.stop()


def test_cancel_frees_the_slot_and_bad_requests_are_refused(lm):
    # room for a request far longer than the test: only the cancel can end it
    roomy = lmlab.load(lm.resolved.path, overrides={"max_seq_len": 1 << 20})
    engine = BatchEngine(roomy, max_batch=1, max_queue=1)
    engine.start()
    try:
        long = greedy(1 << 19)
        long.prompt_ids = prompt(4, 0)
        first = Collector()
        h = engine.submit(long, first)
        while not first.events:
            time.sleep(0.001)
        waiting = Collector()
        quick = greedy(3)
        quick.prompt_ids = prompt(4, 1)
        engine.submit(quick, waiting)  # waits: the only row is busy
        with pytest.raises(QueueFull):
            engine.submit(quick, Collector())
        h.cancel()
        assert first.done.wait(30) and first.end.finish_reason == "cancelled"
        assert waiting.done.wait(30) and waiting.end.finish_reason == "length"
        with pytest.raises(LmlabError, match=f"context is {1 << 20}"):
            too_long = greedy(1 << 20)
            too_long.prompt_ids = prompt(4, 2)
            engine.submit(too_long, Collector())
        with pytest.raises(LmlabError, match="empty"):
            engine.submit(greedy(3), Collector())
    finally:
        engine.stop()
