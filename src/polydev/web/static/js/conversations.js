// A workspace's conversations as a thread: each turn's prompt, its events (replayed, or live while it runs),
// the files it changed and its diff; and the prompt box, which starts a conversation or continues the chosen one
// (the CLI resumes its own session, in the workspace's VM).

import { api, followRun, PROVIDERS, providerName, request, RUN_TERMINAL } from "./api.js";
import { h, notice, replace, say, when } from "./dom.js";
import { changesList, diffView } from "./diff.js";
import { eventView, statusBadge } from "./events.js";

export function thread(workspaceId, { signal, onTurnEnd }) {
  const list = h("div", { class: "thread" });
  const empty = h("p", { class: "help" }, "No conversations yet: ask something below.");
  const message = notice();
  const target = h("select", { id: "conversation", name: "conversation" });
  const provider = h("select", { id: "turn-provider", name: "provider" },
    PROVIDERS.map((p) => h("option", { value: p.id }, p.name)));
  const prompt = h("textarea", { id: "turn-prompt", name: "prompt", rows: "4", required: true });
  const form = h("form", { class: "card", "aria-labelledby": "ask-h", onsubmit: ask },
    h("h2", { id: "ask-h" }, "Ask"),
    h("label", { for: "conversation" }, "Conversation"), target,
    h("label", { for: "turn-provider" }, "Provider"), provider,
    h("label", { for: "turn-prompt" }, "Prompt"), prompt,
    h("button", { type: "submit" }, "Send"), message);
  const element = h("section", { "aria-labelledby": "conversations-h" },
    h("h2", { id: "conversations-h" }, "Conversations"), empty, list, form);

  let conversations = [];
  const sections = new Map();  // conversation id → its section
  const turns = new Set();      // run ids already shown (each streams once)
  let replays = Promise.resolve();  // finished turns replay one after another, not all at once

  target.addEventListener("change", pick);
  function pick() {
    const c = conversations.find((x) => x.id === target.value);
    if (c) provider.value = c.provider;
    provider.disabled = Boolean(c);  // a conversation keeps its provider
  }

  function drawTargets() {
    const keep = target.value;
    replace(target, h("option", { value: "" }, "New conversation"), conversations.map((c, i) =>
      h("option", { value: c.id }, `Conversation ${i + 1} · ${providerName(c.provider)} · ${turnCount(c)}`)));
    target.value = conversations.some((c) => c.id === keep) ? keep : "";
    pick();
  }
  const turnCount = (c) => `${c.runs.length} turn${c.runs.length === 1 ? "" : "s"}`;

  function choose(conversationId) {
    target.value = conversationId;
    pick();
    prompt.focus();
  }

  async function load() {
    try {
      conversations = await api("GET", `/api/workspaces/${workspaceId}/conversations`, undefined, { signal });
    } catch (e) {
      if (e.name !== "AbortError") say(message, e.message, "error");
      return;
    }
    empty.hidden = conversations.length > 0;
    conversations.forEach((c, i) => {
      let s = sections.get(c.id);
      if (!s) {
        s = section(c, i);
        sections.set(c.id, s);
        list.append(s.element);
      }
      replace(s.summary, `${providerName(c.provider)} · ${turnCount(c)} · started ${when(c.created_at)}`);
      c.runs.forEach((runId, n) => {
        if (turns.has(runId)) return;
        turns.add(runId);
        s.turns.append(turn(runId, n));
      });
    });
    drawTargets();
  }

  function section(c, i) {
    const summary = h("p", { class: "help" });
    const turnList = h("ol", { class: "turns" });
    const element = h("article", { class: "conversation", "data-conversation": c.id, "aria-labelledby": `conv-${c.id}` },
      h("div", { class: "conversation-head" },
        h("h3", { id: `conv-${c.id}` }, `Conversation ${i + 1}`),
        h("button", { type: "button", class: "secondary small", "aria-label": `Follow up on conversation ${i + 1}`,
          onclick: () => choose(c.id) }, "Follow up")),
      summary, turnList);
    return { element, summary, turns: turnList };
  }

  function turn(runId, n) {
    const badge = h("span", { class: "run-status", role: "status" });
    const cancel = h("span");
    const asked = h("pre", { class: "prompt" });
    const output = h("div", { class: "output", role: "log", "aria-live": "polite", "aria-label": `Turn ${n + 1} output` });
    const turnMessage = notice();
    const changes = h("div", { class: "turn-changes" });
    const element = h("li", { class: "turn card", "data-run": runId },
      h("div", { class: "turn-head" }, h("strong", {}, `Turn ${n + 1}`), badge, cancel,
        h("a", { href: `/app/runs/${runId}`, class: "help" }, "Run page")),
      asked, output, turnMessage, changes);

    function draw(run) {
      replace(badge, statusBadge(run.status));
      asked.textContent = run.prompt;
      replace(cancel, !RUN_TERMINAL.includes(run.status) && h("button", { type: "button", class: "danger small",
        onclick: async (e) => {
          e.target.disabled = true;
          try { draw(await api("POST", `/api/runs/${runId}/cancel`)); } catch (err) { say(turnMessage, err.message, "error"); }
        } }, "Cancel"));
      if (run.error_message) say(turnMessage, run.error_message, "error");
    }

    (async () => {
      try {
        let run = await api("GET", `/api/runs/${runId}`, undefined, { signal });
        draw(run);
        const show = eventView(output, run.provider);
        const stream = () => followRun(runId, { signal, onEvent: (ev) => {
          if (run.status === "queued") { run = { ...run, status: "running" }; draw(run); }
          show(ev);
        } });
        const live = !RUN_TERMINAL.includes(run.status);
        if (live) {
          await stream();
        } else {
          const mine = replays.then(stream);
          replays = mine.catch(() => {});
          await mine;
        }
        run = await api("GET", `/api/runs/${runId}`, undefined, { signal });  // the final status, its changes
        draw(run);
        await drawChanges(run);
        if (live) onTurnEnd?.(run);
      } catch (e) {
        if (e.name !== "AbortError") say(turnMessage, e.message, "error");
      }
    })();

    async function drawChanges(run) {
      if (run.changes == null) {
        replace(changes, h("p", { class: "help" }, "No changes were recorded for this turn."));
        return;
      }
      replace(changes, h("h4", {}, "Changed files"), changesList(run.changes));
      if (!run.changes.length) return;
      try {
        const res = await request("GET", `/api/runs/${runId}/diff`, { accept: "text/x-diff", signal });
        changes.append(h("details", { class: "diff-box", open: true }, h("summary", {}, "Diff"), diffView(await res.text())));
      } catch (e) {
        if (e.name !== "AbortError") changes.append(h("p", { class: "help" }, `No diff: ${e.message}`));
      }
    }
    return element;
  }

  async function ask(e) {
    e.preventDefault();
    const body = { provider: provider.value, prompt: prompt.value };
    if (target.value) body.conversation_id = target.value;
    else body.workspace_id = workspaceId;
    const send = form.querySelector("button[type=submit]");
    send.disabled = true;
    say(message, "");
    try {
      const run = await api("POST", "/api/runs", body);
      prompt.value = "";
      await load();  // the new turn appears, and streams
      if (run.conversation_id) target.value = run.conversation_id;  // the next prompt follows up
      pick();
      element.querySelector(`[data-run="${run.id}"]`)?.scrollIntoView({ block: "nearest" });
    } catch (err) {
      say(message, err.message, "error");
      if (err.body?.error?.action === "connect_provider") message.append(" ", h("a", { href: "/app/providers" }, "Connect it"));
    } finally {
      send.disabled = false;
    }
  }

  // Which providers can run (connected or with an API key): the first of them is the default.
  api("GET", "/api/credentials", undefined, { signal }).then((creds) => {
    const have = new Set(creds.map((c) => c.provider));
    for (const option of provider.options) {
      option.textContent = `${providerName(option.value)}${have.has(option.value) ? "" : " (not connected)"}`;
    }
    const first = [...provider.options].find((o) => have.has(o.value));
    if (first && !target.value) provider.value = first.value;
  }).catch(() => {});

  load();
  return { element, load };
}
