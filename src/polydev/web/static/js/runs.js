// Runs: the prompt form, one run's output streamed live (or replayed, for a finished run), and history.

import { api, followRun, PROVIDERS, providerName, RUN_TERMINAL } from "./api.js";
import { h, notice, replace, say, when } from "./dom.js";
import { eventView, statusBadge } from "./events.js";

export function renderForm(root, _params, { navigate, signal }) {
  const wanted = new URLSearchParams(location.search).get("provider");
  const message = notice();
  const select = h("select", { id: "provider", name: "provider" },
    PROVIDERS.map((p) => h("option", { value: p.id, selected: p.id === wanted }, p.name)));
  const prompt = h("textarea", { id: "prompt", name: "prompt", rows: "6", required: true });
  const form = h("form", { class: "card", onsubmit: async (e) => {
    e.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const run = await api("POST", "/api/runs", { provider: select.value, prompt: prompt.value });
      navigate(`/app/runs/${run.id}`);
    } catch (err) {
      button.disabled = false;
      say(message, err.message, "error");
      if (err.body?.error?.action === "connect_provider") {
        message.append(" ", h("a", { href: "/app/providers" }, "Connect it"));
      }
    }
  } },
  h("label", { for: "provider" }, "Provider"), select,
  h("label", { for: "prompt" }, "Prompt"), prompt,
  h("button", { type: "submit" }, "Send"), message);
  root.append(h("h1", {}, "Run a prompt"), form);

  // Mark which providers can run (connected or with an API key).
  api("GET", "/api/credentials", undefined, { signal }).then((creds) => {
    const have = new Set(creds.map((c) => c.provider));
    for (const option of select.options) {
      option.textContent = `${providerName(option.value)}${have.has(option.value) ? "" : " (not connected)"}`;
    }
    if (!wanted) {
      const first = [...select.options].find((o) => have.has(o.value));
      if (first) select.value = first.value;
    }
  }).catch(() => {});
}

// One run: its events from the start, then live until it ends.
export function renderRun(root, { run: runId }, { signal }) {
  const badge = h("span", { class: "run-status", role: "status" });
  const meta = h("dl", { class: "meta" });
  const output = h("div", { class: "output", role: "log", "aria-live": "polite", "aria-label": "Output" });
  const message = notice();
  const actions = h("div", { class: "actions" });
  root.append(h("h1", {}, "Run"), h("p", {}, "Status: ", badge), meta, actions, message,
    h("h2", {}, "Output"), output);

  function draw(run) {
    replace(badge, statusBadge(run.status));
    replace(meta, h("dt", {}, "Provider"), h("dd", {}, providerName(run.provider)),
      h("dt", {}, "Started"), h("dd", {}, when(run.created_at)),
      h("dt", {}, "Prompt"), h("dd", {}, h("pre", { class: "prompt" }, run.prompt)),
      run.error_message && [h("dt", {}, "Error"), h("dd", { class: "error" }, run.error_message)]);
    if (RUN_TERMINAL.includes(run.status)) {
      replace(actions, h("a", { class: "button", href: `/app/run?provider=${run.provider}` }, "Run another"));
    } else if (!actions.querySelector("[data-cancel]")) {
      replace(actions, h("button", { type: "button", class: "danger", "data-cancel": "", onclick: async (e) => {
        e.target.disabled = true;
        try { draw(await api("POST", `/api/runs/${runId}/cancel`)); } catch (err) { say(message, err.message, "error"); }
      } }, "Cancel"));
    }
  }

  (async () => {
    try {
      let run = await api("GET", `/api/runs/${runId}`, undefined, { signal });
      const show = eventView(output, run.provider);
      draw(run);
      await followRun(runId, { signal, onEvent: (ev) => {
        if (run.status === "queued") { run = { ...run, status: "running" }; draw(run); }
        show(ev);
      } });
      draw(await api("GET", `/api/runs/${runId}`, undefined, { signal }));  // the final status
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.status === 404 ? "No such run." : e.message, "error");
    }
  })();
}

export function renderHistory(root, _params, { signal }) {
  const message = notice();
  const body = h("tbody");
  root.append(h("h1", {}, "Run history"), message,
    h("table", { class: "table" }, h("thead", {}, h("tr", {},
      ["Started", "Provider", "Status", "Prompt"].map((t) => h("th", { scope: "col" }, t)))), body));
  let timer = null;

  async function load() {
    try {
      const runs = await api("GET", "/api/runs?limit=100", undefined, { signal });
      replace(body, runs.length ? runs.map((r) => h("tr", { "data-run": r.id },
        h("td", {}, when(r.created_at)), h("td", {}, providerName(r.provider)), h("td", {}, statusBadge(r.status)),
        h("td", {}, h("a", { href: `/app/runs/${r.id}` }, r.prompt.length > 80 ? `${r.prompt.slice(0, 80)}…` : r.prompt))))
        : h("tr", {}, h("td", { colspan: "4" }, "No runs yet.")));
      // Live while something is still running: statuses change without a reload.
      if (runs.some((r) => !RUN_TERMINAL.includes(r.status))) timer = setTimeout(load, 2000);
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
    }
  }
  load();
  return () => clearTimeout(timer);
}
