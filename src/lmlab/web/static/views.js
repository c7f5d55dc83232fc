// The playground's other views: tokenizer, attention heatmap, interventions, side by side,
// live stats, benchmarks and runs. Each draws what one of lmlab's /lab endpoints answers.

import { api, ApiError } from "./api.js";
import * as app from "./app.js";
import { bars, el, heatmap, linePlot, pct, probColour, visible } from "./draw.js";
import { lensTable } from "./inside.js";

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits));

export function init() {
  $("show-ids").addEventListener("change", () => app.S.prompt && renderTokenizer(app.S.prompt));
  $("attn-load").addEventListener("click", () => loadAttention(true));
  $("attn-layer").addEventListener("change", () => loadAttention(true));
  $("attn-head").addEventListener("change", () => {
    drawAttention();
    app.saveUrl();
  });
  $("attn-all-load").addEventListener("click", loadAllHeads);
  $("intervene-run").addEventListener("click", runIntervention);
  $("compare-run").addEventListener("click", runCompare);
  $("runs-refresh").addEventListener("click", loadRuns);
}

export function opened(view) {
  if (view === "attention") loadAttention(false);
  if (view === "runs") {
    loadRuns();
    loadBench();
  }
  if (view === "stats") refreshModels();
  if (view === "tokens" && app.S.prompt) renderTokenizer(app.S.prompt);
}

export function modelChanged(m) {
  const layers = m.n_layers || 0;
  const heads = m.n_heads || 0;
  $("attn-layer").replaceChildren(...range(layers).map((l) => el("option", { value: l }, `layer ${l}`)));
  $("attn-head").replaceChildren(...range(heads).map((h) => el("option", { value: h }, `head ${h}`)));
  buildInterventionControls(layers, heads);
  buildCompareControls();
  attn.key = null;
}

function range(n) {
  return [...Array(n).keys()];
}

// ------------------------------------------------------------------------------------ tokenizer

export function renderTokenizer(p) {
  const ids = $("show-ids").checked;
  const chars = [...p.text].length; // characters, not UTF-16 units
  $("tok-counts").textContent =
    `${p.count} tokens, ${chars} characters, ${(chars / Math.max(1, p.count)).toFixed(2)} characters per token`;
  $("tok-chips").replaceChildren(
    ...(p.labels || p.pieces).map((label, i) =>
      el(
        "span",
        { class: "chip tokchip", title: `position ${i}, id ${p.ids[i]}`, dataset: { id: p.ids[i] } },
        ids ? String(p.ids[i]) : visible(label),
      ),
    ),
  );
}

// ------------------------------------------------------------------------------------ attention

const attn = { key: null, data: null, layer: 0 };

function layerWeights(data, layer) {
  const w = data.weights;
  const perLayer = Array.isArray(w[0]?.[0]?.[0]); // [layer][head][q][k] or [head][q][k]
  if (!perLayer) return w;
  return w.length === 1 ? w[0] : w[layer];
}

// The ids the attention views show: the current output with its prompt, else the prompt alone.
async function shownIds() {
  const ids = app.currentIds();
  if (ids) return ids;
  if (!$("prompt").value) return null;
  try {
    return (await app.promptIds()).ids;
  } catch (e) {
    app.showError(e);
    return null;
  }
}

async function loadAttention(force) {
  const ids = await shownIds();
  if (!ids) {
    $("attn-notes").textContent = "Type a prompt (and generate) first: the heatmap shows the prompt and its output.";
    return;
  }
  const layer = Number($("attn-layer").value || 0);
  const key = JSON.stringify([app.model(), ids, layer]);
  if (!force && attn.key === key) return drawAttention();
  const used = ids.slice(0, 512);
  try {
    $("attn-notes").textContent = "computing…";
    attn.data = await api("/lab/attention", { model: app.model(), ids: used, layer });
    attn.key = key;
    attn.layer = layer;
    drawAttention();
    drawGrid();
    app.saveUrl();
  } catch (e) {
    $("attn-notes").textContent = "";
    app.showError(e);
  }
}

// The window of `layer` in an answer that holds every layer, or only the one asked for.
function windowOf(data, layer) {
  const at = data.layer_index ? data.layer_index.indexOf(layer) : layer;
  return (data.window || [])[at] ?? null;
}

function masked(rows, window) {
  // Grey (null) where attention is impossible: above the diagonal and outside a sliding window.
  return rows.map((row, q) => row.map((w, k) => (k > q || (window && k <= q - window) ? null : w)));
}

function groupsNote(data) {
  const groups = data.kv_group || [];
  const kv = new Set(groups).size;
  if (!groups.length || kv === groups.length) return "every head has its own keys and values";
  const parts = [...new Set(groups)].map((g) => `kv ${g} ← heads ${groups.flatMap((x, h) => (x === g ? [h] : [])).join(",")}`);
  const shared = kv === 1 ? "one key/value head (multi-query attention)" : `${kv} key/value heads`;
  return `grouped-query attention: ${groups.length} query heads share ${shared} (${parts.join("; ")})`;
}

function drawAttention() {
  const data = attn.data;
  if (!data) return;
  const head = Number($("attn-head").value || 0);
  const weights = layerWeights(data, attn.layer);
  const window = windowOf(data, attn.layer);
  const note = window ? `layer ${attn.layer} uses a sliding window of ${window} tokens` : `layer ${attn.layer} attends to every earlier token`;
  const group = data.kv_group ? ` Head ${head} reads key/value head ${data.kv_group[head]}.` : "";
  $("attn-notes").textContent = `${data.pieces.length} tokens; ${note}; ${groupsNote(data)}.${group}`;
  heatmap($("attn-heatmap"), masked(weights[head], window), { size: 560, labels: data.pieces });
}

function drawGrid() {
  const data = attn.data;
  const weights = layerWeights(data, attn.layer);
  const window = windowOf(data, attn.layer);
  $("attn-grid").replaceChildren(
    ...weights.map((rows, h) => {
      const canvas = el("canvas", { width: 120, height: 120, class: "mini", dataset: { head: h } });
      heatmap(canvas, masked(rows, window), { size: 120 });
      return el(
        "figure",
        {
          class: "mini-fig",
          onclick: () => {
            $("attn-head").value = String(h);
            drawAttention();
            app.saveUrl();
          },
        },
        canvas,
        el("figcaption", {}, `head ${h}${data.kv_group ? ` · kv ${data.kv_group[h]}` : ""}`),
      );
    }),
  );
}

// Every layer x head as small heatmaps (one request with every layer; the server refuses when the
// sequence is too long for that, and says to ask for one layer).
async function loadAllHeads() {
  const ids = await shownIds();
  if (!ids) return;
  let data;
  try {
    data = await api("/lab/attention", { model: app.model(), ids: ids.slice(0, 512) });
  } catch (e) {
    return app.showError(e);
  }
  const rows = data.weights.map((heads, l) =>
    el(
      "div",
      { class: "all-row" },
      el("span", { class: "all-label" }, `layer ${l}${data.window[l] ? ` (window ${data.window[l]})` : ""}`),
      heads.map((w, h) => {
        const canvas = el("canvas", { width: 56, height: 56, class: "tiny", title: `layer ${l} head ${h}` });
        heatmap(canvas, masked(w, data.window[l]), { size: 56 });
        canvas.addEventListener("click", () => {
          $("attn-layer").value = String(l);
          $("attn-head").value = String(h);
          loadAttention(true);
        });
        return canvas;
      }),
    ),
  );
  $("attn-all").replaceChildren(...rows);
}

// ------------------------------------------------------------------------------------ interventions

function toggle(button) {
  const on = button.getAttribute("aria-pressed") !== "true";
  button.setAttribute("aria-pressed", String(on));
  button.classList.toggle("on", on);
}

function buildInterventionControls(layers, heads) {
  const grid = $("ablate-grid");
  const table = el(
    "table",
    {},
    el("tr", {}, el("th", {}, "layer \\ head"), range(heads).map((h) => el("th", {}, String(h)))),
    range(layers).map((l) =>
      el(
        "tr",
        {},
        el("th", {}, String(l)),
        range(heads).map((h) =>
          el(
            "td",
            {},
            el("button", {
              type: "button",
              class: "cell",
              "aria-pressed": "false",
              title: `ablate layer ${l} head ${h}`,
              dataset: { layer: l, head: h },
              onclick: (e) => toggle(e.currentTarget),
            }),
          ),
        ),
      ),
    ),
  );
  grid.replaceChildren(table);
  $("skip-layers").replaceChildren(
    ...range(layers).map((l) =>
      el(
        "button",
        {
          type: "button",
          class: "chip skip",
          "aria-pressed": "false",
          dataset: { layer: l },
          onclick: (e) => toggle(e.currentTarget),
        },
        `skip ${l}`,
      ),
    ),
  );
}

function tokenRow(container, pieces, ids, other) {
  container.replaceChildren(
    ...pieces.map((piece, i) => {
      const cls = `tok plain${other && other[i] !== ids[i] ? " diff" : ""}${piece.includes("\n") ? " nl" : ""}`;
      return el("span", { class: cls, dataset: { id: ids[i] } }, piece);
    }),
  );
}

async function runIntervention() {
  let st;
  let p;
  try {
    st = app.settings();
    p = await app.promptIds();
  } catch (e) {
    return app.showError(e);
  }
  const pressed = (sel) => [...document.querySelectorAll(sel)].filter((b) => b.getAttribute("aria-pressed") === "true");
  const ablate = pressed("#ablate-grid .cell").map((b) => [Number(b.dataset.layer), Number(b.dataset.head)]);
  const skip = pressed("#skip-layers .skip").map((b) => Number(b.dataset.layer));
  const pos = $("steer-pos").value.trim();
  const neg = $("steer-neg").value.trim();
  const steer =
    pos || neg
      ? { positive: pos, negative: neg, layer: Number($("steer-layer").value), scale: Number($("steer-scale").value) }
      : null;
  const seed = st.seed ?? 0;
  $("intervene-run").disabled = true;
  try {
    const r = await api("/lab/intervene", {
      model: app.model(),
      ids: p.ids,
      max_tokens: st.max_tokens,
      seed,
      sampling: app.sampling(st),
      ablate,
      skip_layers: skip,
      steer,
    });
    app.showError(null);
    showIntervention(r, { ablate, skip, steer, seed });
  } catch (e) {
    app.showError(e);
  } finally {
    $("intervene-run").disabled = false;
  }
}

function showIntervention(r, what) {
  $("iv-result").hidden = false;
  tokenRow($("iv-baseline"), r.baseline.pieces, r.baseline.ids, r.intervened.ids);
  tokenRow($("iv-intervened"), r.intervened.pieces, r.intervened.ids, r.baseline.ids);
  const kl = r.per_position.map((x) => x.kl);
  const dl = r.per_position.map((x) => x.dlogit);
  const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);
  const changes = [
    what.ablate.length ? `ablated ${what.ablate.map(([l, h]) => `L${l}H${h}`).join(", ")}` : null,
    what.skip.length ? `skipped layers ${what.skip.join(", ")}` : null,
    what.steer ? `steered at layer ${what.steer.layer} × ${what.steer.scale}` : null,
  ].filter(Boolean);
  $("iv-metrics").textContent =
    `${changes.join("; ") || "no change"} (seed ${what.seed}): ` +
    `${r.first_diff === null ? "the tokens are the same" : `first different token at #${r.first_diff}`}; ` +
    `mean KL ${mean(kl).toFixed(4)}, max KL ${Math.max(0, ...kl).toFixed(4)} nats; ` +
    `mean Δlogit ${mean(dl).toFixed(3)}` +
    (r.run_id ? `; recorded as run ${r.run_id}` : "");
  $("iv-metrics").dataset.meanKl = String(mean(kl));
  $("iv-metrics").dataset.firstDiff = String(r.first_diff);
  bars($("iv-kl"), kl);
  $("iv-table").replaceChildren(
    el("tr", {}, el("th", {}, "#"), el("th", {}, "baseline token"), el("th", {}, "KL"), el("th", {}, "Δlogit")),
    ...r.per_position.map((x, i) =>
      el(
        "tr",
        {},
        el("td", {}, String(i)),
        el("td", {}, visible(r.baseline.pieces[r.baseline.pieces.length - r.per_position.length + i] ?? "")),
        el("td", { class: "num" }, x.kl.toFixed(4)),
        el("td", { class: "num" }, x.dlogit.toFixed(3)),
      ),
    ),
  );
  const n = app.modelInfo()?.n_layers ?? r.lens.baseline.length;
  lensTable($("iv-lens-base"), r.lens.baseline, null, n);
  lensTable($("iv-lens-int"), r.lens.intervened, null, n);
}

// ------------------------------------------------------------------------------------ side by side

function buildCompareControls() {
  for (const side of ["a", "b"]) {
    const box = $(`cmp-${side}`);
    const keep = box.querySelector("legend");
    const select = el(
      "select",
      { id: `cmp-${side}-model` },
      app.S.models.map((m) => el("option", { value: m.id }, m.id)),
    );
    select.value = app.model();
    const field = (name, value) =>
      el("label", {}, `${name} `, el("input", { id: `cmp-${side}-${name}`, type: "number", step: "any", value }));
    box.replaceChildren(
      keep,
      el(
        "div",
        { class: "cmp-fields" },
        el("label", {}, "model ", select),
        field("temperature", side === "a" ? "0.7" : "1.2"),
        field("top_k", "0"),
        field("top_p", "1"),
      ),
    );
  }
}

async function completeSide(side, st, seed) {
  const name = $(`cmp-${side}-model`).value;
  const num = (f) => Number($(`cmp-${side}-${f}`).value);
  const p = await api("/lab/prompt", app.promptRequest(name));
  const body = {
    model: name,
    prompt: p.ids,
    max_tokens: st.max_tokens,
    temperature: num("temperature"),
    top_k: num("top_k"),
    top_p: num("top_p"),
    min_p: st.min_p,
    repetition_penalty: st.repetition_penalty,
    presence_penalty: st.presence_penalty,
    frequency_penalty: st.frequency_penalty,
    ignore_eos: st.ignore_eos,
    seed,
    logprobs: 1,
    return_token_ids: true,
  };
  if (p.stop && p.stop.length) body.stop = p.stop;
  const r = await api("/v1/completions", body);
  return { name, tokens: r.choices[0].lmlab.tokens, runId: r.choices[0].lmlab.run_id };
}

async function runCompare() {
  let st;
  try {
    st = app.settings();
  } catch (e) {
    return app.showError(e);
  }
  const seed = st.seed ?? 0;
  $("compare-run").disabled = true;
  try {
    const [a, b] = await Promise.all([completeSide("a", st, seed), completeSide("b", st, seed)]);
    app.showError(null);
    showCompare(a, b, seed);
  } catch (e) {
    app.showError(e);
  } finally {
    $("compare-run").disabled = false;
  }
}

// Aligned diff: tokens are paired by position when both sides share a tokenizer (same model),
// otherwise by characters (the text up to the first different character is the same).
function showCompare(a, b, seed) {
  const sameVocab = a.name === b.name;
  const textA = a.tokens.map((t) => t.text).join("");
  const textB = b.tokens.map((t) => t.text).join("");
  let common = 0;
  while (common < textA.length && common < textB.length && textA[common] === textB[common]) common++;
  const render = (box, mine, theirs) => {
    let offset = 0;
    box.replaceChildren(
      ...mine.tokens.map((t, i) => {
        const differs = sameVocab ? theirs.tokens[i]?.id !== t.id : offset + t.text.length > common;
        offset += t.text.length;
        const cls = `tok${differs ? " diff" : ""}${t.text.includes("\n") ? " nl" : ""}`;
        const span = el("span", { class: cls, dataset: { id: t.id } }, t.text);
        span.style.background = probColour(Math.exp(t.logprob));
        return span;
      }),
    );
  };
  render($("cmp-out-a"), a, b);
  render($("cmp-out-b"), b, a);
  // Position by position, when both sides share a tokenizer.
  const n = Math.max(a.tokens.length, b.tokens.length);
  $("cmp-table").replaceChildren(
    ...(sameVocab
      ? [
          el("tr", {}, el("th", {}, "#"), el("th", {}, `A (${a.name})`), el("th", {}, `B (${b.name})`)),
          ...range(n).map((i) => {
            const [ta, tb] = [a.tokens[i], b.tokens[i]];
            const cell = (t) => el("td", {}, t ? `${visible(t.text)}  ${pct(Math.exp(t.logprob))}` : "");
            return el("tr", { class: ta?.id === tb?.id ? "" : "diff" }, el("td", {}, String(i)), cell(ta), cell(tb));
          }),
        ]
      : []),
  );
  const differ = sameVocab
    ? a.tokens.filter((t, i) => b.tokens[i]?.id !== t.id).length + Math.max(0, b.tokens.length - a.tokens.length)
    : null;
  $("cmp-summary").textContent =
    `seed ${seed}: the two outputs agree on their first ${common} characters` +
    (differ === null ? "" : `; ${differ} of ${Math.max(a.tokens.length, b.tokens.length)} token positions differ`) +
    ".";
}

// ------------------------------------------------------------------------------------ live stats

export function renderStats(stats, inside) {
  const rows = [];
  const row = (name, value, note = "") => rows.push(el("tr", {}, el("th", {}, name), el("td", { class: "num" }, value), el("td", { class: "muted" }, note)));
  if (stats) {
    row("time to first token", `${fmt(stats.ttft_ms)} ms`, "from sending the request to the first token on the page");
    row("prefill", `${fmt(stats.prefill_tok_s)} tok/s`, `${stats.prompt_tokens} prompt tokens`);
    row("decode", `${fmt(stats.decode_tok_s)} tok/s`, `${stats.tokens} tokens, from the server's sampling times`);
    row("sampled → shown", `${fmt(stats.lag_ms_mean)} ms`, `mean; p95 ${fmt(stats.lag_ms_p95)} ms, max ${fmt(stats.lag_ms_max)} ms`);
    $("live-stats").textContent =
      `TTFT ${fmt(stats.ttft_ms, 0)} ms · decode ${fmt(stats.decode_tok_s)} tok/s`;
  }
  if (inside && inside.timing) {
    const { forward_ms: f, capture_ms: c } = inside.timing;
    row("a plain forward", `${fmt(f)} ms`, "the context of the token looked at");
    row("the same with capture", `${fmt(c)} ms`, `looking costs ${fmt(c - f)} ms (${fmt((100 * (c - f)) / f, 0)}% of a plain forward)`);
  }
  $("stats-table").replaceChildren(...rows);
}

async function refreshModels() {
  let stats;
  try {
    app.S.models = (await api("/lab/models")).models;
    stats = await api("/lab/stats");
  } catch (e) {
    return app.showError(e);
  }
  $("process-memory").textContent = stats.process_peak_bytes
    ? `The server process's peak memory so far: ${(stats.process_peak_bytes / 2 ** 20).toFixed(0)} MiB.`
    : "";
  $("models-table").replaceChildren(
    el("tr", {}, ["model", "state", "memory", "parameters", "dtype", "layers × heads (kv)", "context"].map((h) => el("th", {}, h))),
    ...app.S.models.map((m) =>
      el(
        "tr",
        {},
        el("td", {}, m.id),
        el("td", {}, m.state),
        el("td", { class: "num" }, m.memory_bytes ? `${(m.memory_bytes / 2 ** 20).toFixed(1)} MiB` : "–"),
        el("td", { class: "num" }, m.params ? `${(m.params / 1e6).toFixed(1)} M` : "–"),
        el("td", {}, m.dtype || "–"),
        el("td", {}, m.n_layers ? `${m.n_layers} × ${m.n_heads} (${m.n_kv_heads})` : "–"),
        el("td", { class: "num" }, String(m.context ?? "–")),
      ),
    ),
  );
}

// ------------------------------------------------------------------------------------ runs and benchmarks

async function loadRuns() {
  const q = new URLSearchParams({ limit: "50" });
  for (const [key, id] of [["kind", "runs-kind"], ["model", "runs-model"], ["q", "runs-q"]]) {
    if ($(id).value.trim()) q.set(key, $(id).value.trim());
  }
  let runs;
  try {
    runs = (await api(`/lab/runs?${q}`)).runs;
  } catch (e) {
    return app.showError(e);
  }
  $("runs-table").replaceChildren(
    el("tr", {}, ["run", "kind", "model", "when", "summary", "status", ""].map((h) => el("th", {}, h))),
    ...runs.map((r) => {
      const reopen = new URLSearchParams({ run: r.id });
      return el(
        "tr",
        {
          dataset: { run: r.id },
          class: "run-row",
          title: "show this run's details",
          // a click on the row (not on its links and buttons) shows the run below the table
          onclick: (e) => e.target.closest("a, button") || showRun(r.id),
        },
        el("td", {}, String(r.id)),
        el("td", {}, r.kind),
        el("td", {}, r.model || ""),
        el("td", {}, when(r.created)),
        el("td", { class: "summary" }, r.summary || ""),
        el("td", {}, r.status || ""),
        el(
          "td",
          {},
          r.kind === "generate" ? el("a", { href: `?${reopen}`, class: "open" }, "reopen") : null,
          " ",
          r.kind === "generate"
            ? el("button", { type: "button", class: "rerun", onclick: () => rerun(r.id) }, "re-run")
            : null,
          " ",
          el("a", { href: `/lab/runs/${encodeURIComponent(r.id)}/export`, download: `run-${r.id}.json` }, "export"),
        ),
      );
    }),
  );
}

// ------------------------------------------------------------------------------------ one run's details

// A train or finetune run's loss curve as linePlot series: train loss and held-out loss against
// step (a finetune run's held-out loss before training is its step 0). [] for other runs.
export function lossSeries(run) {
  const metrics = run.metrics || {};
  const points = (Array.isArray(metrics.points) ? metrics.points : []).filter((p) => p && Number.isFinite(p.step));
  if (!["train", "finetune"].includes(run.command)) return [];
  const curve = (key) => points.filter((p) => Number.isFinite(p[key])).map((p) => [p.step, p[key]]);
  const train = curve("train_loss");
  const heldOut = curve("val_loss");
  if (Number.isFinite(metrics.val_loss_before) && !heldOut.some(([step]) => step === 0)) {
    heldOut.unshift([0, metrics.val_loss_before]);
  }
  return [
    { name: "train loss", points: train },
    { name: "held-out loss", points: heldOut },
  ].filter((s) => s.points.length);
}

const cellText = (v) => (v === null || v === undefined ? "–" : String(v));

function textTable(id, header, rows) {
  return el(
    "table",
    { id },
    el("tr", {}, header.map((h) => el("th", {}, h))),
    rows.map((row) => el("tr", {}, row.map((c) => (c instanceof Node ? c : el("td", { class: "sample" }, cellText(c)))))),
  );
}

// A finetune run: held-out loss before and after, and the greedy answers to the same held-out
// prompts side by side.
function beforeAfter(run) {
  const outputs = run.outputs || {};
  const metrics = run.metrics || {};
  const before = Array.isArray(outputs.samples_before) ? outputs.samples_before : [];
  const after = Array.isArray(outputs.samples_after) ? outputs.samples_after : [];
  const loss0 = metrics.val_loss_before;
  const loss1 = metrics.val_loss_after;
  const change = Number.isFinite(loss0) && Number.isFinite(loss1) ? ` (${loss1 - loss0 >= 0 ? "+" : ""}${fmt(loss1 - loss0, 4)})` : "";
  const rows = [...Array(Math.max(before.length, after.length)).keys()].map((i) => {
    const b = before[i] || {};
    const a = after[i] || {};
    return [el("td", { class: "num" }, cellText(b.line ?? a.line)), b.prompt ?? a.prompt, b.expected ?? a.expected, b.output, a.output];
  });
  return [
    el("h4", {}, "before and after fine-tuning"),
    el("p", { id: "run-heldout" }, `held-out loss ${fmt(loss0, 4)} → ${Number.isFinite(loss1) ? fmt(loss1, 4) : "not finished"}${change}`),
    rows.length
      ? textTable("run-samples", ["line", "prompt", "expected", "before", "after"], rows)
      : el("p", { class: "muted" }, "no samples recorded"),
  ];
}

// A merge run: the perplexity of each input and of the result on one text, and their greedy answers.
function mergeComparison(run) {
  const outputs = run.outputs || {};
  const rows = Array.isArray(outputs.comparison) ? outputs.comparison.filter((r) => r && typeof r === "object") : [];
  const n = Math.max(0, ...rows.map((r) => (r.answers || []).length));
  const prompts = Array.isArray(outputs.prompts) && outputs.prompts.length === n ? outputs.prompts : null;
  const heads = [...Array(n).keys()].map((i) => (prompts ? `${JSON.stringify(prompts[i])} →` : `answer ${i + 1}`));
  return [
    el("h4", {}, "merge comparison: perplexity on one text, greedy answers to the same prompts"),
    textTable(
      "run-comparison",
      ["model", "perplexity", "tokens", ...heads],
      rows.map((r) => [
        r.label,
        el("td", { class: "num" }, Number.isFinite(r.perplexity) ? fmt(r.perplexity, 2) : "–"),
        el("td", { class: "num" }, cellText(r.tokens)),
        ...[...Array(n).keys()].map((i) => (r.answers || [])[i]),
      ]),
    ),
  ];
}

// A train run: its samples as training went.
function trainSamples(run) {
  const samples = ((run.outputs || {}).samples || []).filter((s) => s && typeof s === "object");
  if (!samples.length) return [];
  return [el("h4", {}, "samples as training went"), textTable("run-samples", ["step", "sample"], samples.map((s) => [s.step, s.text]))];
}

// The run's details under the history: what it is, its loss curve, its samples or comparison.
async function showRun(id) {
  let run;
  try {
    run = await api(`/lab/runs/${encodeURIComponent(id)}`);
  } catch (e) {
    return app.showError(e);
  }
  for (const tr of $("runs-table").querySelectorAll("tr[data-run]")) tr.classList.toggle("selected", tr.dataset.run === run.id);
  const parts = [el("h3", {}, `run ${run.id} · ${run.command} · ${run.model || "no model"}`)];
  const series = lossSeries(run);
  let canvas = null;
  if (series.length) {
    canvas = el("canvas", { id: "run-loss", width: 640, height: 260 });
    parts.push(el("h4", {}, "loss (nats/token) against step"), canvas);
  }
  if (run.command === "finetune") parts.push(...beforeAfter(run));
  if (run.command === "merge") parts.push(...mergeComparison(run));
  if (run.command === "train") parts.push(...trainSamples(run));
  if (parts.length === 1) parts.push(el("p", { class: "muted" }, "Nothing more to draw for this run: export has the whole record."));
  $("run-detail").replaceChildren(...parts);
  $("run-detail").hidden = false;
  $("run-detail").scrollIntoView({ block: "start" }); // below a long history: bring it into view
  if (canvas) linePlot(canvas, series, { xLabel: "step", yLabel: "loss (nats/token)" });
  window.lmlab.shownRun = run.id;
}

function when(created) {
  if (!created) return "";
  const d = typeof created === "number" ? new Date(created * (created < 1e12 ? 1000 : 1)) : new Date(created);
  return Number.isNaN(d.getTime()) ? String(created) : d.toLocaleString();
}

// Re-run: the run's prompt and settings in the controls, generated again with them.
async function rerun(id) {
  try {
    const q = await paramsOfRun(id);
    location.search = `?${q}`;
  } catch (e) {
    app.showError(e);
  }
}

let reopened = null; // the run being reopened: its recorded output, to compare with

// The page state (as URL parameters) that reopens a recorded generation: its prompt ids, its
// settings and its seed (generating again with them gives the recorded tokens back).
export async function paramsOfRun(id, reopen = false) {
  const run = await api(`/lab/runs/${encodeURIComponent(id)}`);
  if (run.command !== "generate" || !run.inputs || !run.inputs.prompt_ids) {
    throw new ApiError(`run ${id} is a '${run.command}' run; only the page's generations can be reopened here.`, "run", 400);
  }
  const params = run.config || {};
  const inputs = run.inputs;
  const q = new URLSearchParams();
  q.set("model", run.model || "");
  q.set("prompt", (inputs.prompts || [""])[0]);
  q.set("ids", inputs.prompt_ids[0].join(","));
  q.set("mode", "base");
  for (const k of [
    "temperature",
    "top_k",
    "top_p",
    "max_tokens",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
  ]) {
    if (params[k] !== undefined && params[k] !== null) q.set(k, String(params[k]));
  }
  if (params.ignore_eos) q.set("ignore_eos", "1");
  if (params.temperature === 0) q.set("greedy", "1");
  const seed = run.seed ?? params.seed;
  if (seed !== undefined && seed !== null) q.set("seed", String(seed));
  if (reopen) {
    q.set("run", String(run.id));
    reopened = run;
  }
  q.set("go", "1");
  q.set("view", "output");
  return q;
}

// After a reopened run was generated again: say whether its tokens are the recorded ones.
export function checkReopened(node) {
  if (!reopened || !node) return;
  const recorded = ((reopened.outputs || {}).token_ids || [[]])[0];
  const now = node.tokens.map((t) => t.id);
  const same = recorded.length === now.length && recorded.every((id, i) => id === now[i]);
  $("status").textContent = same
    ? `reopened run ${reopened.id}: the same ${now.length} tokens as recorded`
    : `reopened run ${reopened.id}: generated again with its seed, but the tokens differ from the recorded ones`;
  reopened = null;
}

async function loadBench() {
  let data;
  try {
    data = await api("/lab/bench");
  } catch (e) {
    return app.showError(e);
  }
  // One line per model (and dtype / quantization, or batch); the best value where a run repeats an x.
  const lines = (rows, name, x, y) => {
    const out = new Map();
    for (const r of rows) {
      const key = name(r);
      if (!out.has(key)) out.set(key, new Map());
      const points = out.get(key);
      points.set(r[x], Math.max(points.get(r[x]) ?? -Infinity, r[y]));
    }
    return [...out].map(([key, points]) => ({ name: key, points: [...points] }));
  };
  const tpsName = (r) => `${r.model} ${r.dtype || ""}${r.quant && r.quant !== "none" ? ` ${r.quant}` : ""}`;
  const byModel = (rows, x, y) =>
    x === "batch" ? lines(rows, tpsName, x, y) : lines(rows, (r) => `${r.model} batch ${r.batch ?? 1}`, x, y);
  linePlot($("plot-tps"), byModel(data.tps_vs_batch, "batch", "tok_s"), {
    xLabel: "batch size",
    yLabel: "tokens/s",
    logX: true,
  });
  linePlot($("plot-mem"), byModel(data.mem_vs_seq, "seq_len", "peak_bytes"), {
    xLabel: "sequence length (tokens)",
    yLabel: "peak memory",
    logX: true,
    yFormat: (v) => `${(v / 2 ** 20).toFixed(0)} MiB`,
  });
}

