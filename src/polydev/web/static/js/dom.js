// Building the DOM from data without innerHTML: everything the API returns is inserted as text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// "3 min ago"-style ages, for tables that re-render them every second.
export function age(iso, now = Date.now()) {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// Bytes as "2.0 MB".
export function size(n) {
  let value = n;
  for (const unit of ["B", "KB", "MB", "GB"]) {
    if (value < 1024 || unit === "GB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${n} B`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

// A message line whose changes screen readers announce.
export function notice(kind = "info") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", hidden: true });
}

export function say(el, text, kind) {
  if (kind) el.className = `notice ${kind}`;
  el.textContent = text || "";
  el.hidden = !text;
}

// A list kept current: `fetch(signal)` every `ms`, `draw(rows)` only when the answer changed (so a button is not
// swapped out from under the pointer), failures said in `message`. Returns { load, stop }: load() now.
export function poller(fetch, draw, message, signal, ms = 3000) {
  let last = null;
  let timer = null;
  async function load() {
    clearTimeout(timer);
    try {
      const fresh = await fetch(signal);
      const text = JSON.stringify(fresh);
      if (text !== last) { last = text; draw(fresh); }
    } catch (e) {
      if (e.name === "AbortError") return;
      say(message, e.message, "error");
    }
    timer = setTimeout(load, ms);
  }
  return { load, stop: () => clearTimeout(timer) };
}
