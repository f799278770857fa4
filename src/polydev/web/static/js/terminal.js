// A workspace's terminal: a shell in its VM over a WebSocket, drawn by xterm.js (vendored by `polydev web
// vendor`; its lib/*.mjs are ES modules, imported with no bundler). A single-use ticket, not the token, goes in
// the socket's URL. Frames: binary from the server is the shell's output; binary to it is keystrokes (UTF-8);
// text to it is a JSON control message, {"type": "resize", "rows": R, "cols": C}. Closing the panel closes the
// socket; the workspace stays.

import { api, importVendored, wsUrl } from "./api.js";
import { h, replace } from "./dom.js";

const XTERM = "/app/vendor/xterm/lib/xterm.mjs";
const FIT = "/app/vendor/xterm-addon-fit/lib/addon-fit.mjs";
const XTERM_CSS = "/app/vendor/xterm/css/xterm.css";
const FONT = 'ui-monospace, "DejaVu Sans Mono", Menlo, monospace';

// The server's close codes (api/routes/workspaces.py).
const CLOSED = {
  1000: "The shell exited.",
  1008: "The terminal refused the ticket (invalid, expired or used).",
  1011: "The terminal lost its connection to the workspace's VM.",
  4404: "The workspace is not there, or not ready.",
  4409: "The workspace is busy or unavailable.",
};

let library = null;
function loadXterm() {
  if (!document.querySelector(`link[href="${XTERM_CSS}"]`)) {
    document.head.append(h("link", { rel: "stylesheet", href: XTERM_CSS }));
  }
  library ??= Promise.all([importVendored(XTERM, "xterm.js"), importVendored(FIT, "xterm.js's fit addon")])
    .then(([{ Terminal }, { FitAddon }]) => ({ Terminal, FitAddon }))
    .catch((e) => { library = null; throw e; });
  return library;
}

// xterm.js writes its sizes and colours into <style> elements, which the page's policy (style-src 'self')
// does not apply. Their text is xterm's own: it is copied into a constructed stylesheet, which the policy
// allows, whenever xterm changes it. Returns the undo.
function mirrorStyles(container) {
  const sheet = new CSSStyleSheet();
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  let last = null;
  const sync = () => {
    const text = [...container.querySelectorAll("style")].map((s) => s.textContent).join("\n");
    if (text !== last) { last = text; sheet.replaceSync(text); }
  };
  const isStyle = (n) => n?.nodeName === "STYLE";
  const observer = new MutationObserver((records) => {
    if (records.some((r) => isStyle(r.target) || isStyle(r.target.parentNode) || [...r.addedNodes].some(isStyle))) sync();
  });
  observer.observe(container, { subtree: true, childList: true, characterData: true });
  return () => {
    observer.disconnect();
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => s !== sheet);
  };
}

export function terminalPanel(workspaceId, { signal }) {
  const status = h("p", { class: "help", role: "status", "data-terminal": "closed" });
  const screen = h("div", { class: "term-screen", hidden: true, "aria-label": "Terminal" });
  const actions = h("div", { class: "actions" });
  const element = h("section", { class: "card", "aria-labelledby": "terminal-h" },
    h("h2", { id: "terminal-h" }, "Terminal"),
    h("p", { class: "help" }, "A shell in the workspace's VM, in /workspace."), actions, status, screen);
  const encoder = new TextEncoder();
  let term = null;
  let fit = null;
  let ws = null;
  let undo = [];

  function state(kind, text) {
    status.dataset.terminal = kind;
    status.className = kind === "error" ? "notice error" : "help";
    status.textContent = text;
  }
  const button = (text, onclick, cls) => h("button", { type: "button", class: cls, onclick }, text);
  const openButton = () => button("Open terminal", open);
  const reconnectButton = () => button("Reconnect", connect);
  const closeButton = () => button("Close terminal", close, "secondary");

  function send(data) {
    if (ws?.readyState === WebSocket.OPEN) ws.send(data);
  }

  async function open() {
    replace(actions);
    state("connecting", "Loading the terminal…");
    let lib;
    try {
      lib = await loadXterm();
    } catch (e) {
      state("error", e.message);
      replace(actions, openButton());
      return;
    }
    if (signal.aborted) return;
    screen.hidden = false;
    term = new lib.Terminal({ cursorBlink: true, fontFamily: FONT, fontSize: 14, scrollback: 5000 });
    fit = new lib.FitAddon();
    term.loadAddon(fit);
    const unmirror = mirrorStyles(screen);
    term.open(screen);
    fit.fit();
    const resized = new ResizeObserver(() => fit?.fit());
    resized.observe(screen);
    const subscriptions = [
      term.onData((data) => send(encoder.encode(data))),
      // Some mouse reports are bytes, not text: one byte per character.
      term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff))),
      term.onResize(({ rows, cols }) => send(JSON.stringify({ type: "resize", rows, cols }))),
    ];
    undo = [() => subscriptions.forEach((s) => s.dispose()), () => resized.disconnect(), () => term.dispose(), unmirror];
    connect();
  }

  async function connect() {
    replace(actions, closeButton());
    state("connecting", "Connecting to the workspace…");
    let ticket;
    try {
      ticket = await api("POST", `/api/workspaces/${workspaceId}/terminal-ticket`, undefined, { signal });
    } catch (e) {
      if (e.name === "AbortError" || !term) return;
      state("error", `The terminal is not available: ${e.message}`);
      replace(actions, reconnectButton(), closeButton());
      return;
    }
    if (!term) return;  // closed meanwhile
    const url = wsUrl(ticket.url);
    url.searchParams.set("rows", String(term.rows));
    url.searchParams.set("cols", String(term.cols));
    const socket = new WebSocket(url.href);
    socket.binaryType = "arraybuffer";
    ws = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      state("open", "Connected.");
      send(JSON.stringify({ type: "resize", rows: term.rows, cols: term.cols }));
      term.focus();
    };
    socket.onmessage = (ev) => {
      if (ev.data instanceof ArrayBuffer) term?.write(new Uint8Array(ev.data));
    };
    socket.onclose = (ev) => {
      if (ws !== socket) return;  // closed here on purpose
      ws = null;
      // A refused handshake (a bad ticket) reaches the page as 1006 before any open.
      const why = CLOSED[ev.code] || (opened ? `The connection was lost (code ${ev.code}).`
        : "The terminal could not connect: the ticket was refused, or the server is unreachable.");
      state(ev.code === 1000 ? "ended" : "error", ev.reason && ev.code !== 1000 ? `${why} ${ev.reason}` : why);
      replace(actions, reconnectButton(), closeButton());
    };
  }

  function close() {
    const socket = ws;
    ws = null;
    socket?.close(1000);
    for (const fn of undo.reverse()) fn();
    undo = [];
    term = null;
    fit = null;
    screen.hidden = true;
    state("closed", "");
    replace(actions, openButton());
  }

  replace(actions, openButton());
  signal.addEventListener("abort", () => { if (term || ws) close(); });
  return element;
}
