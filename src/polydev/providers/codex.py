"""OpenAI Codex CLI (`@openai/codex`, the `codex` binary). Facts: providers/FACTS.md."""

from __future__ import annotations

from typing import Any

from polydev.providers.base import (Command, GuestEnv, LoginMethod, LoginPlan, LoginPrompt, ProviderFacts, RunParser,
                                    catalog_entry, event, login_env)
from polydev.providers.common import StreamParser, clean, int_fields, last_complete, present, run_env, tool_result

EXECUTABLE = catalog_entry("codex")["executable"]
CALLBACK_PORT = 1455  # fixed: http://127.0.0.1:1455/auth/callback
DEVICE_URL = "https://auth.openai.com/codex/device"
# The provider id used when the API is redirected (Codex ignores OPENAI_BASE_URL; only a custom
# `model_providers` entry moves it).
CUSTOM_PROVIDER = "polydev"
# The default model (gpt-6.2-sol at 0.171.0) offers no tools to a custom provider; this one, from the
# built-in catalog, does (exec_command, apply_patch, …).
CUSTOM_PROVIDER_MODEL = "gpt-5.5"
_URL = r"https://\S+/oauth/authorize\?\S+"
# The device code is printed on a line of its own, e.g. "ABCD-1234" (letters and digits around one dash).
_DEVICE_CODE = r"\b[A-Z0-9]{4,}-[A-Z0-9]{4,}"
_DEVICE_URL = r"https://\S+/codex/device"
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_input_tokens",
                 "reasoning_output_tokens")


def background_off() -> list[str]:
    """No analytics and no plugin sync (verified: no CONNECT at all in API-key mode)."""
    return ["-c", "analytics.enabled=false", "--disable", "plugins"]


def provider_args(api_base_url: str, *, api_key_env: str | None) -> list[str]:
    """Send the API to `api_base_url`: with `api_key_env` the key comes from that variable, else the stored
    ChatGPT login's access token is sent (`requires_openai_auth`), which is also what makes Codex refresh it."""
    auth = f'env_key="{api_key_env}"' if api_key_env else "requires_openai_auth=true"
    base = api_base_url.rstrip("/") + "/v1"
    entry = f'{{name="{CUSTOM_PROVIDER}",base_url="{base}",{auth},supports_websockets=false}}'
    return ["-c", f"model_provider={CUSTOM_PROVIDER}", "-c", f"model_providers.{CUSTOM_PROVIDER}={entry}"]


class CodexAdapter(ProviderFacts):
    def __init__(self) -> None:
        super().__init__(**catalog_entry("codex"))

    def _cli_env(self, env: GuestEnv) -> dict[str, str | None]:
        # No CODEX_HOME: its default is ~/.codex, which Codex creates when missing (an API-key run has no
        # files to restore), whereas a CODEX_HOME that does not exist yet is a fatal error.
        return {"CODEX_CA_CERTIFICATE": env.ca_cert_path}

    def login_plan(self, method: LoginMethod, env: GuestEnv) -> LoginPlan:
        extra = present(self._cli_env(env))
        if method == "browser":
            # The login exits only after its /success page was loaded (the browser follows the callback's
            # redirect there; a flow calling the callback itself must fetch that page too).
            command = Command([EXECUTABLE, "login", *background_off()], login_env(env, extra), env.home)
            return LoginPlan(command, "browser", callback_port=CALLBACK_PORT)
        if method == "device":
            command = Command([EXECUTABLE, "login", "--device-auth", *background_off()], login_env(env, extra),
                              env.home)
            return LoginPlan(command, "device")
        raise ValueError(f"{self.display_name} has no {method} login (it has: browser, device)")

    def parse_login_output(self, text: str) -> LoginPrompt:
        device_url = last_complete(_DEVICE_URL, text)
        return LoginPrompt(auth_url=last_complete(_URL, text),
                           device_code=last_complete(_DEVICE_CODE, text) if device_url else None,
                           verification_url=device_url)

    def code_input(self, code: str) -> bytes:
        raise ValueError(f"{self.display_name} does not accept a pasted code (use the device login)")

    def run_command(self, prompt: str, env: GuestEnv, *, api_key: str | None = None,
                    resume: str | None = None) -> Command:
        # `-s danger-full-access`: the VM is the sandbox. The prompt goes on stdin (`-` as the prompt): an
        # argument is capped at 128 KiB by Linux, would show in process lists, and could look like an option.
        argv = [EXECUTABLE, "exec", "--json", "--skip-git-repo-check", *background_off(),
                "-s", "danger-full-access"]
        if env.api_base_url:
            argv += provider_args(env.api_base_url, api_key_env=self.api_key_env if api_key else None)
            argv += ["-m", CUSTOM_PROVIDER_MODEL]
        extra = {**self._cli_env(env), self.api_key_env: api_key}
        # `exec resume ID -`: the thread `thread.started` named, found under ~/.codex/sessions; exec's options
        # above stay in force.
        tail = ["resume", resume, "-"] if resume else ["-"]
        return Command([*argv, *tail], run_env(env, extra), env.workdir, stdin=prompt.encode())

    def new_parser(self) -> RunParser:
        return CodexParser()


def _tool_call(item: dict[str, Any]) -> dict[str, Any] | None:
    """The tool_call for an item that runs something, or None for items that are not tool calls."""
    kind, item_id = item.get("type"), item.get("id")
    if kind == "command_execution":
        return event("tool_call", id=item_id, name="command_execution", input={"command": item.get("command")})
    if kind == "file_change":
        return event("tool_call", id=item_id, name="file_change", input={"changes": item.get("changes") or []})
    if kind == "mcp_tool_call":
        name = f"{item.get('server')}.{item.get('tool')}"
        return event("tool_call", id=item_id, name=name, input=item.get("arguments") or {})
    if kind == "web_search":
        return event("tool_call", id=item_id, name="web_search", input={"query": item.get("query")})
    return None


def _tool_result(item: dict[str, Any]) -> dict[str, Any]:
    kind, status = item.get("type"), item.get("status")
    if kind == "command_execution":
        exit_code = item.get("exit_code")
        return tool_result(item.get("id"), item.get("aggregated_output") or "",
                           is_error=status == "failed" or (isinstance(exit_code, int) and exit_code != 0),
                           exit_code=exit_code)
    if kind == "mcp_tool_call":
        error = item.get("error")
        output = clean(error.get("message") if isinstance(error, dict) else error) if error else item.get("result")
        return tool_result(item.get("id"), output, is_error=status == "failed" or bool(error))
    return tool_result(item.get("id"), str(status or ""), is_error=status == "failed")


class CodexParser(StreamParser):
    """`codex exec --json`: thread/turn/item events, one JSON object per line."""

    cli = "codex"
    known_types = frozenset({"thread.started", "turn.started", "item.started", "item.updated", "item.completed",
                             "turn.completed", "turn.failed", "error"})

    def __init__(self) -> None:
        super().__init__()
        self._called: set[str] = set()  # items whose tool_call was already emitted
        self._last_message: str | None = None

    def _map(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        kind = obj.get("type")
        raw = obj.get("item")
        item: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if kind == "thread.started":
            return [event("status", message="session started", session_id=obj.get("thread_id"))]
        if kind == "item.started":
            return self._call(item)
        if kind == "item.completed":
            return self._completed(item)
        if kind == "turn.completed":
            usage = int_fields(obj.get("usage") or {}, _USAGE_FIELDS)
            self._succeed(usage, self._last_message)
        elif kind == "turn.failed":
            error = obj.get("error")
            self._fail(error.get("message") if isinstance(error, dict) else error)
        elif kind == "error":
            # Also sent for retries ("Reconnecting... 1/5"); a fatal one is followed by turn.failed.
            return self._warn(obj.get("message"))
        return []

    def _call(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        call = _tool_call(item)
        if call is None or str(item.get("id")) in self._called:
            return []
        self._called.add(str(item.get("id")))
        return [call]

    def _completed(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        kind = item.get("type")
        if kind == "agent_message":
            self._last_message = item.get("text") or ""
            return [event("text", text=self._last_message)] if self._last_message else []
        if kind == "error":
            return self._warn(item.get("message"))  # e.g. "Model metadata for … not found"
        if _tool_call(item) is None:
            return []  # reasoning, todo_list: nothing to show
        return [*self._call(item), _tool_result(item)]
