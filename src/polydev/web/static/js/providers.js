// Providers: each one's state (from GET /api/credentials), Connect (starts a login session and opens its
// live view), Disconnect, and storing an API key instead.

import { api, PROVIDERS } from "./api.js";
import { h, notice, replace, say } from "./dom.js";

export function stateText(cred) {
  if (!cred) return "Not connected";
  const how = cred.kind === "oauth" ? "connected via OAuth" : "connected with an API key";
  return cred.is_valid ? `Connected: ${how}` : `Needs reconnecting (was ${how})`;
}

export function render(root, _params, { navigate, signal }) {
  const message = notice();
  const list = h("div", { class: "cards" });
  root.append(h("h1", {}, "Providers"),
    h("p", { class: "lead" }, "Connect the AI coding CLIs you want to run. Signing in happens in a browser "
      + "inside your own VM, shown here; or store an API key."), message, list);

  async function load() {
    let creds;
    try {
      creds = await api("GET", "/api/credentials", undefined, { signal });
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
      return;
    }
    const byProvider = Object.fromEntries(creds.map((c) => [c.provider, c]));
    replace(list, PROVIDERS.map((p) => card(p, byProvider[p.id])));
  }

  async function act(fn, doneText) {
    say(message, "");
    try {
      await fn();
      if (doneText) say(message, doneText, "ok");
      await load();
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
    }
  }

  async function connect(provider, method) {
    say(message, "Starting a login…", "info");
    try {
      const session = await api("POST", "/api/auth/start", { provider: provider.id, ...(method ? { method } : {}) });
      navigate(`/app/providers/${provider.id}/login/${session.session_id}`);
    } catch (e) {
      say(message, e.message, "error");
    }
  }

  function card(provider, cred) {
    const keyId = `key-${provider.id}`;
    const key = h("input", { id: keyId, type: "password", autocomplete: "off", spellcheck: "false",
      required: true, minlength: "8" });
    return h("section", { class: "card provider", "data-provider": provider.id, "aria-labelledby": `h-${provider.id}` },
      h("h2", { id: `h-${provider.id}` }, provider.name),
      h("p", { class: `state ${cred ? (cred.is_valid ? "on" : "warn") : "off"}`, "data-state": cred ? cred.kind : "none" },
        stateText(cred)),
      h("div", { class: "actions" },
        h("button", { type: "button", onclick: () => connect(provider) }, cred ? "Reconnect" : "Connect"),
        provider.methods.includes("device")
          && h("button", { type: "button", class: "secondary", onclick: () => connect(provider, "device") },
            "Connect with a device code"),
        cred && h("button", { type: "button", class: "danger", onclick: () => {
          if (confirm(`Disconnect ${provider.name}? Its stored credential is deleted.`)) {
            act(() => api("DELETE", `/api/credentials/${provider.id}`), `${provider.name} disconnected.`);
          }
        } }, "Disconnect")),
      h("details", {},
        h("summary", {}, "Use an API key instead"),
        h("form", { onsubmit: (e) => {
          e.preventDefault();
          act(() => api("PUT", `/api/credentials/${provider.id}/api-key`, { api_key: key.value.trim() }),
            `${provider.name} API key stored.`);
        } },
        h("label", { for: keyId }, `${provider.name} API key`), key,
        h("button", { type: "submit" }, "Save key"))));
  }

  load();
}
