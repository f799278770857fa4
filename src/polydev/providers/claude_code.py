"""Claude Code (`@anthropic-ai/claude-code`, the `claude` binary). Facts: providers/FACTS.md."""

from __future__ import annotations

import json
from typing import Any

from polydev.providers.base import (Command, GuestEnv, LoginMethod, LoginPlan, LoginPrompt, ProviderFacts, RunParser,
                                    catalog_entry, event, login_env)
from polydev.providers.common import StreamParser, clean, int_fields, last_complete, present, run_env, tool_result

EXECUTABLE = catalog_entry("claude_code")["executable"]
# The authorize URL `claude auth login` prints next to "Paste code here if prompted >" (its redirect is the
# hosted code page, for the paste flow); the one given to $BROWSER redirects to the localhost callback.
_URL = r"https://\S+/oauth/authorize\?\S+"
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def background_off() -> dict[str, str]:
    """No telemetry, update checks or other calls home (verified: no CONNECT at all in API-key mode)."""
    return {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


class ClaudeCodeAdapter(ProviderFacts):
    def __init__(self) -> None:
        super().__init__(**catalog_entry("claude_code"))

    def _cli_env(self, env: GuestEnv) -> dict[str, str | None]:
        return {**background_off(), "NODE_EXTRA_CA_CERTS": env.ca_cert_path}

    def login_plan(self, method: LoginMethod, env: GuestEnv) -> LoginPlan:
        if method != "browser":
            raise ValueError(f"{self.display_name} has no {method} login (it has: browser)")
        # A PTY: the paste-code prompt reads the terminal. The callback port is random (localhost:PORT).
        command = Command([EXECUTABLE, "auth", "login"], login_env(env, present(self._cli_env(env))), env.home,
                          pty=True, keep_stdin_open=True)
        return LoginPlan(command, "browser", ends="exit", accepts_code=True, callback_port=None)

    def parse_login_output(self, text: str) -> LoginPrompt:
        return LoginPrompt(auth_url=last_complete(_URL, text))

    def code_input(self, code: str) -> bytes:
        # The hosted page shows `code#state`; Enter on a PTY is a carriage return.
        return code.strip().encode() + b"\r"

    def run_command(self, prompt: str, env: GuestEnv, *, api_key: str | None = None,
                    resume: str | None = None) -> Command:
        # bypassPermissions: the VM is the sandbox, so every tool may run without asking (in `-p` mode a tool
        # needing approval is simply denied). As root it is refused unless IS_SANDBOX=1 says we are sandboxed.
        # The prompt goes on stdin (read to its end by `-p` with no prompt argument): an argument is capped at
        # 128 KiB by Linux, would show in process lists, and could be read as an option if it began with "-".
        argv = [EXECUTABLE, "-p", "--output-format", "stream-json", "--verbose",
                "--permission-mode", "bypassPermissions", *(["--resume", resume] if resume else [])]
        extra = {**self._cli_env(env), "ANTHROPIC_BASE_URL": env.api_base_url, "IS_SANDBOX": "1",
                 self.api_key_env: api_key}
        return Command(argv, run_env(env, extra), env.workdir, stdin=prompt.encode())

    def new_parser(self) -> RunParser:
        return ClaudeParser()


def _tool_output(content: Any) -> str:
    """A tool_result's content: a string, or a list of blocks of which the text ones are kept."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [b.get("text", "") if isinstance(b, dict) and b.get("type") == "text" else
                 (b if isinstance(b, str) else json.dumps(b)) for b in content]
        return "\n".join(p for p in parts if p)
    return "" if content is None else json.dumps(content)


class ClaudeParser(StreamParser):
    """`claude -p --output-format stream-json --verbose`: one JSON object per line."""

    cli = "claude"
    known_types = frozenset({"system", "assistant", "user", "result", "rate_limit_event", "stream_event"})

    def _map(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        kind = obj.get("type")
        if kind == "system":
            return self._system(obj)
        if kind == "assistant":
            return self._assistant(obj)
        if kind == "user":
            return self._tool_results(obj)
        if kind == "result":
            self._result(obj)
        # rate_limit_event, stream_event (partial messages are not asked for): nothing to show.
        return []

    def _system(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        if obj.get("subtype") == "init":
            return [event("status", message=f"session started (model {obj.get('model')})", model=obj.get("model"),
                          session_id=obj.get("session_id"), cli_version=obj.get("claude_code_version"))]
        if obj.get("subtype") == "api_retry":
            return self._warn(f"API error {obj.get('error_status')} ({obj.get('error')}), "
                              f"retry {obj.get('attempt')}/{obj.get('max_retries')}")
        if "error" in obj:
            return self._warn(obj["error"])
        return []

    def _assistant(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        message = obj.get("message") or {}
        if message.get("model") == "<synthetic>":
            return []  # the CLI's own error text (e.g. "Failed to authenticate"), repeated in the result line
        out: list[dict[str, Any]] = []
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and block.get("text"):
                out.append(event("text", text=block["text"]))
            elif block.get("type") == "tool_use":
                out.append(event("tool_call", id=block.get("id"), name=block.get("name"),
                                 input=block.get("input") or {}))
        return out

    def _tool_results(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        content = (obj.get("message") or {}).get("content")
        if not isinstance(content, list):
            return []  # the prompt echoed back, not a tool result
        return [tool_result(b.get("tool_use_id"), _tool_output(b.get("content")),
                            is_error=bool(b.get("is_error")))
                for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]

    def _result(self, obj: dict[str, Any]) -> None:
        # `is_error` can be set with subtype "success" (e.g. an API error the CLI gave up on).
        if obj.get("subtype") == "success" and not obj.get("is_error"):
            usage: dict[str, Any] = int_fields(obj.get("usage") or {}, _USAGE_FIELDS)
            if isinstance(obj.get("total_cost_usd"), (int, float)):
                usage["cost_usd"] = float(obj["total_cost_usd"])
            self._succeed(usage, obj.get("result") if isinstance(obj.get("result"), str) else None,
                          num_turns=obj.get("num_turns"), session_id=obj.get("session_id"))
        else:
            errors = obj.get("errors")
            detail = obj.get("result") or ("; ".join(map(str, errors)) if isinstance(errors, list) and errors
                                           else obj.get("subtype"))
            self._fail(clean(detail))
