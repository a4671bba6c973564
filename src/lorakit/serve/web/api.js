// Talking to the server: the API key, JSON requests, and server-sent event streams.

const KEY = "lorakit.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const out = {};
  if (apiKey()) out.Authorization = `Bearer ${apiKey()}`;
  if (json) out["content-type"] = "application/json";
  return out;
}

async function failure(response) {
  const text = await response.text();
  let message = text || response.statusText;
  try {
    const data = JSON.parse(text);
    message = data?.error?.message || data?.detail || message;
  } catch {
    // not JSON: the text itself
  }
  return new ApiError(response.status, `${response.status}: ${message}`);
}

// A JSON request; throws ApiError with the server's message on a non-2xx answer.
export async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// POST with "stream": true; yields each parsed event until [DONE].
export async function* stream(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(event.error.code, event.error.message);
        yield event;
      }
    }
  }
}

// Prometheus text (the server's /metrics) as {name: total over its labels}.
export async function serverMetrics() {
  const response = await fetch("/metrics");
  if (!response.ok) throw await failure(response);
  const totals = {};
  for (const line of (await response.text()).split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$/);
    if (!match) continue;
    totals[match[1]] = (totals[match[1]] || 0) + Number(match[3]);
  }
  return totals;
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}
