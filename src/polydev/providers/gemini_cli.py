"""Gemini CLI (`@google/gemini-cli`, the `gemini` script on Node). Facts: providers/FACTS.md."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from polydev.providers.base import (Command, GuestEnv, GuestFile, LoginMethod, LoginPlan, LoginPrompt, ProviderFacts,
                                    RunParser, catalog_entry, event, login_env)
from polydev.providers.common import StreamParser, int_fields, last_complete, present, run_env, tool_result

EXECUTABLE = catalog_entry("gemini_cli")["executable"]
SETTINGS_FILE = ".gemini/settings.json"
OAUTH_AUTH_TYPE = "oauth-personal"
API_KEY_AUTH_TYPE = "gemini-api-key"
# Gemini has no login command: the first run with OAuth selected and no credentials logs in, then runs this.
LOGIN_PROMPT = "Reply with the single word: ready"
_URL = r"https://accounts\.google\.com/o/oauth2/\S+"
_USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cached", "duration_ms", "tool_calls")


def settings(auth_type: str) -> bytes:
    """~/.gemini/settings.json: the auth type (a run fails without one) and usage statistics off (verified:
    no CONNECT at all in API-key mode; with them on it calls play.googleapis.com)."""
    doc = {"security": {"auth": {"selectedType": auth_type}}, "privacy": {"usageStatisticsEnabled": False}}
    return json.dumps(doc, indent=2).encode()


class GeminiCliAdapter(ProviderFacts):
    def __init__(self) -> None:
        super().__init__(**catalog_entry("gemini_cli"))

    def _settings_file(self, env: GuestEnv, auth_type: str) -> GuestFile:
        return GuestFile(env.home_path(SETTINGS_FILE), settings(auth_type), 0o600)

    def _cli_env(self, env: GuestEnv, *, api_key_mode: bool) -> dict[str, str | None]:
        # Without the trust variable `-p` stops with exit 55 in an untrusted folder.
        extra: dict[str, str | None] = {"GEMINI_CLI_TRUST_WORKSPACE": "true", "NODE_EXTRA_CA_CERTS": env.ca_cert_path}
        if env.api_base_url:
            # API-key mode talks to the Gemini API, OAuth mode to Code Assist: each has its own override.
            extra["GOOGLE_GEMINI_BASE_URL" if api_key_mode else "CODE_ASSIST_ENDPOINT"] = env.api_base_url
        return extra

    def login_plan(self, method: LoginMethod, env: GuestEnv) -> LoginPlan:
        if method != "browser":
            raise ValueError(f"{self.display_name} has no {method} login (it has: browser)")
        extra = present(self._cli_env(env, api_key_mode=False))
        # login_env sets DISPLAY: without a display Gemini does not call xdg-open (our hook) at all. It asks
        # "Do you want to continue? [Y/n]" on stdin first; stdin stays open as it did when this was verified.
        # `--prompt=…` in one argument, so that it is never read as an option; stdin is for the question.
        argv = [EXECUTABLE, f"--prompt={LOGIN_PROMPT}", "--output-format", "stream-json"]
        command = Command(argv, login_env(env, extra), env.home, stdin=b"Y\n", keep_stdin_open=True,
                          files=(self._settings_file(env, OAUTH_AUTH_TYPE),))
        # After logging in it goes on to run the prompt: the flow stops it once the credentials are complete.
        return LoginPlan(command, "browser", ends="files", accepts_code=False, callback_port=None)

    def parse_login_output(self, text: str) -> LoginPrompt:
        return LoginPrompt(auth_url=last_complete(_URL, text))

    def code_input(self, code: str) -> bytes:
        raise ValueError(f"{self.display_name} does not accept a pasted code in the browser login")

    def run_command(self, prompt: str, env: GuestEnv, *, api_key: str | None = None,
                    resume: str | None = None) -> Command:
        # --yolo: the VM is the sandbox; without it run_shell_command is not even offered to the model.
        # The prompt goes on stdin (with stdin not a terminal and no --prompt it runs non-interactively): an
        # argument is capped at 128 KiB by Linux and would show in process lists.
        # --resume UUID: the session `init` named, looked up in the project's chats (so: the same cwd).
        argv = [EXECUTABLE, "--output-format", "stream-json", "--yolo", *(["--resume", resume] if resume else [])]
        extra = {**self._cli_env(env, api_key_mode=api_key is not None), self.api_key_env: api_key}
        auth_type = API_KEY_AUTH_TYPE if api_key is not None else OAUTH_AUTH_TYPE
        return Command(argv, run_env(env, extra), env.workdir, stdin=prompt.encode(),
                       files=(self._settings_file(env, auth_type),))

    def new_parser(self) -> RunParser:
        return GeminiParser()


class GeminiParser(StreamParser):
    """`gemini -p … --output-format stream-json`: init, message, tool_use, tool_result, error, result."""

    cli = "gemini"
    known_types = frozenset({"init", "message", "tool_use", "tool_result", "error", "result"})
    # Observed at 0.61.0. 41 comes with "Manual authorization is required but the current session is
    # non-interactive" on stderr when the stored login is missing or no longer accepted.
    exit_reasons: ClassVar[Mapping[int, str]] = {
        41: "not logged in, or the stored login was refused: log in again (or use an API key)",
        55: "the folder is not trusted (GEMINI_CLI_TRUST_WORKSPACE missing)"}

    def __init__(self) -> None:
        super().__init__()
        self._text: list[str] = []

    def _map(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        kind = obj.get("type")
        if kind == "init":
            return [event("status", message=f"session started (model {obj.get('model')})", model=obj.get("model"),
                          session_id=obj.get("session_id"))]
        if kind == "message" and obj.get("role") == "assistant" and obj.get("content"):
            self._text.append(str(obj["content"]))
            return [event("text", text=str(obj["content"]))]
        if kind == "tool_use":
            return [event("tool_call", id=obj.get("tool_id"), name=obj.get("tool_name"),
                          input=obj.get("parameters") or {})]
        if kind == "tool_result":
            error = obj.get("error")
            output = obj.get("output")
            if output is None and isinstance(error, dict):
                output = error.get("message")
            return [tool_result(obj.get("tool_id"), output, is_error=obj.get("status") != "success")]
        if kind == "error":
            return self._warn(obj.get("message"))
        if kind == "result":
            self._result(obj)
        return []

    def _result(self, obj: dict[str, Any]) -> None:
        if obj.get("status") == "success":
            self._succeed(int_fields(obj.get("stats") or {}, _USAGE_FIELDS), "".join(self._text))
        else:
            error = obj.get("error")
            self._fail(error.get("message") if isinstance(error, dict) else error or obj.get("status"))
