// Small drawing helpers: colours for probabilities, DOM building with text only, canvas plots.
//
// Text from the model or the user is only ever set with textContent (or drawn on a canvas),
// never parsed as HTML.

// el("span", {class: "tok", title: "..."}, "text or child", child...): a new element.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// How a token's text is shown in lists: whitespace made visible.
export function visible(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/^ /, "␣");
}

// Probability -> background colour: red (unlikely) through yellow to green (likely).
export function probColour(p) {
  const hue = Math.round(120 * Math.max(0, Math.min(1, p)) ** 0.5);
  return `hsl(${hue} 75% 80%)`;
}

export function pct(p) {
  if (p >= 0.995) return "100%";
  if (p >= 0.1) return `${(100 * p).toFixed(0)}%`;
  if (p >= 0.001) return `${(100 * p).toFixed(1)}%`;
  return `${(100 * p).toExponential(0)}%`;
}

// A weight in [0, 1] -> [r, g, b]: white to dark blue.
function blue(w) {
  const x = Math.max(0, Math.min(1, w)) ** 0.6;
  return [Math.round(255 - 225 * x), Math.round(255 - 180 * x), Math.round(255 - 60 * x)];
}

// Heatmap of rows[q][k] on a canvas, one cell per (q, k); cells that are null are drawn grey
// (outside the causal mask or the sliding window). Square cells fit in `size` pixels, or
// rectangular ones fill `width` x `height`. rowLabels / colLabels: [index, text] pairs drawn
// in the margins (a canvas draws text as pixels, never as HTML).
export function heatmap(canvas, rows, { size = 0, width = 0, height = 0, labels = null, rowLabels = null, colLabels = null } = {}) {
  const nq = rows.length;
  const nk = Math.max(1, ...rows.map((r) => r.length));
  if (labels) {
    rowLabels = labels.map((t, i) => [i, t]).filter(([i]) => i < nq);
    colLabels = labels.map((t, i) => [i, t]);
  }
  const left = rowLabels ? 90 : 0;
  const top = colLabels ? 90 : 0;
  let cw;
  let ch;
  if (width && height) {
    cw = Math.max(1, Math.floor((width - left) / nk));
    ch = Math.max(1, Math.floor((height - top) / nq));
  } else {
    const side = size || canvas.width;
    cw = ch = Math.max(1, Math.floor((side - Math.max(left, top)) / Math.max(nq, nk)));
  }
  canvas.width = left + cw * nk;
  canvas.height = top + ch * nq;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const image = ctx.createImageData(cw * nk, ch * nq);
  for (let q = 0; q < nq; q++) {
    for (let k = 0; k < nk; k++) {
      const w = rows[q][k];
      const [r, g, b] = w === null || w === undefined ? [235, 235, 235] : blue(w);
      for (let y = 0; y < ch; y++) {
        for (let x = 0; x < cw; x++) {
          const o = 4 * ((q * ch + y) * cw * nk + k * cw + x);
          image.data[o] = r;
          image.data[o + 1] = g;
          image.data[o + 2] = b;
          image.data[o + 3] = 255;
        }
      }
    }
  }
  ctx.putImageData(image, left, top);
  ctx.fillStyle = "#333";
  ctx.textBaseline = "middle";
  if (rowLabels) {
    ctx.font = `${Math.min(12, Math.max(8, ch))}px sans-serif`;
    ctx.textAlign = "right";
    const every = Math.ceil(10 / ch);
    for (const [i, text] of rowLabels) {
      if (i % every === 0) ctx.fillText(visible(String(text)).slice(0, 12), left - 4, top + i * ch + ch / 2);
    }
  }
  if (colLabels) {
    ctx.font = `${Math.min(12, Math.max(8, cw - 2))}px sans-serif`;
    ctx.textAlign = "left";
    const every = Math.ceil(10 / cw);
    for (const [i, text] of colLabels) {
      if (i % every !== 0) continue;
      ctx.save();
      ctx.translate(left + i * cw + cw / 2, top - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(visible(String(text)).slice(0, 12), 0, 0);
      ctx.restore();
    }
  }
}

// A line plot: series [{name, points: [[x, y], ...]}] with axis labels; log2 x when asked.
export function linePlot(canvas, series, { xLabel, yLabel, logX = false, yFormat = (v) => v.toPrecision(3) } = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = { l: 64, r: 12, t: 12, b: 40 };
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  const all = series.flatMap((s) => s.points);
  ctx.fillStyle = "#555";
  ctx.font = "12px sans-serif";
  if (!all.length) {
    ctx.fillText("no runs yet", W / 2 - 30, H / 2);
    return;
  }
  const fx = (x) => (logX ? Math.log2(x) : x);
  const xs = all.map((p) => fx(p[0]));
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1];
  const [y0, y1] = [0, Math.max(...ys) * (1.1 + 0.08 * series.length) || 1]; // headroom for the legend
  const X = (x) => pad.l + ((fx(x) - x0) / (x1 - x0 || 1)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#999";
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, H - pad.b);
  ctx.lineTo(W - pad.r, H - pad.b);
  ctx.stroke();
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    ctx.fillText(yFormat(v), pad.l - 4, Y(v) + 4);
  }
  ctx.textAlign = "center";
  // every x labelled, or about ten of them when there are many (the steps of a loss curve)
  const ticks = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
  const every = Math.ceil(ticks.length / 10);
  ticks.forEach((x, i) => (i % every === 0 || i === ticks.length - 1) && ctx.fillText(String(x), X(x), H - pad.b + 14));
  ctx.fillText(xLabel || "", (W + pad.l) / 2, H - 6);
  ctx.save();
  ctx.translate(12, H / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(yLabel || "", 0, 0);
  ctx.restore();
  const colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = colours[i % colours.length];
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    ctx.beginPath();
    pts.forEach(([x, y], j) => (j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    for (const [x, y] of pts) ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4);
    ctx.textAlign = "right";
    ctx.fillText(s.name, W - pad.r - 4, pad.t + 14 * (i + 1));
  });
}

// A bar per value (e.g. KL per position), values >= 0.
export function bars(canvas, values, { colour = "#d62728" } = {}) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!values.length) return;
  const max = Math.max(...values, 1e-9);
  const w = canvas.width / values.length;
  ctx.fillStyle = colour;
  values.forEach((v, i) => {
    const h = (Math.max(0, v) / max) * (canvas.height - 4);
    ctx.fillRect(i * w + 1, canvas.height - h, Math.max(1, w - 2), h);
  });
}
