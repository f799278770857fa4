// Workspaces: projects the CLIs work on across turns, each on a VM of its own. The list (made empty, from an
// uploaded archive or from a git repository; downloaded, paused, deleted) and one workspace's page: its state,
// its terminal and its conversations.

import { api, download, request } from "./api.js";
import { h, notice, poller, replace, say, size, when } from "./dom.js";
import { thread } from "./conversations.js";
import { terminalPanel } from "./terminal.js";

const ARCHIVE = /\.(tar|tar\.gz|tgz|tar\.bz2|tbz2|tar\.xz|txz|zip)$/i;

// The upload's Content-Type: zip, or tar (plain or compressed: the server's tar finds out which).
function archiveType(filename) {
  const ext = ARCHIVE.exec(filename)?.[1].toLowerCase();
  if (!ext) return null;
  if (ext === "zip") return "application/zip";
  return ext === "tar.gz" || ext === "tgz" ? "application/gzip" : "application/x-tar";
}

function stateBadge(w) {
  return h("span", { class: `badge ${w.state}`, "data-state": w.state, title: w.error || null }, w.state);
}

function source(w) {
  if (w.source !== "git") return w.source;
  return [h("span", {}, "git "), h("code", {}, w.repo_url || ""), w.branch ? ` (${w.branch})` : ""];
}

// Download, Pause, Delete for one workspace; `after(action)` runs once one succeeded.
function actions(w, message, after, { labelled = false } = {}) {
  const label = (verb) => (labelled ? `${verb} ${w.name}` : null);
  const act = (fn) => async (e) => {
    e.target.disabled = true;
    try { await fn(); } catch (err) { if (err.name !== "AbortError") say(message, err.message, "error"); }
    e.target.disabled = false;
  };
  return [
    ["ready", "paused"].includes(w.state) && h("button", { type: "button", class: "secondary small",
      "aria-label": label("Download"), onclick: act(async () => {
        say(message, `Preparing ${w.name}'s archive…`, "info");
        const name = await download(`/api/workspaces/${w.id}/archive`, `${w.name}.tar.gz`);
        say(message, `Downloaded ${name}.`, "ok");
      }) }, labelled ? "Download" : "Download archive"),
    w.state === "ready" && h("button", { type: "button", class: "secondary small", "aria-label": label("Pause"),
      onclick: act(async () => {
        await api("POST", `/api/workspaces/${w.id}/pause`);
        say(message, `${w.name} is paused: its next use wakes it.`, "ok");
        after("pause");
      }) }, "Pause"),
    h("button", { type: "button", class: "danger small", "aria-label": label("Delete"), onclick: act(async () => {
      if (!confirm(`Delete workspace ${w.name}? Its files, VM and conversations go.`)) return;
      await api("DELETE", `/api/workspaces/${w.id}`);
      say(message, `${w.name} deleted.`, "ok");
      after("delete");
    }) }, "Delete"),
  ];
}

export function renderList(root, _params, { signal }) {
  const message = notice();
  const body = h("tbody");
  root.append(h("h1", {}, "Workspaces"),
    h("p", { class: "lead" }, "A workspace keeps a project on a VM of its own across conversations: ask, see "
      + "what changed, follow up, open a terminal. Idle ones are paused and woken by their next use."),
    createForm(() => list.load()), message,
    h("table", { class: "table", "data-table": "workspaces" }, h("thead", {}, h("tr", {},
      ["Name", "Source", "State", "Size", "Used", ""].map((t) => h("th", { scope: "col" }, t)))), body));

  function draw(rows) {
    replace(body, rows.length ? rows.map((w) => h("tr", { "data-workspace": w.id },
      h("td", {}, h("a", { href: `/app/workspaces/${w.id}` }, w.name)),
      h("td", {}, source(w)),
      h("td", {}, stateBadge(w), w.state === "failed" && w.error && h("p", { class: "error-text" }, w.error)),
      h("td", { class: "nowrap", title: `${w.size_bytes} bytes` }, size(w.size_bytes)),
      h("td", {}, when(w.used_at)),
      h("td", { class: "row-actions" }, actions(w, message, () => list.load(), { labelled: true }))))
      : h("tr", {}, h("td", { colspan: "6" }, "No workspaces yet.")));
  }

  const list = poller((sig) => api("GET", "/api/workspaces", undefined, { signal: sig }), draw, message, signal);
  list.load();
  return list.stop;
}

function createForm(made) {
  const message = notice();
  const name = h("input", { id: "ws-name", name: "name", type: "text", required: true, maxlength: "100",
    autocomplete: "off" });
  const kinds = [["empty", "Empty"], ["archive", "An archive (.tar, .tar.gz, .zip)"], ["git", "A git repository"]];
  const radios = kinds.map(([value]) => h("input", { type: "radio", name: "ws-source", id: `ws-source-${value}`, value,
    checked: value === "empty" }));
  const file = h("input", { id: "ws-archive", name: "archive", type: "file",
    accept: ".tar,.tar.gz,.tgz,.tar.bz2,.tar.xz,.zip" });
  const repo = h("input", { id: "ws-repo", name: "repo_url", type: "url", spellcheck: "false",
    placeholder: "https://github.com/owner/project.git" });
  const branch = h("input", { id: "ws-branch", name: "branch", type: "text", spellcheck: "false",
    placeholder: "the repository's default" });
  const token = h("input", { id: "ws-token", name: "git_token", type: "password", autocomplete: "off",
    spellcheck: "false", "aria-describedby": "ws-token-help" });
  const archiveRow = h("div", {}, h("label", { for: "ws-archive" }, "Archive"), file);
  const gitRow = h("div", {},
    h("label", { for: "ws-repo" }, "Repository URL"), repo,
    h("label", { for: "ws-branch" }, "Branch (optional)"), branch,
    h("label", { for: "ws-token" }, "Access token (optional)"), token,
    h("p", { id: "ws-token-help", class: "help" }, "For a private repository, and for pushing. Sealed on the "
      + "server and never shown again."));
  const kind = () => radios.find((r) => r.checked).value;
  function showFields() {
    archiveRow.hidden = kind() !== "archive";
    gitRow.hidden = kind() !== "git";
    file.required = kind() === "archive";
    repo.required = kind() === "git";
  }
  // An empty name is taken from the archive's or the repository's.
  file.addEventListener("change", () => {
    if (!name.value.trim() && file.files[0]) name.value = file.files[0].name.replace(ARCHIVE, "");
  });
  repo.addEventListener("change", () => {
    const last = repo.value.trim().replace(/\/+$/, "").split("/").pop()?.replace(/\.git$/, "");
    if (!name.value.trim() && last) name.value = last;
  });
  for (const r of radios) r.addEventListener("change", showFields);

  const form = h("form", { class: "card", "aria-labelledby": "ws-new-h", onsubmit: async (e) => {
    e.preventDefault();
    const button = form.querySelector("button[type=submit]");
    const title = name.value.trim();
    let created;
    button.disabled = true;
    say(message, "");
    try {
      if (kind() === "archive") {
        const chosen = file.files[0];
        const type = chosen && archiveType(chosen.name);
        if (!type) { say(message, "Choose a .tar, .tar.gz or .zip file.", "error"); return; }
        say(message, `Uploading ${chosen.name}…`, "info");
        const res = await request("POST", `/api/workspaces/upload?name=${encodeURIComponent(title)}`,
          { body: chosen, type, accept: "application/json" });
        created = await res.json();
      } else if (kind() === "git") {
        const spec = { name: title, source: "git", repo_url: repo.value.trim() };
        if (branch.value.trim()) spec.branch = branch.value.trim();
        if (token.value) spec.git_token = token.value;
        created = await api("POST", "/api/workspaces", spec);
      } else {
        created = await api("POST", "/api/workspaces", { name: title });
      }
      form.reset();
      showFields();
      say(message, `${created.name} is being made.`, "ok");
      made(created);
    } catch (err) {
      say(message, err.message, "error");
    } finally {
      token.value = "";  // typed once, sent once
      button.disabled = false;
    }
  } },
  h("h2", { id: "ws-new-h" }, "New workspace"),
  h("label", { for: "ws-name" }, "Name"), name,
  h("fieldset", { class: "choices" }, h("legend", {}, "Start from"),
    kinds.map(([value, text], i) => h("p", { class: "row" }, radios[i], h("label", { for: `ws-source-${value}` }, text)))),
  archiveRow, gitRow,
  h("button", { type: "submit" }, "Create workspace"), message);
  showFields();
  return form;
}

export function renderWorkspace(root, { workspace: id }, { navigate, signal }) {
  const title = h("h1", {}, "Workspace");
  const meta = h("dl", { class: "meta" });
  const message = notice();
  const buttons = h("div", { class: "actions" });
  root.append(h("p", {}, h("a", { href: "/app/workspaces" }, "← Workspaces")), title, meta, buttons, message);

  let shown = null;
  function draw(w) {
    title.textContent = w.name;
    document.title = `${w.name} · Polydev`;
    replace(meta,
      h("dt", {}, "State"), h("dd", { class: "ws-state" }, stateBadge(w)),
      w.error && [h("dt", {}, "Error"), h("dd", { class: "error" }, w.error)],
      h("dt", {}, "Source"), h("dd", {}, source(w)),
      h("dt", {}, "Size"), h("dd", { title: `${w.size_bytes} bytes` }, size(w.size_bytes)),
      h("dt", {}, "Created"), h("dd", {}, when(w.created_at)),
      h("dt", {}, "Used"), h("dd", {}, when(w.used_at)));
    if (!shown || shown.state !== w.state) {
      replace(buttons, actions(w, message, (done) => (done === "delete" ? navigate("/app/workspaces") : load())));
    }
    shown = w;
    if (!started) start();
  }

  // The terminal and the thread once the workspace is known to exist.
  let started = false;
  function start() {
    started = true;
    const conversations = thread(id, { signal, onTurnEnd: () => { load(); conversations.load(); } });
    root.append(terminalPanel(id, { signal }), conversations.element);
  }

  let timer = null;
  async function load() {
    clearTimeout(timer);
    try {
      draw(await api("GET", `/api/workspaces/${id}`, undefined, { signal }));
    } catch (e) {
      if (e.name === "AbortError") return;
      if (e.status === 404) { say(message, "No such workspace.", "error"); replace(buttons); return; }
      say(message, e.message, "error");
    }
    timer = setTimeout(load, 5000);
  }
  load();
  return () => clearTimeout(timer);
}
