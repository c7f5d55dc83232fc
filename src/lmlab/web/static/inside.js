// "This token, inside": what /lab/inside returns for one generated token, drawn.
//
// - the logit lens column: each layer's top guesses for the next token at that position;
// - the attention row of that position, per layer and head;
// - the sampling chain the server ran (logits -> penalties -> temperature -> top-k -> top-p ->
//   min-p -> sampled), with what each stage cut;
// - re-sampling in the browser: change the chain's settings and draw again from the stored
//   candidates (sampling.js), without running the model.

import { el, heatmap, pct, visible } from "./draw.js";
import { chain, draw, rng } from "./sampling.js";

function chip(t, { mark = null, p = t.prob } = {}) {
  return el(
    "span",
    { class: `chip${mark !== null && t.id === mark ? " hit" : ""}`, dataset: { id: t.id } },
    el("span", { class: "chip-text" }, visible(t.text)),
    p === undefined ? null : el("span", { class: "chip-p" }, pct(p)),
  );
}

function lensTable(table, lens, mark, nLayers) {
  table.replaceChildren(
    el("tr", {}, el("th", {}, "layer"), el("th", {}, "top guesses")),
    ...lens.map((row) =>
      el(
        "tr",
        {},
        el("td", {}, row.layer === nLayers - 1 ? `${row.layer} (output)` : String(row.layer)),
        el(
          "td",
          {},
          row.top.slice(0, 4).map((t) => chip(t, { mark })),
        ),
      ),
    ),
  );
}

export { lensTable };

function timingLine(timing) {
  if (!timing) return "";
  const { forward_ms: f, capture_ms: c } = timing;
  const d = f > 0 ? (100 * (c - f)) / f : null;
  const extra = d === null ? "" : ` (${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(0)}%)`;
  return `Looking costs: this forward took ${f.toFixed(1)} ms plain and ${c.toFixed(1)} ms with attention and the residual stream captured${extra}.`;
}

export function showInside(panel, data, ctx) {
  const { token, index, settings } = ctx;
  const nLayers = data.attention ? data.attention.layers : data.lens.length;
  const sampled = data.chain.sampled;

  // -- the sampling chain, as the server ran it
  const chainTable = el(
    "table",
    { id: "chain", class: "chain" },
    el(
      "tr",
      {},
      el("th", {}, "stage"),
      el("th", {}, "tokens still possible"),
      el("th", {}, "cut here"),
      el("th", {}, "top after this stage"),
    ),
    data.chain.stages.map((s, i) =>
      el(
        "tr",
        { dataset: { stage: s.name } },
        el("td", {}, s.name),
        el("td", { class: "num" }, String(s.kept)),
        el("td", { class: "num" }, i === 0 ? "" : String(data.chain.stages[i - 1].kept - s.kept)),
        el(
          "td",
          {},
          s.top.slice(0, 6).map((t) => chip(t, { mark: sampled.id })),
        ),
      ),
    ),
  );

  // -- the attention row of this position, per layer (rows) and head
  const attnCanvas = el("canvas", { id: "inside-attn", width: 720, height: 400 });

  // -- re-sampling from the candidates
  const knob = (name, value, step) =>
    el(
      "label",
      {},
      `${name} `,
      el("input", { id: `rs-${name}`, type: "number", step, value: String(value), class: "small" }),
    );
  const rsOut = el("div", { id: "rs-chain" });
  const rsDrawn = el("span", { id: "rs-drawn", class: "chip" });
  const resampler = el(
    "div",
    { class: "resample" },
    el("h4", {}, "Re-sample here (in the browser, from the 200 most likely raw logits)"),
    el(
      "div",
      { class: "row" },
      knob("temperature", settings.greedy ? 0 : settings.temperature, "any"),
      knob("top_k", settings.top_k, "1"),
      knob("top_p", settings.top_p, "any"),
      knob("min_p", settings.min_p, "any"),
      knob("seed", ctx.seed ?? 0, "1"),
      el("button", { id: "rs-draw", type: "button" }, "Draw"),
    ),
    rsOut,
    el("p", {}, "drawn: ", rsDrawn),
  );

  panel.replaceChildren(
    el(
      "h3",
      {},
      `Inside token #${index}: `,
      el("code", { id: "inside-token" }, visible(token.text)),
      el("span", { class: "muted" }, ` (id ${token.id})`),
    ),
    el(
      "p",
      { class: "muted", id: "inside-cost" },
      timingLine(data.timing),
    ),
    el(
      "div",
      { class: "side" },
      el(
        "div",
        {},
        el("h4", {}, "Logit lens: each layer's guess for this token"),
        el("table", { id: "lens", class: "lens" }),
      ),
      el(
        "div",
        {},
        el("h4", {}, "Sampling chain"),
        chainTable,
        el(
          "p",
          {},
          "sampled: ",
          el(
            "span",
            { id: "chain-sampled", class: "chip hit", dataset: { id: sampled.id } },
            visible(sampled.text),
          ),
          ` with p = ${pct(sampled.prob)}`,
        ),
        resampler,
      ),
    ),
    el("h4", {}, "Attention of this position: one row per layer and head, one column per earlier token"),
    el(
      "p",
      { class: "muted" },
      "Each row is scaled to its largest weight. Rows are grouped by layer (layer 0 at the top).",
    ),
    attnCanvas,
  );
  lensTable(panel.querySelector("#lens"), data.lens, sampled.id, nLayers);

  if (data.attention) {
    const rows = [];
    const rowLabels = [];
    const heads = data.attention.heads;
    data.attention.rows.forEach((layer, l) => {
      layer.forEach((head, h) => {
        const max = Math.max(...head, 1e-12);
        if (h === 0) rowLabels.push([rows.length, `layer ${l}`]);
        rows.push(head.map((w) => w / max));
      });
    });
    const colLabels = (data.context.pieces || []).map((t, i) => [i, t]);
    heatmap(attnCanvas, rows, {
      width: 720,
      height: 90 + Math.max(2, Math.min(4, Math.floor(900 / rows.length))) * rows.length,
      rowLabels: rowLabels.filter((_, i) => i % Math.max(1, Math.round(12 / heads)) === 0),
      colLabels,
    });
  }

  const resample = () => {
    const value = (name) => Number(panel.querySelector(`#rs-${name}`).value);
    const s = {
      temperature: value("temperature"),
      top_k: value("top_k"),
      top_p: value("top_p"),
      min_p: value("min_p"),
      repetition_penalty: settings.repetition_penalty,
      presence_penalty: settings.presence_penalty,
      frequency_penalty: settings.frequency_penalty,
    };
    const result = chain(data.chain.candidates, s, ctx.counts);
    window.lmlab.resampled = result; // read by the browser tests
    const ranked = [...result.final].sort((a, b) => b.prob - a.prob).filter((c) => c.prob > 0);
    rsOut.replaceChildren(
      el(
        "p",
        {},
        result.stages.map((st) => `${st.name}: ${st.kept}`).join(" → "),
      ),
      el(
        "div",
        {},
        ranked.slice(0, 10).map((c) => chip(c, { mark: token.id })),
      ),
    );
    const picked = draw(result.final, rng(value("seed")));
    rsDrawn.replaceChildren(visible(picked.text));
    rsDrawn.dataset.id = picked.id;
  };
  for (const input of resampler.querySelectorAll("input")) input.addEventListener("input", resample);
  resampler.querySelector("#rs-draw").addEventListener("click", () => {
    const seed = panel.querySelector("#rs-seed");
    seed.value = String(Number(seed.value) + 1);
    resample();
  });
  resample();
}
