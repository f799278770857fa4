// The live login view: the session's state over SSE, the VM's browser (noVNC) once it is up, the sign-in
// address, the paste-code box or the device code, cancel, and "Start a new session" when it is over.

import { api, ApiError, providerName, readEvents, SESSION_TERMINAL, sleep } from "./api.js";
import { h, notice, replace, say } from "./dom.js";
import { showVnc } from "./vnc.js";

const STATUS_TEXT = {
  initializing: "Starting a VM for the login…",
  vm_created: "VM started; starting the CLI's login…",
  ready: "Starting the CLI's login…",
  awaiting_user_auth: "Waiting for you to sign in",
  completed: "Connected",
  failed: "The login failed",
  timeout: "The login timed out",
  cancelled: "The login was cancelled",
};

// The CLI listens on localhost for the provider's redirect: the user may paste the address they land on.
function localhostRedirect(authUrl) {
  try {
    const redirect = new URL(authUrl).searchParams.get("redirect_uri") || "";
    return /^http:\/\/(localhost|127\.0\.0\.1)[:/]/.test(redirect);
  } catch {
    return false;
  }
}

export function render(root, { provider, session }, { navigate, signal }) {
  const name = providerName(provider);
  const status = h("p", { class: "status", role: "status", "aria-live": "polite", "data-status": "" });
  const message = notice();
  const signin = h("section", { class: "card", hidden: true, "aria-labelledby": "signin-h" });
  const screen = h("div", { class: "vnc", role: "application", "aria-label": "The sign-in page, running in your VM" });
  const screenNote = h("p", { class: "help", role: "status" });
  const vncBox = h("section", { class: "card", hidden: true, "aria-labelledby": "vnc-h" },
    h("h2", { id: "vnc-h" }, "Browser in your VM"), screenNote, screen);
  const actions = h("div", { class: "actions" });
  root.append(h("h1", {}, `Connect ${name}`), status, message, vncBox, signin, actions);

  let state = null;
  let vncStarted = false;
  const vncStop = new AbortController();
  signal.addEventListener("abort", () => vncStop.abort());

  async function startNew() {
    say(message, "Starting a new session…", "info");
    try {
      const s = await api("POST", "/api/auth/start", { provider });
      navigate(`/app/providers/${provider}/login/${s.session_id}`, { replace: true });
    } catch (e) {
      say(message, e.message, "error");
    }
  }

  function over(text) {
    vncStop.abort();
    vncBox.hidden = true;
    signin.hidden = true;
    replace(actions,
      h("button", { type: "button", onclick: startNew }, "Start a new session"),
      h("a", { class: "button secondary", href: "/app/providers" }, "Back to providers"));
    if (text) say(message, text, "error");
  }

  function codeForm(s) {
    const input = h("input", { id: "code", name: "code", autocomplete: "off", spellcheck: "false", required: true });
    const result = notice();
    const label = s.accepts_code
      ? "Paste the code the sign-in page shows"
      : "Paste the http://localhost… address your browser ended on";
    return h("form", { class: "code", onsubmit: async (e) => {
      e.preventDefault();
      const button = e.target.querySelector("button");
      button.disabled = true;
      say(result, "Sending…", "info");
      try {
        await api("POST", `/api/auth/sessions/${session}/code`, { code: input.value.trim() });
        say(result, "Accepted: finishing the login…", "ok");
      } catch (err) {
        say(result, err.message, "error");
        button.disabled = false;
      }
    } }, h("label", { for: "code" }, label), h("div", { class: "row" }, input, h("button", { type: "submit" }, "Send")), result);
  }

  function drawSignin(s) {
    const parts = [h("h2", { id: "signin-h" }, "Sign in")];
    if (s.device_code) {
      parts.push(h("p", {}, "Enter this code on the provider's page:"),
        h("p", { class: "device-code", "aria-label": "Device code" }, s.device_code));
    }
    if (s.auth_url) {
      // The address comes from the CLI in the VM: a link only if it is http(s), never javascript: or data:.
      const web = /^https?:\/\//i.test(s.auth_url);
      parts.push(h("p", {}, s.vnc_url ? "The page is open in the browser above. You can also open it yourself:" : "Open the provider's sign-in page:"),
        h("p", { class: "url" }, web ? h("a", { href: s.auth_url, target: "_blank", rel: "noopener noreferrer" }, s.auth_url)
          : h("code", {}, s.auth_url)));
    }
    if (s.accepts_code || localhostRedirect(s.auth_url)) parts.push(codeForm(s));
    replace(signin, parts);
    signin.hidden = false;
  }

  function update(s) {
    if (s.action === "start_new_session" && !s.session_id) return expired();  // the stream's "it is gone"
    const before = state;
    state = s;
    status.dataset.status = s.status;
    status.className = `status ${s.status}`;
    status.textContent = STATUS_TEXT[s.status] || s.status;
    if (s.status === "completed") {
      vncStop.abort();
      vncBox.hidden = true;
      signin.hidden = true;
      say(message, `${name} is connected.`, "ok");
      replace(actions, h("a", { class: "button", href: `/app/run?provider=${provider}` }, "Run a prompt"),
        h("a", { class: "button secondary", href: "/app/providers" }, "Back to providers"));
      return;
    }
    if (SESSION_TERMINAL.includes(s.status)) {
      over(s.error_message || (s.action === "start_new_session" ? "This login session has ended." : ""));
      return;
    }
    if (!before || before.status !== s.status || before.auth_url !== s.auth_url || before.device_code !== s.device_code
        || before.accepts_code !== s.accepts_code || Boolean(before.vnc_url) !== Boolean(s.vnc_url)) {
      if (s.status === "awaiting_user_auth" || s.auth_url || s.device_code) drawSignin(s);
    }
    if (s.vnc_url && !vncStarted) {
      vncStarted = true;
      vncBox.hidden = false;
      showVnc(screen, session, { signal: vncStop.signal, onState: (kind, text) => {
        screen.dataset.state = kind;
        say(screenNote, text, kind === "error" ? "error" : "info");
      } });
    }
    if (!actions.querySelector("[data-cancel]")) {
      replace(actions, h("button", { type: "button", class: "danger", "data-cancel": "", onclick: async (e) => {
        e.target.disabled = true;
        try { update(await api("POST", `/api/auth/sessions/${session}/cancel`)); } catch (err) { say(message, err.message, "error"); }
      } }, "Cancel"));
    }
  }

  function expired() {
    status.dataset.status = "expired";
    status.className = "status timeout";
    status.textContent = "This login session has expired";
    over("");
  }

  async function follow() {
    for (let failures = 0; !signal.aborted; ) {
      try {
        await readEvents(`/api/auth/sessions/${session}/events`, { signal, onEvent: (ev) => {
          failures = 0;
          if (ev.event === "session") update(JSON.parse(ev.data));
        } });
        if (state && SESSION_TERMINAL.includes(state.status)) return;
      } catch (e) {
        if (e.name === "AbortError") return;
        if (e instanceof ApiError && e.status === 410) return expired();
        if (e instanceof ApiError && e.status === 404) {
          status.dataset.status = "not_found";
          status.textContent = "No such login session";
          replace(actions, h("a", { class: "button secondary", href: "/app/providers" }, "Back to providers"));
          return;
        }
        if (++failures > 5) { say(message, e.message, "error"); return; }
      }
      await sleep(1000, signal).catch(() => {});  // the stream dropped mid-login: pick it up again
    }
  }

  follow();
}
