// Talking to lmlab serve: JSON calls, the streamed completion, and the server's errors.
//
// Every call goes to the server that served this page. Errors come back as the server's own
// JSON ({"error": {"message", "param", ...}}) and are raised as ApiError with that message, so
// the page can show the sentence the server wrote.

export class ApiError extends Error {
  constructor(message, param = null, status = 0) {
    super(message);
    this.param = param;
    this.status = status;
  }
}

// A server started with --api-key wants "Authorization: Bearer KEY" on every call; the page asks
// for the key once and keeps it for this tab only (sessionStorage).
const KEY = "lmlab-api-key";
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  const out = { "X-Lmlab-Client": "playground", ...extra };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      param = body.error.param || null;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  return new ApiError(message, param, response.status);
}

// GET (body undefined) or POST a JSON body; returns the parsed JSON answer.
export async function api(path, body, { signal } = {}) {
  const init = { signal, headers: headers() };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST /v1/completions with stream: true; calls onChunk(choice, arrivalMs) for every streamed
// choice (arrivalMs: Date.now() when its event was read, the same clock as the server's t_ms).
// Resolves once the stream ends with [DONE]; rejects with ApiError (or AbortError after Stop).
export async function streamCompletion(body, onChunk, { signal } = {}) {
  const response = await fetch("/v1/completions", {
    method: "POST",
    signal,
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new ApiError(payload.error.message, payload.error.param || null, 500);
        for (const choice of payload.choices || []) onChunk(choice, Date.now());
      }
    }
  }
}
