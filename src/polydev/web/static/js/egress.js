// Egress: the gateway's accounting per destination host (your own; everyone's for admins) and, for admins,
// each user's egress identity with a form to set it. A proxy URL typed here goes to the API once and is
// never shown again: the API answers only scheme://host:port.

import { api } from "./api.js";
import { h, notice, replace, say, size, when } from "./dom.js";

const MODES = [
  ["direct", "Direct: the host's own route"],
  ["address", "Address: a dedicated source address from the pool"],
  ["proxy", "Proxy: the user's upstream proxy"],
];
const LIMITS = [
  ["concurrent", "Concurrent connections"],
  ["per_minute", "New connections per minute"],
  ["bytes_per_day", "Bytes per day"],
];

export function render(root, _params, { me, signal }) {
  const admin = me.role === "admin";
  root.append(h("h1", {}, "Egress"),
    h("p", { class: "lead" }, "Every connection your VMs make to the outside goes through Polydev's egress "
      + "gateway, which counts it here per destination host."));
  if (admin) identities(root, signal);
  usage(root, admin, signal);
  return undefined;
}

function usage(root, admin, signal) {
  const message = notice();
  const body = h("tbody");
  const columns = [...(admin ? ["User"] : []), "Host", "Connections", "Sent", "Received", "Refusals",
    "Last refusal", "Last seen"];
  root.append(h("h2", { id: "usage-h" }, admin ? "Usage (everyone)" : "Your usage"), message,
    h("table", { class: "table", "aria-labelledby": "usage-h", "data-table": "egress-usage" },
      h("thead", {}, h("tr", {}, columns.map((t) => h("th", { scope: "col" }, t)))), body));
  api("GET", `/api/egress/usage${admin ? "?all=true" : ""}`, undefined, { signal }).then((rows) => {
    replace(body, rows.length ? rows.map((u) => h("tr", { "data-host": u.host },
      admin && h("td", {}, u.user_name || "(unassigned VMs)"),
      h("td", {}, u.host),
      h("td", {}, String(u.connections)),
      h("td", { title: `${u.bytes_up} bytes` }, size(u.bytes_up)),
      h("td", { title: `${u.bytes_down} bytes` }, size(u.bytes_down)),
      h("td", {}, String(u.refusals)),
      h("td", {}, u.last_refusal || "—"),
      h("td", { title: u.last_seen }, when(u.last_seen))))
      : h("tr", {}, h("td", { colspan: String(columns.length) }, "Nothing recorded yet.")));
  }).catch((e) => { if (e.name !== "AbortError") say(message, e.message, "error"); });
}

function identities(root, signal) {
  const message = notice();
  const body = h("tbody");
  const user = h("select", { id: "egress-user", name: "user", required: true });
  const mode = h("select", { id: "egress-mode", name: "mode" }, MODES.map(([v, t]) => h("option", { value: v }, t)));
  const family = h("select", { id: "egress-family", name: "family" },
    h("option", { value: "" }, "Any"), h("option", { value: "4" }, "IPv4"), h("option", { value: "6" }, "IPv6"));
  const proxy = h("input", { id: "egress-proxy", name: "proxy_url", type: "password", autocomplete: "off",
    spellcheck: "false", placeholder: "http://user:password@proxy.example:3128", "aria-describedby": "egress-proxy-help" });
  const limitInputs = Object.fromEntries(LIMITS.map(([key]) => [key, h("input", {
    id: `egress-limit-${key}`, name: key, type: "text", inputmode: "numeric", pattern: "[0-9]*", placeholder: "default" })]));
  const familyRow = h("div", {}, h("label", { for: "egress-family" }, "Address family"), family);
  const proxyRow = h("div", {}, h("label", { for: "egress-proxy" }, "Proxy URL"), proxy,
    h("p", { id: "egress-proxy-help", class: "help" }, "http://, socks5:// or socks5h://, with user:password@ if "
      + "the proxy needs it. Sealed on the server and never shown again; leave empty to keep the stored one."));
  let views = [];

  function showFields() {
    familyRow.hidden = mode.value !== "address";
    proxyRow.hidden = mode.value !== "proxy";
  }
  function fill() {  // the form shows the chosen user's current identity
    const v = views.find((x) => x.user_id === user.value);
    if (!v) return;
    mode.value = v.mode;
    family.value = v.mode === "address" && v.family ? String(v.family) : "";
    proxy.value = "";
    for (const [key] of LIMITS) limitInputs[key].value = v.limits[key] != null ? String(v.limits[key]) : "";
    showFields();
  }
  mode.addEventListener("change", showFields);
  user.addEventListener("change", fill);

  const form = h("form", { class: "card", "aria-labelledby": "egress-form-h", onsubmit: async (e) => {
    e.preventDefault();
    const limits = {};
    for (const [key, label] of LIMITS) {
      const text = limitInputs[key].value.trim();
      if (!text) continue;
      if (!/^[0-9]+$/.test(text)) { say(message, `${label}: a whole number, or empty for the default.`, "error"); return; }
      limits[key] = Number(text);
    }
    const body = { mode: mode.value, limits };
    if (mode.value === "address" && family.value) body.family = Number(family.value);
    if (mode.value === "proxy" && proxy.value.trim()) body.proxy_url = proxy.value.trim();
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const v = await api("PUT", `/api/users/${user.value}/egress`, body);
      proxy.value = "";
      say(message, `${v.user_name}: ${describe(v)}.`, "ok");
      await load(v.user_id);
    } catch (err) {
      if (err.name !== "AbortError") say(message, err.message, "error");
    } finally {
      button.disabled = false;
    }
  } },
  h("h2", { id: "egress-form-h" }, "Set a user's egress"),
  h("label", { for: "egress-user" }, "User"), user,
  h("label", { for: "egress-mode" }, "Mode"), mode, familyRow, proxyRow,
  LIMITS.map(([key, label]) => [h("label", { for: `egress-limit-${key}` }, label), limitInputs[key]]),
  h("button", { type: "submit" }, "Save egress"), message);

  root.append(h("h2", { id: "identities-h" }, "Identities"),
    h("table", { class: "table", "aria-labelledby": "identities-h", "data-table": "egress-identities" },
      h("thead", {}, h("tr", {}, ["User", "Mode", "Address", "Proxy", "Limits", ""].map((t) => h("th", { scope: "col" }, t)))),
      body), form);

  function draw() {
    replace(body, views.map((v) => h("tr", { "data-user": v.user_id },
      h("td", {}, v.user_name),
      h("td", { "data-mode": v.mode }, v.mode),
      h("td", {}, v.address || "—"),
      h("td", {}, v.proxy || "—"),
      h("td", {}, Object.entries(v.limits).map(([k, n]) => `${k}=${n}`).join(", ") || "defaults"),
      h("td", {}, h("button", { type: "button", class: "secondary small", "aria-label": `Edit ${v.user_name}`,
        onclick: () => { user.value = v.user_id; fill(); mode.focus(); } }, "Edit")))));
  }

  async function load(selected) {
    try {
      views = await api("GET", "/api/egress/identities", undefined, { signal });
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
      return;
    }
    const keep = selected || user.value;
    replace(user, views.map((v) => h("option", { value: v.user_id }, v.user_name)));
    if (keep) user.value = keep;
    draw();
    fill();
  }
  showFields();
  load();
}

function describe(v) {
  if (v.mode === "address") return `address ${v.address}`;
  if (v.mode === "proxy") return `proxy ${v.proxy}`;
  return "direct";
}
