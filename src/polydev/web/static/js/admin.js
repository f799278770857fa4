// Admin: the VMs (status, age, backend, owner) kept current by polling the list, with a destroy button; the
// quotas: each user's use against their limits, and the host's capacity; and the guest image (images.js).

import { api } from "./api.js";
import { age, h, notice, poller, replace, say, when } from "./dom.js";
import { section as imageSection } from "./images.js";

export function render(root, _params, { me, signal }) {
  root.append(h("h1", {}, "Virtual machines"));
  if (me.role !== "admin") {
    root.append(h("p", { class: "notice error", role: "alert" }, "This page is for admins."));
    return undefined;
  }
  const message = notice();
  const all = h("input", { id: "show-ended", type: "checkbox", onchange: () => load() });
  const body = h("tbody");
  root.append(h("p", { class: "row" }, all, h("label", { for: "show-ended" }, "Show ended VMs")), message,
    h("table", { class: "table" }, h("thead", {}, h("tr", {},
      ["VM", "Owner", "Purpose", "Status", "Backend", "Age", ""].map((t) => h("th", { scope: "col" }, t)))), body));

  let names = {};
  let vms = [];

  function draw() {
    const now = Date.now();
    replace(body, vms.length ? vms.map((vm) => h("tr", { "data-vm": vm.id },
      h("td", {}, h("code", { title: vm.id }, vm.id.slice(0, 8))),
      h("td", {}, names[vm.user_id] || (vm.user_id ? vm.user_id.slice(0, 8) : "—")),
      h("td", {}, vm.purpose),
      h("td", {}, h("span", { class: `badge ${vm.status}`, "data-status": vm.status, title: vm.error || "" }, vm.status)),
      h("td", {}, vm.backend),
      h("td", { title: when(vm.created_at), "data-created": vm.created_at }, age(vm.created_at, now)),
      h("td", {}, ["creating", "running"].includes(vm.status) && h("button", {
        type: "button", class: "danger small", "aria-label": `Destroy VM ${vm.id.slice(0, 8)}`,
        onclick: async (e) => {
          if (!confirm(`Destroy VM ${vm.id}?`)) return;
          e.target.disabled = true;
          try { await api("DELETE", `/api/vms/${vm.id}`); say(message, `VM ${vm.id.slice(0, 8)} destroyed.`, "ok"); }
          catch (err) { say(message, err.message, "error"); }
          load();
        } }, "Destroy"))))
      : h("tr", {}, h("td", { colspan: "7" }, "No VMs.")));
  }

  const list = poller((sig) => api("GET", `/api/vms${all.checked ? "?all=true" : ""}`, undefined, { signal: sig }),
    (fresh) => { vms = fresh; draw(); }, message, signal);
  const load = list.load;

  api("GET", "/api/users", undefined, { signal }).then((users) => {
    names = Object.fromEntries(users.map((u) => [u.id, u.name]));
    draw();
  }).catch(() => {});
  load();
  quotas(root, signal);
  imageSection(root, signal);
  const ticker = setInterval(() => {  // ages tick
    for (const td of body.querySelectorAll("td[data-created]")) td.textContent = age(td.dataset.created);
  }, 1000);
  return () => { list.stop(); clearInterval(ticker); };
}

const LIMITS = [["vms", "VMs"], ["logins", "Logins"], ["runs", "Runs"], ["vcpus", "vCPUs"], ["memory_mb", "Memory (MiB)"]];

function quotas(root, signal) {
  const message = notice();
  const host = h("p", { "data-host-capacity": "" });
  const body = h("tbody");
  root.append(h("h2", { id: "quotas-h" }, "Quotas"), message, host,
    h("table", { class: "table", "aria-labelledby": "quotas-h", "data-table": "quotas" },
      h("thead", {}, h("tr", {}, ["User", ...LIMITS.map(([, t]) => t)].map((t) => h("th", { scope: "col" }, t)))), body),
    h("p", { class: "help" }, "In use / limit; * marks a user's own limit (set with `polydev quota set` or "
      + "PUT /api/users/{id}/quotas)."));
  Promise.all([api("GET", "/api/quotas", undefined, { signal }), api("GET", "/api/quotas/host", undefined, { signal })])
    .then(([rows, cap]) => {
      const units = { vcpus: "vCPUs", memory_mb: "MiB of memory", disk_mb: "MiB of disk" };
      replace(host, "Host: " + Object.entries(cap.capacity)
        .map(([k, v]) => `${v.used} of ${v.capacity} ${units[k] || k} in use`).join(", "));
      replace(body, rows.map((q) => h("tr", { "data-user": q.user_id },
        h("td", {}, q.user_name || q.user_id.slice(0, 8)),
        ...LIMITS.map(([k]) => h("td", { "data-limit": k },
          `${q.usage[k]} / ${q.limits[k]}${k in q.overrides ? " *" : ""}`)))));
    }).catch((e) => { if (e.name !== "AbortError") say(message, e.message, "error"); });
}
