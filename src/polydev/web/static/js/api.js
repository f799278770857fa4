// The JSON API from the page. The token lives in this tab's sessionStorage and goes out only as an
// Authorization header (never in a URL, never in a cookie), on fetch() calls to this origin.

const KEY = "polydev.token";

export const PROVIDERS = [
  { id: "claude_code", name: "Claude Code", methods: ["browser"] },
  { id: "codex", name: "Codex", methods: ["browser", "device"] },
  { id: "gemini_cli", name: "Gemini CLI", methods: ["browser"] },
];
export const providerName = (id) => PROVIDERS.find((p) => p.id === id)?.name || id;

export const SESSION_TERMINAL = ["completed", "failed", "timeout", "cancelled"];
export const RUN_TERMINAL = ["succeeded", "failed", "cancelled", "timeout"];

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message, body = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

// app.js sets this: a 401 anywhere means the token was revoked, so back to the sign-in page.
export const hooks = { unauthorized: () => {} };

function headers(extra = {}) {
  const t = token.get();
  return { ...(t ? { Authorization: `Bearer ${t}` } : {}), ...extra };
}

async function failure(res, signOutOn401 = true) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: a proxy's page */ }
  const err = body?.error || {};
  const error = new ApiError(res.status, err.code || "error", err.message || `HTTP ${res.status}`, body);
  if (res.status === 401 && signOutOn401) hooks.unauthorized(error);
  return error;
}

async function send(path, init) {
  try {
    // credentials: "omit": nothing but the header authenticates these calls.
    return await fetch(path, { cache: "no-store", credentials: "omit", ...init });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "unreachable", "cannot reach the Polydev server");
  }
}

export async function api(method, path, body, { signal, signOutOn401 = true } = {}) {
  const init = { method, signal, headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await send(path, init);
  if (!res.ok) throw await failure(res, signOutOn401);
  return res.status === 204 ? null : res.json();
}

// A call whose body or answer is not JSON (an upload, a diff, an archive): the Response, or ApiError.
export async function request(method, path, { body, type, accept = "*/*", signal } = {}) {
  const init = { method, signal, headers: headers({ Accept: accept, ...(type ? { "Content-Type": type } : {}) }) };
  if (body !== undefined) init.body = body;
  const res = await send(path, init);
  if (!res.ok) throw await failure(res);
  return res;
}

// An authenticated download (the token is a header, so no plain link can fetch it): read as a blob, then
// saved under the name the server gives (Content-Disposition) or `fallback`.
export async function download(path, fallback, { signal } = {}) {
  const res = await request("GET", path, { signal });
  const name = /filename="([^"/\\]+)"/.exec(res.headers.get("Content-Disposition") || "")?.[1] || fallback;
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return name;
}

// A module from the server's vendor directory (`polydev web vendor`); when it is missing, the error says
// why: the server answers a JSON error naming the fix.
export async function importVendored(path, what) {
  try {
    return await import(path);
  } catch {
    let reason = `${what} could not be loaded`;
    try {
      const res = await fetch(path, { credentials: "omit" });
      if (!res.ok) reason = (await res.json()).error?.message || reason;
    } catch { /* unreachable: keep the generic reason */ }
    throw new Error(reason);
  }
}

// A same-origin address as a WebSocket URL (ws: or wss:, as the page is http: or https:).
export function wsUrl(url) {
  const u = new URL(url, location.href);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  return u;
}

// Server-sent events over fetch (EventSource cannot send the Authorization header): calls onEvent with
// {id, event, data} for each event until the server ends the stream; throws ApiError for an error answer.
export async function readEvents(path, { signal, lastEventId, onEvent }) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId != null) extra["Last-Event-ID"] = String(lastEventId);
  const res = await send(path, { signal, headers: headers(extra) });
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line === "") {  // end of one event
        if (event.data.length) onEvent({ id: event.id, event: event.event, data: event.data.join("\n") });
        event = { id: null, event: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;  // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") event.data.push(val);
      else if (field === "event") event.event = val;
      else if (field === "id") event.id = val;
    }
  }
}

// A run's events from after `after`, live until the run ends. A dropped connection resumes where it
// stopped (Last-Event-ID), so nothing is shown twice or missed.
export async function followRun(runId, { signal, onEvent, after = -1 }) {
  let last = after;
  for (let failures = 0; ; ) {
    try {
      await readEvents(`/api/runs/${runId}/events`, {
        signal, lastEventId: last >= 0 ? last : null,  // an event id is never negative: -1 means from the start
        onEvent: (ev) => { last = Number(ev.id); failures = 0; onEvent(JSON.parse(ev.data)); },
      });
      return;
    } catch (e) {
      if (e instanceof ApiError && e.status !== 0) throw e;
      if (e.name === "AbortError" || ++failures > 5) throw e;
      await sleep(300 * failures, signal);
    }
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); reject(new DOMException("aborted", "AbortError")); });
  });
}
