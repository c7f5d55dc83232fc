"""Where an evaluation gets its numbers: a model in this process, or an OpenAI-compatible server.

Both offer the same four things: ``score`` (log-likelihood of continuations), ``generate``
(answers to prompts), ``map`` (run a function over items: one after another in process, with
``concurrency`` requests in flight for a server) and ``tokenizer`` (for prompt formats that need
a chat template; None for a server, whose own template the chat endpoint applies).

A server scores a continuation through ``/v1/completions`` with ``echo`` and ``max_tokens: 0``:
it returns the log-probability of every prompt token and its character offset, and the tokens
that start at or after the context's length are the continuation's (lm-evaluation-harness's
``local-completions`` does the same with token ids). A server that does not echo prompt
log-probabilities (llama.cpp's) is named in one sentence; only generated-answer tasks run there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from lmlab.errors import LmlabError
from lmlab.eval.loglik import Scored, encode_pair, score_tokens


def each(backend, fn, items) -> list:
    """[fn(x) for x in items] through the backend's ``map`` (concurrent requests to a server), or in order."""
    mapper = getattr(backend, "map", None)
    return mapper(fn, items) if mapper else [fn(x) for x in items]


class LocalBackend:
    """An LM in this process."""

    def __init__(self, lm, add_special: bool | None = None, share_prefix: bool = True):
        lm._need_tokenizer()
        self.share_prefix = share_prefix  # choices of one item read their context once (see loglik)
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.add_special = bool(getattr(lm.tokenizer, "add_bos", False)) if add_special is None else add_special
        self.name = lm.name

    def score(self, pairs: list[tuple[str, str]], chat: bool = False) -> list[Scored]:
        add = self.add_special and not chat  # a chat template writes its own special tokens
        requests = [encode_pair(self.tokenizer, c, x, add) for c, x in pairs]
        return score_tokens(self.lm, requests, share_prefix=self.share_prefix)

    def map(self, fn, items) -> list:
        """[fn(x) for x in items], one after another (the model is busy with each)."""
        return [fn(x) for x in items]

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        n: int = 1,
        seed: int | None = None,
        chat: bool = False,
    ) -> list[str]:
        ids = self.tokenizer.encode(prompt, add_special=self.add_special and not chat)
        res = self.lm.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, stop=stop, n=n, seed=seed)
        return [r.text for r in res]


class EndpointBackend:
    """A model served over the OpenAI API (lmlab serve, vLLM, llama-server...)."""

    tokenizer = None

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 300.0,
    ):
        import httpx

        if concurrency < 1:
            raise LmlabError(f"--concurrency must be at least 1 (requests in flight), got {concurrency}.")
        self.base = url.rstrip("/")
        for suffix in ("/completions", "/chat/completions"):
            self.base = self.base.removesuffix(suffix)
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        self.concurrency = concurrency
        self.name = model or self._first_model()

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            r = self.http.post(self.base + path, json=body)
        except httpx.HTTPError as e:
            raise LmlabError(
                f"could not reach {self.base}{path} ({e}); check the URL and that the server runs."
            ) from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise LmlabError(f"the server answered {r.status_code} to {path}: {msg}")
        return r.json()

    def _first_model(self) -> str:
        import httpx

        try:
            r = self.http.get(self.base + "/models")
        except httpx.HTTPError as e:
            raise LmlabError(
                f"could not reach {self.base}/models ({e}); check the URL and that the server runs."
            ) from None
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LmlabError(
                f"could not list the models at {self.base}/models; name the model: lmlab eval run MODEL --endpoint URL."
            ) from None

    def map(self, fn, items) -> list:
        """[fn(x) for x in items], with up to ``concurrency`` of them (requests) in flight."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def score(self, pairs: list[tuple[str, str]], chat: bool = False) -> list[Scored]:
        if chat:
            raise LmlabError(
                "scoring choices in the chat format needs the model's chat template; use --format base or "
                "fake-chat with --endpoint, or evaluate the model in process."
            )
        return self.map(self._score_one, pairs)

    def _score_one(self, pair: tuple[str, str]) -> Scored:
        context, continuation = pair
        n_spaces = len(context) - len(context.rstrip())  # as encode_pair: trailing spaces go to the continuation
        cut = len(context) - n_spaces
        body = {
            "model": self.name,
            "prompt": context + continuation,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        }
        choice = self._post("/completions", body)["choices"][0]
        lp = choice.get("logprobs") or {}
        offsets, token_lps, tops = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("top_logprobs")
        if not offsets or not token_lps:
            raise LmlabError(
                f"the server at {self.base} does not return prompt log-probabilities (echo); "
                "multiple-choice and perplexity need them, so only generated-answer tasks can run there."
            )
        idx = [i for i, off in enumerate(offsets) if off >= cut and token_lps[i] is not None]
        if not idx:
            raise LmlabError("the server's tokens put no token in the continuation; check the prompt.")
        chosen = [token_lps[i] for i in idx]
        greedy = all(tops and tops[i] and token_lps[i] >= max(tops[i].values()) for i in idx)
        return Scored(sum(chosen), greedy, chosen, len(idx))

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        n: int = 1,
        seed: int | None = None,
        chat: bool = False,
    ) -> list[str]:
        body = {
            "model": self.name,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "n": n,
            "stop": stop or None,
        }
        if seed is not None:
            body["seed"] = seed
        choices = self._post("/completions", body)["choices"]
        return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]

    def prompt_logprobs(self, text: str) -> tuple[list[str], list[float]]:
        """The tokens of ``text`` as the server splits it and their log-probabilities (the first has none)."""
        lp = (
            self._post(
                "/completions",
                {"model": self.name, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0},
            )["choices"][0].get("logprobs")
            or {}
        )
        if not lp.get("token_logprobs"):
            raise LmlabError(
                f"the server at {self.base} does not return prompt log-probabilities (echo); perplexity needs them."
            )
        return lp["tokens"], lp["token_logprobs"]
