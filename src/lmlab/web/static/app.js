// The playground's main module: the controls, generation with its branch tree, the page state
// in the URL, and the views' wiring. Other views live in inside.js and views.js.
//
// Shape of the state:
//   S.tree.nodes[i] = {id, parent, at, promptIds, promptText, tokens: [tok], settings, seed, runId, finish}
//   tok = {id, text, logprob, entropy, top: [[id, text, logprob]], t_ms, shown}
// A node's full ids are promptIds followed by its tokens' ids; a branch copies its parent's
// tokens before the branch point, then the chosen alternative, then its own continuation.

import { api, ApiError, setApiKey, streamCompletion } from "./api.js";
import { el, pct, probColour, visible } from "./draw.js";
import { showInside } from "./inside.js";
import * as views from "./views.js";

const $ = (id) => document.getElementById(id);
const KNOBS = [
  "temperature",
  "top_k",
  "top_p",
  "max_tokens",
  "min_p",
  "repetition_penalty",
  "presence_penalty",
  "frequency_penalty",
];
const VIEWS = ["output", "tokens", "attention", "intervene", "compare", "stats", "runs"];

export const S = {
  models: [],
  prompt: null, // the last /lab/prompt answer, with `key` saying which inputs it was for
  tree: null, // {nodes: [], current: index}
  sel: null, // selected token (index into the current node's tokens)
  view: "output",
  abort: null,
  busy: false,
  stats: null, // the last generation's live stats
  inside: null, // the last /lab/inside answer
  forced: null, // {ids, text, count}: a reopened run's prompt ids, used until the prompt is edited
};
// Read by the browser tests and benchmarks/playground_speed.py.
window.lmlab = { ready: false, busy: false, stats: null, generations: 0, errors: 0 };

// ------------------------------------------------------------------------------------ messages

// Show the server's sentence (or hide the box with null). `from`: what showed it; the live
// token count only clears an error it showed itself.
let errorFrom = null;
export function showError(error, from = "action") {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  if (error.name === "AbortError") return;
  const message = error instanceof ApiError ? error.message : `Something went wrong: ${error.message || error}`;
  errorFrom = from;
  if (error.status === 401) $("key-row").hidden = false; // the server has an --api-key: ask for it
  const hint = error.status === 401 ? " Type the key in the API key box at the top." : "";
  box.textContent = (error.param ? `${message} (field: ${error.param})` : message) + hint;
  box.hidden = false;
  window.lmlab.errors += 1;
}

function status(text) {
  $("status").textContent = text;
}

// ------------------------------------------------------------------------------------ controls

export function model() {
  return $("model").value;
}

export function modelInfo(name = model()) {
  return S.models.find((m) => m.id === name) || null;
}

function numberOf(id) {
  const raw = $(id).value.trim();
  if (raw === "") throw new ApiError(`${id.replace("_", " ")} is empty; type a number.`, id, 400);
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new ApiError(`${id} must be a number, got "${raw}".`, id, 400);
  return value;
}

// The settings as the controls say (raises ApiError for a field that is not a number).
export function settings() {
  const out = {};
  for (const k of KNOBS) out[k] = numberOf(k);
  out.ignore_eos = $("ignore_eos").checked;
  out.greedy = $("greedy").checked;
  const seed = $("seed").value.trim();
  out.seed = seed === "" ? null : numberOf("seed");
  return out;
}

// The sampling fields of /v1/completions and /lab/* (greedy = temperature 0).
export function sampling(st) {
  return {
    temperature: st.greedy ? 0 : st.temperature,
    top_k: st.top_k,
    top_p: st.top_p,
    min_p: st.min_p,
    repetition_penalty: st.repetition_penalty,
    presence_penalty: st.presence_penalty,
    frequency_penalty: st.frequency_penalty,
  };
}

// The /lab/prompt body for the prompt box (for `name`, another model, in the side-by-side view).
export function promptRequest(name = model()) {
  const mode = $("mode").value;
  const body = { model: name, text: $("prompt").value, mode: mode === "few-shot" ? "base" : mode };
  if ((mode === "chat" || mode === "fake-chat") && $("system").value.trim()) body.system = $("system").value;
  if (mode === "few-shot") {
    body.shots = $("shots")
      .value.split("\n")
      .map((line) => line.split("=>"))
      .filter((parts) => parts.length === 2 && parts[0].trim())
      .map(([q, a]) => [q.trim(), a.trim()]);
  }
  return body;
}

// The prompt as token ids (asks /lab/prompt unless the last answer was for the same inputs).
export async function promptIds() {
  if (S.forced) return S.forced; // a reopened run: its recorded prompt ids, as they were
  const body = promptRequest();
  const key = JSON.stringify(body);
  if (!S.prompt || S.prompt.key !== key) {
    const answer = await api("/lab/prompt", body);
    S.prompt = { ...answer, key };
    views.renderTokenizer(S.prompt);
  }
  return S.prompt;
}

let countTimer = null;
function promptChanged(event) {
  if (event && event.isTrusted) S.forced = null; // the user edited the prompt of a reopened run
  clearTimeout(countTimer);
  countTimer = setTimeout(async () => {
    try {
      const p = await promptIds();
      $("token-count").textContent = `${p.count} token${p.count === 1 ? "" : "s"}`;
      if (errorFrom === "prompt") showError(null);
    } catch (e) {
      $("token-count").textContent = "";
      showError(e, "prompt");
    }
  }, 250);
  saveUrl();
}

function modeChanged(event) {
  if (event && event.isTrusted) S.forced = null;
  const mode = $("mode").value;
  $("system-row").hidden = !(mode === "chat" || mode === "fake-chat");
  $("shots-row").hidden = mode !== "few-shot";
  promptChanged();
}

function bindKnobs() {
  for (const k of KNOBS) {
    const range = $(`${k}-range`);
    const box = $(k);
    range.addEventListener("input", () => {
      box.value = range.value;
      saveUrl();
    });
    box.addEventListener("input", () => {
      if (box.value !== "" && Number.isFinite(Number(box.value))) range.value = box.value;
      saveUrl();
    });
  }
  for (const id of ["seed", "ignore_eos", "greedy", "system", "shots"]) $(id).addEventListener("input", saveUrl);
  $("greedy").addEventListener("change", () => {
    $("temperature").disabled = $("temperature-range").disabled = $("greedy").checked;
  });
}

function setBusy(busy) {
  S.busy = busy;
  window.lmlab.busy = busy;
  $("stop").disabled = !busy;
  for (const id of ["generate", "regenerate", "step"]) $(id).disabled = busy;
}

// ------------------------------------------------------------------------------------ generation

function current() {
  return S.tree ? S.tree.nodes[S.tree.current] : null;
}

function idsOf(node, upTo = node.tokens.length) {
  return node.promptIds.concat(node.tokens.slice(0, upTo).map((t) => t.id));
}

// Stream a completion continuing `node` (from its full ids) and append the tokens to it.
async function extend(node, maxTokens, seed) {
  const st = node.settings;
  const body = {
    model: node.model,
    prompt: idsOf(node),
    max_tokens: maxTokens,
    ...sampling(st),
    ignore_eos: st.ignore_eos,
    seed,
    logprobs: 5,
    return_token_ids: true,
  };
  if (node.stop && node.stop.length) body.stop = node.stop; // fake chat: stop where the next turn would begin
  S.abort = new AbortController();
  setBusy(true);
  showError(null);
  status("generating…");
  const sent = Date.now();
  const first = node.tokens.length;
  try {
    await streamCompletion(
      body,
      (choice) => {
        const extra = choice.lmlab || {};
        for (const t of extra.tokens || []) {
          const tok = { ...t, received: Date.now() };
          node.tokens.push(tok);
          if (node === current()) appendToken(node, node.tokens.length - 1);
          tok.shown = Date.now();
        }
        if (extra.run_id) node.runId = window.lmlab.lastRunId = extra.run_id;
        if (choice.finish_reason) node.finish = choice.finish_reason;
      },
      { signal: S.abort.signal },
    );
    status(node.finish === "length" ? "done (max tokens reached)" : `done (${node.finish || "end"})`);
  } catch (e) {
    if (e.name === "AbortError") {
      node.finish = "stopped";
      status("stopped");
    } else {
      showError(e);
      status("");
    }
  } finally {
    S.abort = null;
    setBusy(false);
  }
  S.stats = liveStats(node, sent, first, body.prompt.length);
  window.lmlab.stats = S.stats;
  window.lmlab.generations += 1;
  views.renderStats(S.stats, S.inside);
  renderBranches();
  saveUrl();
}

// TTFT, prefill and decode speed from the stream's t_ms (the server's clock at sampling) and
// the arrival times here (the same machine's clock); `lag`: sampled -> shown on the page.
function liveStats(node, sent, first, promptTokens) {
  const toks = node.tokens.slice(first);
  if (!toks.length) return null;
  const t0 = toks[0].t_ms;
  const tn = toks[toks.length - 1].t_ms;
  const lags = toks.map((t) => t.shown - t.t_ms).sort((a, b) => a - b);
  return {
    tokens: toks.length,
    prompt_tokens: promptTokens,
    ttft_ms: toks[0].shown - sent,
    prefill_tok_s: t0 > sent ? promptTokens / ((t0 - sent) / 1000) : null,
    decode_tok_s: toks.length > 1 && tn > t0 ? (toks.length - 1) / ((tn - t0) / 1000) : null,
    lag_ms_mean: lags.reduce((a, b) => a + b, 0) / lags.length,
    lag_ms_p95: lags[Math.min(lags.length - 1, Math.floor(0.95 * lags.length))],
    lag_ms_max: lags[lags.length - 1],
    lags,
  };
}

function newSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

// A new tree from the prompt box: its root generation. `again`: the root of the current tree
// (its prompt and settings as they were), for Regenerate.
export async function generate({ maxTokens = null, again = null } = {}) {
  if (S.busy) return;
  let st;
  let p;
  try {
    st = again ? again.settings : settings();
    p = again ? { ids: again.promptIds, text: again.promptText, stop: again.stop } : await promptIds();
  } catch (e) {
    showError(e);
    return;
  }
  // Regenerate with no seed typed draws a new one; a typed seed gives the same tokens again.
  const typed = $("seed").value.trim();
  const seed = again ? (typed === "" ? newSeed() : again.seed) : st.seed === null ? newSeed() : st.seed;
  const root = {
    id: 0,
    parent: null,
    at: null,
    model: again ? again.model : model(),
    promptIds: p.ids,
    promptText: p.text,
    stop: p.stop || [],
    tokens: [],
    settings: st,
    seed,
    runId: null,
    finish: null,
  };
  S.tree = { nodes: [root], current: 0 };
  S.sel = null;
  $("inside").hidden = true;
  $("alts").hidden = true;
  renderOutput();
  await extend(root, maxTokens ?? st.max_tokens, seed);
}

// Branch: continue from the ids up to token `index` of the current node, then `alt`.
export async function branch(index, alt) {
  const parent = current();
  if (!parent || S.busy) return;
  const base = parent.tokens[index];
  const tok = { id: alt[0], text: alt[1], logprob: alt[2], entropy: base.entropy, top: base.top, branched: true };
  const node = {
    ...parent,
    id: S.tree.nodes.length,
    parent: parent.id,
    at: index,
    tokens: parent.tokens.slice(0, index).concat([tok]),
    runId: null,
    finish: null,
  };
  S.tree.nodes.push(node);
  S.tree.current = node.id;
  S.sel = null;
  $("inside").hidden = true;
  renderOutput();
  const left = Math.max(1, node.settings.max_tokens - index - 1);
  await extend(node, left, node.seed);
}

// Step one token: one more token from where the current output is (a new tree if none).
async function stepOne() {
  const node = current();
  if (!node) return generate({ maxTokens: 1 });
  // A different seed per step (the seed plus the tokens so far), so stepping is reproducible.
  await extend(node, 1, node.seed + node.tokens.length);
}

// ------------------------------------------------------------------------------------ output view

function tokenSpan(node, i) {
  const t = node.tokens[i];
  const p = Math.exp(t.logprob);
  const span = el("span", {
    class: `tok${t.branched ? " branched" : ""}${S.sel === i ? " selected" : ""}${t.text.includes("\n") ? " nl" : ""}`,
    tabindex: 0,
    title: `p = ${pct(p)}`,
    dataset: { index: i, id: t.id, prob: p.toFixed(6) },
  });
  span.textContent = t.text; // textContent only: model text is never HTML
  span.style.background = probColour(p);
  span.addEventListener("mouseenter", () => showAlts(i));
  span.addEventListener("focus", () => showAlts(i));
  span.addEventListener("click", () => select(i));
  span.addEventListener("keydown", (e) => e.key === "Enter" && select(i));
  return span;
}

function appendToken(node, i) {
  $("output").append(tokenSpan(node, i));
}

export function renderOutput() {
  const out = $("output");
  out.replaceChildren();
  const node = current();
  if (!node) return;
  out.append(el("span", { class: "prompt-text" }, node.promptText));
  node.tokens.forEach((_, i) => appendToken(node, i));
}

function showAlts(i) {
  const node = current();
  const t = node.tokens[i];
  const panel = $("alts");
  panel.hidden = false;
  const alts = (t.top || []).map(([id, text, lp]) =>
    el(
      "button",
      {
        type: "button",
        class: `alt${id === t.id ? " chosen" : ""}`,
        dataset: { id },
        title: id === t.id ? "the sampled token" : "branch: continue from this token instead",
        onclick: () => {
          if (id !== t.id) branch(i, [id, text, lp]);
        },
      },
      el("span", { class: "alt-text" }, visible(text)),
      el("span", { class: "alt-p" }, pct(Math.exp(lp))),
    ),
  );
  panel.replaceChildren(
    el(
      "p",
      {},
      "Token ",
      el("b", {}, `#${i}`),
      " ",
      el("code", { class: "alt-token" }, visible(t.text)),
      ` sampled with p = ${pct(Math.exp(t.logprob))}; entropy ${t.entropy?.toFixed(2) ?? "?"} nats. `,
      "Alternatives (click one to branch):",
    ),
    el("div", { id: "alt-list", class: "alts" }, alts),
  );
}

function depth(node) {
  let d = 0;
  for (let n = node; n.parent !== null; n = S.tree.nodes[n.parent]) d++;
  return d;
}

function renderBranches() {
  const panel = $("branches");
  if (!S.tree || S.tree.nodes.length < 2) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  const items = S.tree.nodes.map((n) => {
    const label =
      n.parent === null
        ? "original"
        : `branch at token #${n.at}: ${visible(n.tokens[n.at].text)} (instead of ${visible(
            S.tree.nodes[n.parent].tokens[n.at]?.text ?? "?",
          )})`;
    const preview = n.tokens
      .slice(n.at ?? 0)
      .map((t) => t.text)
      .join("")
      .slice(0, 60);
    return el(
      "li",
      { style: `margin-left: ${depth(n) * 1.2}em` },
      el(
        "button",
        {
          type: "button",
          class: `branch${n.id === S.tree.current ? " active" : ""}`,
          dataset: { node: n.id },
          onclick: () => {
            S.tree.current = n.id;
            S.sel = null;
            $("inside").hidden = true;
            renderOutput();
            renderBranches();
            saveUrl();
          },
        },
        label,
      ),
      el("span", { class: "muted" }, ` ${preview}…`),
    );
  });
  panel.replaceChildren(el("h3", {}, "Branches"), el("ul", { id: "branch-list" }, items));
}

// Click a token: look inside the forward pass that produced it.
export async function select(i) {
  const node = current();
  if (!node || !node.tokens[i]) return;
  S.sel = i;
  for (const span of $("output").querySelectorAll(".tok")) {
    span.classList.toggle("selected", Number(span.dataset.index) === i);
  }
  saveUrl();
  const panel = $("inside");
  panel.hidden = false;
  panel.replaceChildren(el("p", { class: "muted" }, "looking inside…"));
  const ids = idsOf(node, i + 1);
  try {
    const data = await api("/lab/inside", {
      model: node.model,
      ids,
      position: ids.length - 1,
      k: 10,
      sampling: sampling(node.settings),
    });
    S.inside = window.lmlab.inside = data;
    const counts = new Map();
    for (const id of ids.slice(0, -1)) counts.set(id, (counts.get(id) || 0) + 1);
    showInside(panel, data, { token: node.tokens[i], index: i, settings: node.settings, counts, seed: node.seed });
    views.renderStats(S.stats, S.inside);
  } catch (e) {
    panel.replaceChildren();
    panel.hidden = true;
    showError(e);
  }
}

// ------------------------------------------------------------------------------------ the URL

export function saveUrl() {
  if (restoring) return;
  const q = new URLSearchParams();
  q.set("model", model());
  q.set("prompt", $("prompt").value);
  q.set("mode", $("mode").value);
  if (!$("system-row").hidden && $("system").value) q.set("system", $("system").value);
  if ($("mode").value === "few-shot") q.set("shots", $("shots").value);
  for (const k of KNOBS) q.set(k, $(k).value);
  if ($("ignore_eos").checked) q.set("ignore_eos", "1");
  if ($("greedy").checked) q.set("greedy", "1");
  if (S.forced) q.set("ids", S.forced.ids.join(","));
  const node = current();
  const seed = $("seed").value.trim() || (node ? String(node.seed) : "");
  if (seed) q.set("seed", seed);
  if (node) {
    q.set("go", "1");
    const path = [];
    for (let n = node; n.parent !== null; n = S.tree.nodes[n.parent]) path.unshift(`${n.at}.${n.tokens[n.at].id}`);
    if (path.length) q.set("br", path.join(","));
    if (S.sel !== null) q.set("sel", String(S.sel));
  }
  q.set("view", S.view);
  if (S.view === "attention") {
    q.set("layer", $("attn-layer").value);
    q.set("head", $("attn-head").value);
  }
  history.replaceState(null, "", `?${q.toString()}`);
}

// The page's state until restore() has read the URL: nothing writes the URL before that.
let restoring = true;
const OPENED_WITH = new URLSearchParams(location.search);

async function restore() {
  let q = OPENED_WITH;
  if (q.get("run")) {
    try {
      q = await views.paramsOfRun(q.get("run"), true);
    } catch (e) {
      restoring = false;
      showError(e);
      return;
    }
  }
  if (q.get("model") && modelInfo(q.get("model"))) $("model").value = q.get("model");
  if (q.has("prompt")) $("prompt").value = q.get("prompt");
  if (q.get("mode")) $("mode").value = q.get("mode");
  if (q.has("system")) $("system").value = q.get("system");
  if (q.has("shots")) $("shots").value = q.get("shots");
  for (const k of KNOBS) {
    if (q.has(k)) {
      $(k).value = q.get(k);
      $(`${k}-range`).value = q.get(k);
    }
  }
  $("ignore_eos").checked = q.get("ignore_eos") === "1";
  $("greedy").checked = q.get("greedy") === "1";
  $("greedy").dispatchEvent(new Event("change"));
  if (q.has("seed")) $("seed").value = q.get("seed");
  modeChanged();
  if (q.get("ids")) {
    const ids = q.get("ids").split(",").map(Number);
    S.forced = { ids, text: q.get("prompt") || "", count: ids.length, pieces: null };
  }
  const view = q.get("view");
  restoring = false;
  if (q.get("go") === "1") {
    await generate();
    for (const step of (q.get("br") || "").split(",").filter(Boolean)) {
      const [at, id] = step.split(".").map(Number);
      const node = current();
      const tok = node && node.tokens[at];
      const alt = tok && (tok.top || []).find((a) => a[0] === id);
      if (!alt) break;
      await branch(at, alt);
    }
    if (q.has("sel") && current()) await select(Number(q.get("sel")));
    if (q.get("run")) views.checkReopened(current());
  }
  for (const [key, id] of [
    ["layer", "attn-layer"],
    ["head", "attn-head"],
  ]) {
    if (q.has(key)) $(id).value = q.get(key);
  }
  setView(VIEWS.includes(view) ? view : "output");
  saveUrl();
}

// ------------------------------------------------------------------------------------ views

export function setView(view) {
  S.view = view;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  views.opened(view);
  saveUrl();
}

export function currentIds() {
  const node = current();
  return node ? idsOf(node) : S.prompt ? S.prompt.ids : null;
}

export function currentNode() {
  return current();
}

async function loadModels() {
  const chosen = $("model").value || OPENED_WITH.get("model");
  S.models = (await api("/lab/models")).models;
  $("model").replaceChildren(...S.models.map((m) => el("option", { value: m.id }, `${m.id} (${m.state})`)));
  if (chosen && modelInfo(chosen)) $("model").value = chosen;
  modelChanged();
  // While a model loads, look again every 2 s (its state and memory change when it is ready).
  if (S.models.some((m) => m.state === "loading")) {
    setTimeout(() => loadModels().then(() => promptChanged(), showError), 2000);
  }
}

function modelChanged() {
  const m = modelInfo();
  if (!m) return;
  const mem = m.memory_bytes ? `, ${(m.memory_bytes / 2 ** 20).toFixed(0)} MiB` : "";
  const shape = m.n_layers ? `, ${m.n_layers} layers × ${m.n_heads} heads` : "";
  $("model-info").textContent = `${m.state}${mem}${shape}${m.family ? `, ${m.family}` : ""}`;
  views.modelChanged(m);
}

async function main() {
  bindKnobs();
  $("prompt").addEventListener("input", promptChanged);
  $("mode").addEventListener("change", modeChanged);
  $("model").addEventListener("change", () => {
    S.prompt = null;
    modelChanged();
    promptChanged();
  });
  $("generate").addEventListener("click", () => generate());
  $("regenerate").addEventListener("click", () => generate({ again: S.tree ? S.tree.nodes[0] : null }));
  $("step").addEventListener("click", stepOne);
  $("stop").addEventListener("click", () => S.abort && S.abort.abort());
  $("share").addEventListener("click", async () => {
    saveUrl();
    try {
      await navigator.clipboard.writeText(location.href);
      status("link copied");
    } catch (_) {
      status("copy the address bar to share this view");
    }
  });
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => setView(b.dataset.view));
  $("api-key").addEventListener("change", () => {
    setApiKey($("api-key").value.trim());
    showError(null);
    loadModels()
      .then(() => promptChanged())
      .catch(showError);
  });
  views.init();
  try {
    await loadModels();
  } catch (e) {
    showError(e);
  }
  document.body.dataset.ready = "1";
  window.lmlab.readyAt = Date.now(); // benchmarks/playground_speed.py: interactive this long after the URL
  window.lmlab.ready = true;
  promptChanged();
  await restore();
}

main();
