"""The playground in a real browser: `lmlab serve` as a process, Debian's chromium driven by Playwright.

One server (the bundled SmolLM2) and one browser for the module; each test opens the page in a
fresh browser context, as a user would, and checks what the page shows. With
LMLAB_SCREENSHOTS=DIR the tests save screenshots of the main views to DIR (README's pictures:
LMLAB_SCREENSHOTS=docs/playground).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from bundled import smollm2_gguf_path
from serve_helpers import ServeProcess, free_port

MODEL = "smollm2-135m"
N_LAYERS, N_HEADS = 30, 9  # SmolLM2-135M
PROMPT = "The capital of France is"
TIMEOUT_MS = 90_000  # generous: the machine running the tests may be busy
SHOTS = os.environ.get("LMLAB_SCREENSHOTS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    smollm2_gguf_path()  # skip when the bundled model is not installed
    s = ServeProcess(["-m", MODEL, "--max-batch", "4"], tmp_path_factory.mktemp("playground"), port=free_port())
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `make browser` (it installs Debian's chromium with apt-get).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """One browser tab on the playground, with what a test does to it."""

    def __init__(self, browser, url: str):
        # bypass_csp: Playwright's waits evaluate strings, which the page's policy forbids (no eval);
        # the <script> test then checks the page itself never inserts HTML, with no policy to help.
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000}, bypass_csp=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(dialog):
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        self.page.on("dialog", on_dialog)
        self.open(url)

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_function("window.lmlab && window.lmlab.ready")

    def settle(self) -> None:
        """Wait until no generation runs and the URL's own generation (if any) has been made."""
        self.page.wait_for_function("!window.lmlab.busy")

    def set(self, **values) -> None:
        for name, value in values.items():
            self.page.fill(f"#{name}", str(value))

    def generate(self, button: str = "#generate") -> None:
        n = self.page.evaluate("window.lmlab.generations")
        self.page.click(button)
        self.page.wait_for_function(f"window.lmlab.generations > {n} && !window.lmlab.busy")

    def tokens(self) -> list[tuple[int, str]]:
        return [
            tuple(t)
            for t in self.page.eval_on_selector_all(
                "#output .tok", "els => els.map(e => [Number(e.dataset.id), e.textContent])"
            )
        ]

    def view(self, name: str) -> None:
        self.page.click(f"#tabs button[data-view={name}]")

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"the page raised: {self.errors}"


@pytest.fixture
def tab(browser, server):
    pages = []

    def new(url: str | None = None) -> Page:
        pages.append(Page(browser, url or server.url + "/"))
        return pages[-1]

    yield new
    for p in pages:
        p.close()


def seeded(page: Page, temperature: float, max_tokens: int = 10, prompt: str = PROMPT) -> None:
    page.set(prompt=prompt, seed=7, temperature=temperature, max_tokens=max_tokens)
    page.page.check("#ignore_eos")  # so no run stops early and two runs compare token for token


# ----------------------------------------------------------------------------------------- tests


def test_tokens_stream_in_and_the_same_seed_gives_the_same_output(tab):
    page = tab()
    seeded(page, 0.8)
    # Count the token spans each time the output changes while the answer streams in.
    page.page.evaluate(
        """() => { window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.querySelectorAll('#output .tok').length))
          .observe(document.getElementById('output'), {childList: true}); }"""
    )
    page.generate()
    first = page.tokens()
    assert len(first) == 10
    seen = page.page.evaluate("window.__seen")
    assert len({n for n in seen if 0 < n < 10}) >= 2, f"the tokens did not arrive one by one: {seen}"
    stats = page.page.evaluate("window.lmlab.stats")
    assert stats["tokens"] == 10 and stats["ttft_ms"] > 0 and stats["decode_tok_s"] > 0
    # every token is coloured by a probability in (0, 1]
    probs = page.page.eval_on_selector_all("#output .tok", "els => els.map(e => Number(e.dataset.prob))")
    assert all(0 < p <= 1 for p in probs)

    page.set(temperature=1.6)
    page.generate()
    hotter = page.tokens()
    assert hotter != first, "a different temperature with the same seed gave the same tokens"

    page.set(temperature=0.8)
    page.generate()
    assert page.tokens() == first, "the same seed and settings did not give the same tokens again"
    page.set(temperature=1.6)  # Regenerate repeats the output's own settings, not the changed box
    page.generate("#regenerate")
    assert page.tokens() == first


def test_hover_shows_alternatives_click_branches_and_the_url_reopens_the_view(tab):
    page = tab()
    seeded(page, 1.0, max_tokens=8)
    page.generate()
    original = page.tokens()
    page.page.hover("#output .tok[data-index='2']")
    alts = page.page.eval_on_selector_all(
        "#alt-list .alt", "els => els.map(e => [Number(e.dataset.id), e.classList.contains('chosen')])"
    )
    assert len(alts) >= 2 and [a for a, chosen in alts if chosen] == [original[2][0]]
    other = next(a for a, chosen in alts if not chosen)
    n = page.page.evaluate("window.lmlab.generations")
    page.page.click(f"#alt-list .alt[data-id='{other}']")
    page.page.wait_for_function(f"window.lmlab.generations > {n} && !window.lmlab.busy")
    branched = page.tokens()
    assert branched[:2] == original[:2], "the branch does not keep the tokens before it"
    assert branched[2][0] == other and len(branched) > 3, "the branch did not continue from the alternative"
    assert page.page.locator("#branch-list li").count() == 2
    page.page.hover("#output .tok[data-index='5']")
    page.shot("output")
    # the tree: switch back to the original and forth again
    page.page.click("#branch-list button[data-node='0']")
    assert page.tokens() == original
    page.page.click("#branch-list button[data-node='1']")
    assert page.tokens() == branched

    # Step one token: one more token from where the output is.
    page.generate("#step")
    assert page.tokens()[: len(branched)] == branched and len(page.tokens()) == len(branched) + 1
    page.page.click("#branch-list button[data-node='1']")

    # Click a token of the branch: the inside view opens. The URL now names all of it.
    page.page.click("#output .tok[data-index='4']")
    page.page.wait_for_selector("#chain-sampled")
    url = page.page.url
    q = parse_qs(urlparse(url).query)
    assert q["sel"] == ["4"] and q["br"] == [f"2.{other}"] and q["seed"] == ["7"]

    shared = tab(url)
    shared.settle()
    shared.page.wait_for_selector("#chain-sampled")
    assert shared.tokens()[: len(branched)] == branched, "the shared URL did not reopen the same branch"
    assert shared.page.text_content("#inside-token") == page.page.text_content("#inside-token")
    assert shared.page.locator("#output .tok.selected").get_attribute("data-index") == "4"


def test_clicking_a_token_shows_its_lens_column_and_sampling_chain(tab):
    page = tab()
    seeded(page, 0.9)
    page.set(top_k=40, top_p=0.9)
    page.generate()
    token = page.page.locator("#output .tok[data-index='3']")
    token.click()
    page.page.wait_for_selector("#chain-sampled")
    # the lens column: one row per layer (the last one is the model's output)
    assert page.page.locator("#lens tr").count() == 1 + N_LAYERS
    # the chain, stage by stage, and what each cut
    stages = page.page.eval_on_selector_all(
        "#chain tr[data-stage]", "els => els.map(e => [e.dataset.stage, Number(e.children[1].textContent)])"
    )
    assert [s for s, _ in stages] == ["logits", "penalties", "temperature", "top_k", "top_p", "min_p"]
    kept = dict(stages)
    assert kept["top_k"] == 40 and 1 <= kept["top_p"] <= 40 and kept["logits"] > 40_000
    # the chain's sampled token is the token shown
    sampled = page.page.locator("#chain-sampled")
    assert sampled.get_attribute("data-id") == token.get_attribute("data-id")
    assert page.page.text_content("#inside-token") != ""
    # the attention row of that position per layer and head is drawn
    assert nonblank(page, "#inside-attn") > 100
    # what looking costs
    assert "Looking costs" in page.page.text_content("#inside-cost")
    # the browser's chain on the same settings keeps the same tokens as the server's, and gives
    # the sampled token the same probability (float32 on the server: 1e-4)
    assert f"top_k: 40 → top_p: {kept['top_p']}" in page.page.text_content("#rs-chain")
    mine = page.page.evaluate(
        "() => window.lmlab.resampled.final.find(c => c.id === window.lmlab.inside.chain.sampled.id).prob"
    )
    theirs = page.page.evaluate("window.lmlab.inside.chain.sampled.prob")
    assert mine == pytest.approx(theirs, abs=1e-4)
    # re-sampling in the browser: temperature 0 draws the most likely candidate
    page.page.fill("#rs-temperature", "0")
    best = page.page.evaluate(
        "() => { const rows = [...document.querySelectorAll('#chain tr[data-stage=logits] .chip')];"
        " return rows[0].dataset.id; }"
    )
    assert page.page.locator("#rs-drawn").get_attribute("data-id") == best
    page.page.fill("#rs-top_k", "1")
    page.page.fill("#rs-temperature", "1")
    assert page.page.locator("#rs-drawn").get_attribute("data-id") == best
    assert "top_k: 1" in page.page.text_content("#rs-chain")
    page.shot("inside")


def nonblank(page: Page, selector: str) -> int:
    """Pixels of a canvas that are neither white nor the grey of masked cells."""
    return page.page.evaluate(
        """sel => { const c = document.querySelector(sel);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) {
          const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
          if (!(r === g && g === b && (r === 255 || r === 235))) n++; }
        return n; }""",
        selector,
    )


def test_attention_heatmap_draws_and_its_rows_are_causal_distributions(tab, server):
    page = tab()
    page.set(prompt="The cat sat on the mat because the cat was tired")
    page.page.wait_for_function("document.getElementById('token-count').textContent.includes('token')")
    page.view("attention")
    page.page.wait_for_function("document.getElementById('attn-notes').textContent.includes('tokens;')")
    assert nonblank(page, "#attn-heatmap") > 2000
    assert page.page.locator("#attn-grid canvas").count() == N_HEADS
    notes = page.page.text_content("#attn-notes")
    assert "grouped-query attention: 9 query heads share 3 key/value heads" in notes
    page.page.select_option("#attn-layer", "5")
    page.page.wait_for_function("document.getElementById('attn-notes').textContent.includes('layer 5')")
    page.page.click("#attn-grid figure:nth-child(3)")
    assert page.page.input_value("#attn-head") == "2"
    page.shot("attention")
    q = parse_qs(urlparse(page.page.url).query)
    assert (q["view"], q["layer"], q["head"]) == (["attention"], ["5"], ["2"])
    shared = tab(page.page.url)
    shared.page.wait_for_function("document.getElementById('attn-notes').textContent.includes('layer 5')")
    assert shared.page.input_value("#attn-head") == "2" and nonblank(shared, "#attn-heatmap") > 2000
    page.page.click("#attn-all-load")
    page.page.wait_for_function(f"document.querySelectorAll('#attn-all canvas').length === {N_LAYERS * N_HEADS}")
    assert nonblank(page, "#attn-all canvas") > 50

    # Through the API: every row sums to 1 and nothing above the diagonal is non-zero.
    prompt = httpx.post(server.url + "/lab/prompt", json={"model": MODEL, "text": "The cat sat on the mat"}).json()
    answer = httpx.post(server.url + "/lab/attention", json={"model": MODEL, "ids": prompt["ids"]}, timeout=120).json()
    assert answer["layers"] == N_LAYERS and answer["heads"] == N_HEADS
    for layer in answer["weights"]:
        for head in layer:
            for q, row in enumerate(head):
                assert math.isclose(sum(row), 1.0, abs_tol=1e-5)
                assert all(w == 0 for w in row[q + 1 :])


def test_ablating_a_head_changes_the_metrics(tab):
    page = tab()
    page.set(prompt=PROMPT, seed=3, temperature=0.8, max_tokens=8)
    page.view("intervene")
    assert page.page.locator("#ablate-grid .cell").count() == N_LAYERS * N_HEADS

    def run() -> tuple[float, str]:
        page.page.evaluate("document.getElementById('iv-metrics').textContent = ''")
        page.page.click("#intervene-run")
        page.page.wait_for_function("document.getElementById('iv-metrics').textContent !== ''")
        metrics = page.page.locator("#iv-metrics")
        return float(metrics.get_attribute("data-mean-kl")), metrics.text_content()

    kl0, text0 = run()
    assert kl0 == 0 and "no change" in text0 and "the tokens are the same" in text0
    page.page.click("#ablate-grid .cell[data-layer='0'][data-head='3']")
    page.page.click("#skip-layers .skip[data-layer='1']")
    kl1, text1 = run()
    assert kl1 > 1e-4, text1
    assert "ablated L0H3" in text1 and "skipped layers 1" in text1 and text1 != text0
    assert page.page.locator("#iv-table tr").count() == 1 + 8
    assert page.page.locator("#iv-lens-base tr").count() == page.page.locator("#iv-lens-int tr").count() > N_LAYERS
    page.shot("interventions")


def test_the_run_appears_in_the_history_and_reopens(tab, server):
    page = tab()
    seeded(page, 0.7, max_tokens=6)
    page.generate()
    made = page.tokens()
    run_id = page.page.evaluate("window.lmlab.lastRunId")
    assert run_id
    page.view("runs")
    row = page.page.locator(f"#runs-table tr[data-run='{run_id}']")
    row.wait_for()
    assert "generate" in row.text_content()
    page.page.fill("#runs-q", "capital of France")
    page.page.click("#runs-refresh")
    page.page.locator(f"#runs-table tr[data-run='{run_id}']").wait_for()
    page.shot("runs")
    exported = httpx.get(server.url + f"/lab/runs/{run_id}/export").json()
    assert exported["outputs"]["token_ids"][0] == [i for i, _ in made]

    page.page.click(f"#runs-table tr[data-run='{run_id}'] a.open")
    page.page.wait_for_function(
        "window.lmlab && window.lmlab.ready && window.lmlab.generations > 0 && !window.lmlab.busy"
    )
    assert page.tokens() == made
    assert "the same 6 tokens as recorded" in page.page.text_content("#status")


def test_a_prompt_with_script_shows_as_text_and_runs_nothing(tab):
    page = tab()
    evil = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> hello'
    seeded(page, 0.8, max_tokens=4, prompt=evil)
    page.generate()
    assert page.page.text_content("#output .prompt-text") == evil
    assert page.page.locator("#output script, #output img").count() == 0
    page.view("tokens")
    page.page.wait_for_function("document.querySelectorAll('#tok-chips .chip').length > 5")
    assert "<script>" in "".join(
        page.page.eval_on_selector_all("#tok-chips .chip", "els => els.map(e => e.textContent)")
    )
    assert page.page.evaluate("window.__pwned") is None
    assert page.dialogs == []
    text = "The tokenizer cuts text into pieces: 12345 unbelievable ☕"
    page.set(prompt=text)
    # a word cut in two, and a character cut into its three UTF-8 bytes
    page.page.wait_for_function("document.getElementById('tok-chips').textContent.includes('vable')")
    assert "\\x98" in page.page.text_content("#tok-chips")
    assert f"18 tokens, {len(text)} characters" in page.page.text_content("#tok-counts")
    page.page.check("#show-ids")
    assert page.page.text_content("#tok-chips .chip").strip().isdigit()
    page.page.uncheck("#show-ids")
    page.shot("tokenizer")


def test_an_invalid_value_shows_the_servers_message_and_stop_stops(tab, server):
    page = tab()
    page.set(prompt=PROMPT, top_p=5)
    page.page.click("#generate")
    page.page.wait_for_selector("#error:not([hidden])")
    assert "top_p must be in (0, 1], got 5.0" in page.page.text_content("#error")
    page.set(top_p=1, temperature=-1)
    page.page.click("#generate")
    page.page.wait_for_function("document.getElementById('error').textContent.includes('temperature must be >= 0')")
    page.set(temperature="")
    page.page.click("#generate")
    page.page.wait_for_function("document.getElementById('error').textContent.includes('temperature is empty')")

    # Stop: the fetch is aborted after the first tokens and the page says so.
    page.set(temperature=0.8, max_tokens=400)
    page.page.check("#ignore_eos")
    page.page.click("#generate")
    page.page.wait_for_selector("#output .tok")
    page.page.click("#stop")
    page.settle()
    assert page.page.text_content("#status") == "stopped"
    assert page.page.is_hidden("#error")
    assert 0 < len(page.tokens()) < 400
    # the server cancelled the sequence when the page closed the stream, and recorded the run so
    deadline = time.monotonic() + 60
    while True:
        last = httpx.get(server.url + "/lab/runs", params={"kind": "generate", "limit": 1}).json()["runs"][0]
        if last["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert last["status"] == "interrupted", last


def test_side_by_side_and_live_stats(tab):
    page = tab()
    seeded(page, 0.8, max_tokens=8)
    page.generate()
    streamed = [i for i, _ in page.tokens()]
    page.page.click("#output .tok[data-index='1']")  # a look inside, timed: the stats say what it cost
    page.page.wait_for_selector("#chain-sampled")
    page.view("compare")
    page.page.fill("#cmp-a-temperature", "0.8")
    page.page.fill("#cmp-b-temperature", "1.6")
    page.page.click("#compare-run")
    page.page.wait_for_function("document.getElementById('cmp-summary').textContent.includes('seed 7')")
    ids = "els => els.map(e => Number(e.dataset.id))"
    a = page.page.eval_on_selector_all("#cmp-out-a .tok", ids)
    b = page.page.eval_on_selector_all("#cmp-out-b .tok", ids)
    # A has the settings of the streamed output and its seed: the same tokens
    assert a == streamed
    assert len(b) == 8 and b != a
    differ = [i for i in range(8) if a[i] != b[i]]
    assert page.page.locator("#cmp-table tr.diff").count() == len(differ)
    assert page.page.locator("#cmp-out-b .tok.diff").count() == len(differ)
    page.shot("side-by-side")
    page.view("stats")
    page.page.wait_for_selector("#models-table td")
    text = page.page.text_content("#stats-table")
    assert "time to first token" in text and "tok/s" in text and "looking costs" in text
    assert "MiB" in page.page.text_content("#models-table")
    page.shot("stats")


def _record_finetune_and_merge_runs() -> tuple[str, str]:
    """A finetune run and a merge run in the server's run store (the tests share LMLAB_HOME with it),
    recorded through record_run with the shapes `lmlab finetune` and `lmlab merge` record (the
    real commands' runs are shown by test_runs_cli.py). A sample answer holds markup that must
    show as text."""
    from lmlab.runs import record_run

    points = [{"step": s, "train_loss": round(3.0 - 0.2 * s, 3), "lr": 1e-3} for s in range(1, 11)]
    points += [{"step": 5, "val_loss": 2.4}, {"step": 10, "val_loss": 1.9}]
    with record_run("finetune", model=MODEL, config={"lora": "r=8"}, inputs={"data": "train.jsonl"}) as ft:
        ft.add_metrics(val_loss_before=2.9, val_loss=1.9, val_loss_after=1.9, points=points)
        row = {"line": 3, "prompt": "w abc:", "expected": " [abc]"}
        ft.outputs = {
            "samples_before": [{**row, "output": " <img src=x onerror=1>"}],
            "samples_after": [{**row, "output": " [abc]"}],
        }
    comparison = [
        {"label": label, "model": label, "perplexity": ppl, "tokens": 57, "answers": [f"{label} says hi", "return a"]}
        for label, ppl in (("model-a", 12.5), ("model-b", 14.25), ("merged", 11.75))
    ]
    with record_run("merge", model="merged", config={"merge_method": "linear"}, inputs={"models": ["a", "b"]}) as mg:
        mg.outputs = {"files": ["model.safetensors"], "comparison": comparison}
    return ft.id, mg.id


def test_finetune_and_merge_runs_show_their_curve_samples_and_comparison(tab):
    ft_id, merge_id = _record_finetune_and_merge_runs()
    page = tab()
    page.view("runs")
    page.page.locator(f"#runs-table tr[data-run='{ft_id}'] td").first.click()
    page.page.wait_for_function(f"window.lmlab.shownRun === '{ft_id}'")
    # pixels of the two curves' colours (train #1f77b4, held-out #d62728) on the canvas
    colours = page.page.eval_on_selector(
        "#run-loss",
        """c => {
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const near = (i, r, g, b) => Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 24;
          let train = 0, heldOut = 0;
          for (let i = 0; i < d.length; i += 4) { train += near(i, 31, 119, 180); heldOut += near(i, 214, 39, 40); }
          return [train, heldOut];
        }""",
    )
    assert colours[0] > 50 and colours[1] > 20, colours
    assert "held-out loss 2.9000 → 1.9000 (-1.0000)" in page.page.text_content("#run-heldout")
    cells = page.page.eval_on_selector_all("#run-samples td", "els => els.map(e => e.textContent)")
    assert cells == ["3", "w abc:", " [abc]", " <img src=x onerror=1>", " [abc]"]
    assert page.page.locator("#run-detail img").count() == 0
    page.shot("run-finetune")

    page.page.locator(f"#runs-table tr[data-run='{merge_id}'] td").first.click()
    page.page.wait_for_function(f"window.lmlab.shownRun === '{merge_id}'")
    assert page.page.locator("#run-loss").count() == 0
    rows = page.page.eval_on_selector_all(
        "#run-comparison tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))"
    )
    assert rows == [
        ["model", "perplexity", "tokens", "answer 1", "answer 2"],
        ["model-a", "12.50", "57", "model-a says hi", "return a"],
        ["model-b", "14.25", "57", "model-b says hi", "return a"],
        ["merged", "11.75", "57", "merged says hi", "return a"],
    ]
    page.shot("run-merge")
