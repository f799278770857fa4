// Sandboxes: the E2B-compatible sandboxes (the caller's own; an admin may show everyone's), their state kept
// current by polling, each with a Kill button for its owner.

import { api } from "./api.js";
import { age, h, notice, poller, replace, say, when } from "./dom.js";

export function render(root, _params, { me, signal }) {
  root.append(h("h1", {}, "Sandboxes"),
    h("p", { class: "help" }, "E2B-compatible sandboxes, made with the e2b SDK pointed at this server "
      + "(E2B_API_URL, E2B_SANDBOX_URL, your API token as E2B_API_KEY)."));
  const message = notice();
  const everyone = h("input", { id: "all-sandboxes", type: "checkbox" });
  const body = h("tbody");
  if (me.role === "admin") root.append(h("p", { class: "row" }, everyone, h("label", { for: "all-sandboxes" }, "Everyone's")));
  root.append(message, h("table", { class: "table" }, h("thead", {}, h("tr", {},
    ["Sandbox", "Owner", "Template", "State", "Started", "Ends", ""].map((t) => h("th", { scope: "col" }, t)))), body));

  let rows = [];

  function draw() {
    const now = Date.now();
    replace(body, rows.length ? rows.map((s) => h("tr", { "data-sandbox": s.id },
      h("td", {}, h("code", {}, s.id)),
      h("td", {}, s.user_id === me.id ? "you" : s.user_id.slice(0, 8)),
      h("td", {}, s.template),
      h("td", {}, h("span", { class: `badge ${s.state}`, "data-state": s.state }, s.state)),
      h("td", { title: when(s.started_at) }, age(s.started_at, now)),
      h("td", {}, s.state === "paused" ? "—" : when(s.end_at)),
      h("td", {}, s.user_id === me.id && h("button", {
        type: "button", class: "danger small", "aria-label": `Kill sandbox ${s.id}`,
        onclick: async (e) => {
          if (!confirm(`Kill sandbox ${s.id}?`)) return;
          e.target.disabled = true;
          try { await api("DELETE", `/api/sandboxes/${s.id}`); say(message, `Sandbox ${s.id} killed.`, "ok"); }
          catch (err) { say(message, err.message, "error"); }
          list.load();
        } }, "Kill"))))
      : h("tr", {}, h("td", { colspan: "7" }, "No sandboxes.")));
  }

  const list = poller((sig) => api("GET", `/api/sandboxes${everyone.checked ? "?all=true" : ""}`, undefined,
    { signal: sig }), (fresh) => { rows = fresh; draw(); }, message, signal);
  everyone.onchange = () => list.load();
  list.load();
  return list.stop;
}
