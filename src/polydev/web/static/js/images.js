// Admin: the guest image (GET /api/images): the one this server's VMs start from, the active one when it differs
// (servers follow it within 15 s), builds in progress, and each CLI beside the npm registry's latest version
// ("Check for updates" asks the registry now: ?check=true).

import { api, providerName } from "./api.js";
import { h, notice, replace, say, when } from "./dom.js";

const ACTIVE_NOTE = "Active: servers switch to it within 15 s. New VMs, the warm pool and the pre-started logins "
  + "come from it; what is in use goes on where it is (a login in progress, a running turn, a paused workspace "
  + "wakes on the image it was started from). A server with POLYDEV_CLI_VERSIONS set does not switch: its "
  + "pinned versions are its image.";

export function section(root, signal) {
  const message = notice();
  const images = h("div");
  const updates = h("div");
  const check = h("button", { type: "button", class: "secondary", onclick: () => load(true) }, "Check for updates");
  root.append(h("section", { class: "image", "aria-labelledby": "image-h" },
    h("h2", { id: "image-h" }, "Image"), message, images,
    h("h3", { id: "image-updates-h" }, "Updates"), h("div", { class: "actions" }, check), updates,
    h("p", { class: "help" }, "`polydev image update` on the host builds an image with the CLIs' latest versions, "
      + "tests it (every CLI starts in a VM) and only then makes it the active image.")));

  async function load(ask = false) {
    check.disabled = true;
    if (ask) say(message, "Asking the npm registry for the CLIs' latest versions…", "info");
    try {
      const state = await api("GET", `/api/images${ask ? "?check=true" : ""}`, undefined, { signal });
      say(message, "");
      replace(images, current(state));
      replace(updates, available(state));
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
    } finally {
      check.disabled = false;
    }
  }
  load();
}

// The image in use (or none), the active one when it is another, and the builds in progress.
function current(state) {
  const { in_use: inUse, active } = state;
  return [
    h("h3", {}, "In use"),
    inUse
      ? [describe(inUse, "in-use"), active?.hash === inUse.hash && h("p", { class: "help" }, "It is the active image.")]
      : h("p", { "data-image": "none" }, `No image: this server's VMs have no ${state.profile} image to start from. `
        + "`polydev image update` (or `polydev image build`) on the host makes one."),
    active && active.hash !== inUse?.hash
      && [h("h3", {}, "Active"), h("p", { class: "notice info", "data-active-note": "" }, ACTIVE_NOTE),
        describe(active, "active")],
    h("p", { "data-building": state.building.length }, state.building.length
      ? ["Builds in progress: ", state.building.map((name, i) => [i ? ", " : "", h("code", {}, name)])]
      : "No build in progress."),
  ];
}

function describe(image, which) {
  return h("dl", { class: "meta", "data-image": which },
    h("dt", {}, "Hash"), h("dd", {}, h("code", { "data-hash": "" }, image.hash)),
    h("dt", {}, "Built"), h("dd", { title: image.built_at || "" }, image.built_at ? when(image.built_at) : "—"),
    h("dt", {}, "CLIs"), h("dd", {}, clis(image.clis)));
}

function clis(versions) {
  const entries = Object.entries(versions);
  if (!entries.length) return "—";
  return h("ul", { class: "clis" }, entries.map(([pkg, version]) => h("li", { "data-package": pkg },
    h("code", {}, pkg), " ", h("span", { "data-version": "" }, version))));
}

// The registry's answer: each CLI's version in use beside the latest (newer ones marked), or why it failed.
function available(state) {
  if (state.updates_error) {
    return h("p", { class: "notice error", role: "alert", "data-updates-error": "" },
      `The npm registry could not tell: ${state.updates_error}`);
  }
  if (!state.updates) return h("p", { class: "help" }, "Not checked yet.");
  const newer = state.updates.filter((u) => u.newer).length;
  return [
    h("table", { class: "table", "aria-labelledby": "image-updates-h", "data-table": "image-updates" },
      h("thead", {}, h("tr", {}, ["CLI", "Package", "In use", "Latest"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, state.updates.map(update))),
    h("p", { class: "help", "data-checked": "" },
      newer ? `${newer} newer version${newer > 1 ? "s" : ""} available` : "Every CLI is at its latest version",
      state.checked_at ? ` (checked ${when(new Date(state.checked_at * 1000).toISOString())}).` : "."),
  ];
}

function update(u) {
  return h("tr", { "data-package": u.package, "data-newer": String(u.newer), class: u.newer ? "newer" : null },
    h("td", {}, providerName(u.provider)),
    h("td", {}, h("code", {}, u.package)),
    h("td", { "data-current": "" }, u.current || "—"),
    h("td", { "data-latest": "" }, u.latest, u.newer && [" ", h("span", { class: "badge newer" }, "newer")]));
}
