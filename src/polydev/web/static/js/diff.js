// A turn's changes: the files it changed, and its patch (`git diff`) drawn line by line with +/- colours. All
// of it is text from the workspace, so it goes into the page as text only.

import { h } from "./dom.js";

export function changesList(changes) {
  if (!changes.length) return h("p", { class: "help", "data-changes": "none" }, "No files changed.");
  return h("ul", { class: "changes", "aria-label": "Changed files" }, changes.map((c) => h("li", {
    "data-path": c.path, "data-change": c.status },
  h("span", { class: `change ${c.status}` }, c.status), " ", h("code", {}, c.path),
  c.from && [" from ", h("code", {}, c.from)],
  (c.added != null || c.deleted != null) && h("span", { class: "counts" }, ` +${c.added ?? 0} −${c.deleted ?? 0}`),
  c.binary && h("span", { class: "help" }, " (binary)"))));
}

// Each line's kind: a file's header lines, a hunk's header, then within the hunk what each line's first
// character says (a content line always starts with "+", "-", " " or "\").
export function diffLines(patch) {
  const out = [];
  let inHunk = false;
  const lines = patch.split("\n");
  if (lines.at(-1) === "") lines.pop();
  for (const line of lines) {
    let kind;
    if (line.startsWith("diff --git ")) { kind = "file"; inHunk = false; }
    else if (line.startsWith("@@")) { kind = "hunk"; inHunk = true; }
    else if (!inHunk) kind = "meta";
    else if (line.startsWith("+")) kind = "add";
    else if (line.startsWith("-")) kind = "del";
    else if (line.startsWith(" ") || line === "") kind = "context";
    else kind = "meta";  // "\ No newline at end of file", or Polydev's note that the patch was cut
    out.push([kind, line]);
  }
  return out;
}

export function diffView(patch) {
  if (!patch.trim()) return h("p", { class: "help" }, "The diff is empty.");
  return h("pre", { class: "diff", "aria-label": "Diff" },
    diffLines(patch).map(([kind, line]) => h("span", { class: "line", "data-line": kind }, line || " ")));
}
