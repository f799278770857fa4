// The login browser inside the VM, through the control plane's VNC WebSocket, drawn by noVNC.
// noVNC's core/ is plain ES modules: imported straight from the server's vendor directory, no bundler.

import { api, ApiError, importVendored, sleep, wsUrl } from "./api.js";

const RFB_PATH = "/app/vendor/novnc/core/rfb.js";

// Shows the VM's screen in `container` until `signal` aborts; reconnects with a fresh single-use ticket if
// the connection drops while the session lives. onState("connecting" | "connected" | "error", message).
export async function showVnc(container, sessionId, { signal, onState }) {
  let RFB;
  try {
    RFB = (await importVendored(RFB_PATH, "the noVNC viewer")).default;
  } catch (e) {
    onState("error", e.message);
    return;
  }
  for (let attempt = 0; attempt < 4 && !signal.aborted; attempt++) {
    if (attempt) await sleep(1000 * attempt, signal).catch(() => {});
    if (signal.aborted) return;
    onState("connecting", attempt ? "Reconnecting to the browser in your VM…" : "Connecting to the browser in your VM…");
    let ticket;
    try {
      // A ticket, not the token, goes in the WebSocket URL: WebSockets cannot send headers, and a ticket
      // is short-lived and single-use, so a URL that ends up in a log is worth nothing.
      ticket = await api("POST", `/api/auth/sessions/${sessionId}/vnc-ticket`, undefined, { signal });
    } catch (e) {
      if (e.name === "AbortError") return;
      // 409 vnc_unavailable: the VNC server is not up (yet): try again. 404/410: the session is gone (its
      // event stream says so too); anything else will not get better by asking again.
      const retry = e instanceof ApiError && (e.status === 409 || e.status === 0 || e.status >= 500);
      onState(retry ? "connecting" : "error", `The live browser view is not available: ${e.message}`);
      if (!retry) return;
      continue;
    }
    const rfb = new RFB(container, wsUrl(ticket.url).href, { shared: true });
    rfb.scaleViewport = true;   // the VM's screen fits the box; clicks are scaled back
    rfb.focusOnClick = true;
    const ended = new Promise((resolve) => {
      rfb.addEventListener("connect", () => { attempt = 0; onState("connected", ""); });
      rfb.addEventListener("disconnect", (ev) => resolve(ev.detail.clean));
      rfb.addEventListener("securityfailure", (ev) => onState("error", `VNC refused: ${ev.detail.reason || "security failure"}`));
      signal.addEventListener("abort", () => { rfb.disconnect(); resolve(true); });
    });
    const clean = await ended;
    if (signal.aborted) return;
    onState("connecting", clean ? "The browser view closed." : "Lost the connection to the browser in your VM.");
  }
  if (!signal.aborted) onState("error", "Could not keep a connection to the browser in your VM.");
}
