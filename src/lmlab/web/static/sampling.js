// The sampling chain in the browser, for re-sampling a token from the logits /lab/inside sent
// (its `candidates`: the 200 largest raw logits) without running the model again.
//
// Same order as lmlab's engine (src/lmlab/engine/sampling.py): penalties -> temperature ->
// top-k -> top-p -> min-p -> draw. A filter removes a token (logit -Infinity); softmax
// renormalises. Tokens outside the 200 candidates are left out, which changes the
// probabilities by the tiny mass they held.

export function softmax(logits) {
  const max = Math.max(...logits.filter(Number.isFinite));
  const exps = logits.map((x) => (Number.isFinite(x) ? Math.exp(x - max) : 0));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / sum);
}

// counts: Map id -> how often it occurs in the context (prompt and generated so far).
export function applyPenalties(cands, counts, { repetition_penalty = 1, presence_penalty = 0, frequency_penalty = 0 }) {
  return cands.map((c) => {
    const n = counts.get(c.id) || 0;
    let x = c.logit;
    if (n > 0 && repetition_penalty !== 1) x = x < 0 ? x * repetition_penalty : x / repetition_penalty;
    x -= frequency_penalty * n + presence_penalty * (n > 0 ? 1 : 0);
    return { ...c, logit: x };
  });
}

// Every stage of the chain over the candidates: [{name, kept, logits}] and the final probs.
export function chain(candidates, settings, counts = new Map()) {
  const greedy = settings.temperature === 0;
  const stages = [];
  let cands = candidates.map((c) => ({ ...c }));
  const keep = (name) => stages.push({ name, kept: cands.filter((c) => Number.isFinite(c.logit)).length, cands });
  keep("logits");
  cands = applyPenalties(cands, counts, settings);
  keep("penalties");
  if (greedy) {
    const best = cands.reduce((a, b) => (b.logit > a.logit ? b : a));
    cands = cands.map((c) => ({ ...c, logit: c === best ? c.logit : -Infinity }));
    keep("greedy");
  } else {
    const t = settings.temperature ?? 1;
    cands = cands.map((c) => ({ ...c, logit: c.logit / t }));
    keep("temperature");
    const k = settings.top_k || 0;
    if (k > 0 && k < cands.length) {
      const order = [...cands.keys()].sort((a, b) => cands[b].logit - cands[a].logit || a - b);
      const kept = new Set(order.slice(0, k));
      cands = cands.map((c, i) => (kept.has(i) ? c : { ...c, logit: -Infinity }));
    }
    keep("top_k");
    const p = settings.top_p ?? 1;
    if (p < 1) {
      const probs = softmax(cands.map((c) => c.logit));
      const order = [...cands.keys()].sort((a, b) => probs[b] - probs[a] || a - b);
      let before = 0;
      const removed = new Set();
      for (const i of order) {
        if (before >= p) removed.add(i); // the token that makes the mass reach p is kept
        before += probs[i];
      }
      cands = cands.map((c, i) => (removed.has(i) ? { ...c, logit: -Infinity } : c));
    }
    keep("top_p");
    const minP = settings.min_p || 0;
    if (minP > 0) {
      const probs = softmax(cands.map((c) => c.logit));
      const top = Math.max(...probs);
      cands = cands.map((c, i) => (probs[i] < minP * top ? { ...c, logit: -Infinity } : c));
    }
    keep("min_p");
  }
  const probs = softmax(cands.map((c) => c.logit));
  return { stages, final: cands.map((c, i) => ({ id: c.id, text: c.text, prob: probs[i] })) };
}

// A small seeded generator (mulberry32), so a re-sample with the same seed draws the same token.
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function draw(final, random) {
  let u = random();
  for (const c of final) {
    if (c.prob <= 0) continue;
    u -= c.prob;
    if (u < 0) return c;
  }
  return final.reduce((a, b) => (b.prob > a.prob ? b : a));
}
