// A run's events drawn into its output box, as they stream in (runs.js for one run, workspaces.js for each turn
// of a conversation): text, tool calls and their results, notes, errors, and the closing "done".

import { h } from "./dom.js";

export function statusBadge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

// Returns show(event), which appends that event to `output` and keeps the box scrolled to its end.
export function eventView(output, provider) {
  let text = null;  // the text block that `text` events are appended to
  // Gemini streams a message as deltas (one text event each); Claude Code and Codex send whole blocks.
  const deltas = provider === "gemini_cli";
  function add(node) {
    output.append(node);
    output.scrollTop = output.scrollHeight;
  }
  return function show(ev) {
    switch (ev.type) {
      case "text":
        if (!text || !deltas) { text = h("div", { class: "text" }); add(text); }
        text.append(ev.text);
        return;
      case "tool_call":
        text = null;
        add(h("div", { class: "tool call" }, h("span", { class: "label" }, `tool ${ev.name || ""}`),
          h("pre", {}, ev.input?.command ?? JSON.stringify(ev.input ?? {}, null, 2))));
        return;
      case "tool_result":
        text = null;
        add(h("div", { class: `tool result${ev.is_error ? " error" : ""}` }, h("span", { class: "label" }, "result"),
          h("pre", {}, typeof ev.output === "string" ? ev.output : JSON.stringify(ev.output, null, 2))));
        return;
      case "status":
        add(h("p", { class: "event note" }, ev.message || ""));
        return;
      case "error":
        text = null;
        add(h("p", { class: "event error" }, `Error: ${ev.message || ""}`));
        return;
      case "done": {
        text = null;
        const tokens = ev.usage?.output_tokens;
        add(h("p", { class: "event done" }, `Done${tokens != null ? ` · ${tokens} output tokens` : ""}`));
        return;
      }
      default:
    }
  };
}
