// The dashboard's shell: sign-in, navigation and the view router (history API; every /app address serves
// this same page, so links and reloads land on the right view).

import { api, ApiError, hooks, token } from "./api.js";
import { h, notice, replace, say } from "./dom.js";
import * as admin from "./admin.js";
import * as egress from "./egress.js";
import * as login from "./login.js";
import * as providers from "./providers.js";
import * as runs from "./runs.js";
import * as sandboxes from "./sandboxes.js";
import * as workspaces from "./workspaces.js";

const main = document.getElementById("main");
const ROUTES = [
  [/^\/app\/signin$/, signin, "Sign in"],
  [/^\/app\/providers$/, providers.render, "Providers"],
  [/^\/app\/providers\/(?<provider>[a-z_]+)\/login\/(?<session>[0-9a-f-]+)$/, login.render, "Connect"],
  [/^\/app\/run$/, runs.renderForm, "Run"],
  [/^\/app\/runs$/, runs.renderHistory, "History"],
  [/^\/app\/runs\/(?<run>[0-9a-f-]+)$/, runs.renderRun, "Run"],
  [/^\/app\/admin$/, admin.render, "Admin"],
  [/^\/app\/egress$/, egress.render, "Egress"],
  [/^\/app\/sandboxes$/, sandboxes.render, "Sandboxes"],
  [/^\/app\/workspaces$/, workspaces.renderList, "Workspaces"],
  [/^\/app\/workspaces\/(?<workspace>[0-9a-f-]+)$/, workspaces.renderWorkspace, "Workspace"],
];
const NAV = [["/app/providers", "Providers"], ["/app/run", "Run"], ["/app/runs", "History"],
  ["/app/workspaces", "Workspaces"], ["/app/sandboxes", "Sandboxes"], ["/app/egress", "Egress"]];

let me = null;          // GET /api/me, once per sign-in
let cleanup = null;     // the current view's: aborts its streams and timers

export function navigate(path, { replace: swap = false } = {}) {
  history[swap ? "replaceState" : "pushState"](null, "", path);
  show();
}

function signOut(message) {
  token.clear();
  me = null;
  navigate("/app/signin", { replace: true });
  if (message) say(main.querySelector(".notice"), message, "error");
}

hooks.unauthorized = () => signOut("Your token is not valid any more: sign in again.");

function header() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  if (!me) { replace(nav); replace(who); return; }
  const links = me.role === "admin" ? [...NAV, ["/app/admin", "Admin"]] : NAV;
  const here = location.pathname;
  replace(nav, h("ul", {}, links.map(([href, text]) => h("li", {}, h("a", {
    href, "aria-current": here === href || (href !== "/app/run" && here.startsWith(href + "/")) ? "page" : null,
  }, text)))));
  replace(who, h("span", {}, `${me.name} (${me.role})`), " ",
    h("button", { type: "button", class: "link", onclick: () => signOut() }, "Sign out"));
}

async function show() {
  cleanup?.();
  cleanup = null;
  let path = location.pathname.replace(/\/+$/, "") || "/app";
  if (path === "/app") path = token.get() ? "/app/providers" : "/app/signin";
  if (!token.get() && path !== "/app/signin") {
    sessionStorage.setItem("polydev.next", location.pathname);
    path = "/app/signin";
  }
  if (path !== location.pathname) history.replaceState(null, "", path);
  if (token.get() && !me) {
    try {
      me = await api("GET", "/api/me");
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return;  // hooks.unauthorized took over
      replace(main, h("h1", {}, "Polydev"), h("p", { class: "notice error", role: "alert" }, e.message));
      return;
    }
  }
  header();
  for (const [pattern, view, title] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    document.title = `${title} · Polydev`;
    replace(main);
    const controller = new AbortController();
    const stop = view(main, { ...match.groups }, { me, navigate, signal: controller.signal });
    cleanup = () => { controller.abort(); if (typeof stop === "function") stop(); };
    main.querySelector("h1")?.setAttribute("tabindex", "-1");
    main.querySelector("h1")?.focus({ preventScroll: true });
    return;
  }
  document.title = "Not found · Polydev";
  replace(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "/app" }, "Back to the dashboard")));
}

function signin(root, _params, { navigate: go }) {
  const message = notice("error");
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off",
    spellcheck: "false", required: true, "aria-describedby": "token-help" });
  const form = h("form", { class: "card narrow", onsubmit: async (e) => {
    e.preventDefault();
    token.set(input.value.trim());
    me = null;
    try {
      me = await api("GET", "/api/me", undefined, { signOutOn401: false });  // a wrong token is said here
    } catch (err) {
      token.clear();
      say(message, err.status === 401 ? "That token is not valid." : err.message, "error");
      return;
    }
    const next = sessionStorage.getItem("polydev.next");
    sessionStorage.removeItem("polydev.next");
    go(next && next.startsWith("/app/") && next !== "/app/signin" ? next : "/app/providers", { replace: true });
  } },
  h("label", { for: "token" }, "API token"), input,
  h("p", { id: "token-help", class: "help" },
    "A Polydev API token (pd_…). The first admin's is printed when the server first starts. ",
    "It stays in this tab only and is sent to this server alone, in a request header."),
  h("button", { type: "submit" }, "Sign in"), message);
  root.append(h("h1", {}, "Sign in"), form);
  input.focus();
}

// Same-origin /app links change the view without reloading the page.
document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href]");
  if (!a || a.target || a.hasAttribute("download") || a.getAttribute("href").startsWith("#") || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith("/app")) return;
  e.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", show);
show();
