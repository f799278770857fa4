"""Provider adapters: commands per mode, login plans, and the parsers fed with real recorded CLI output.

The recordings under data/providers/ are the real CLIs' output, made by running each adapter's own
command against the stand-ins (`python -m tests.standins.record_providers`); index.json has their exit codes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from polydev.providers import ADAPTERS, get_adapter
from polydev.providers.base import EVENT_TYPES, Command, GuestEnv, ProviderAdapter
from polydev.providers.codex import CALLBACK_PORT, DEVICE_URL
from polydev.providers.common import MAX_TOOL_OUTPUT

DATA = Path(__file__).parents[1] / "data" / "providers"
INDEX: dict[str, dict[str, Any]] = json.loads((DATA / "index.json").read_text())
KEY = "sk-test-secret-" + "x" * 20
ENV = GuestEnv(https_proxy="http://10.0.2.2:3128", ca_cert_path="/run/polydev/ca.pem",
               api_base_url="http://10.0.2.2:8080")
BARE = GuestEnv()
CA_VAR = {"claude_code": "NODE_EXTRA_CA_CERTS", "codex": "CODEX_CA_CERTIFICATE", "gemini_cli": "NODE_EXTRA_CA_CERTS"}
NOTE = "note-recorded-4f2a"  # what note.txt held in the tool round-trip recordings
PROVIDERS = sorted(ADAPTERS)


def adapter(name: str) -> ProviderAdapter:
    return get_adapter(name)


def settings_of(cmd: Command, env: GuestEnv) -> dict[str, Any]:
    files = {f.path: f for f in cmd.files}
    settings = files[env.home_path(".gemini/settings.json")]
    assert settings.mode == 0o600
    doc: dict[str, Any] = json.loads(settings.data)
    return doc


def recorded(name: str, stream: str = "stdout") -> list[str]:
    return (DATA / f"{name}.{stream}").read_text().splitlines()


def parse(provider: str, lines: list[str], exit_code: int | None) -> list[dict[str, Any]]:
    parser = adapter(provider).new_parser()
    events = [e for line in lines for e in parser.feed(line)]
    return events if exit_code is None else events + parser.finish(exit_code)


def parse_recording(provider: str, name: str) -> list[dict[str, Any]]:
    assert INDEX[name]["provider"] == provider
    # stderr is fed too: a flow may pass both streams, and nothing on stderr may become an event.
    return parse(provider, recorded(name) + recorded(name, "stderr"), INDEX[name]["exit_code"])


# -- registry ----------------------------------------------------------------------------------------------

def test_registry_has_the_three_providers_under_their_own_names() -> None:
    assert PROVIDERS == ["claude_code", "codex", "gemini_cli"]
    for name, a in ADAPTERS.items():
        assert a.name == name and get_adapter(name) is a
        assert set(a.required_credential_files) <= set(a.credential_files)
        assert all(not p.startswith("/") for p in a.credential_files)


def test_unknown_provider_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        get_adapter("cursor")
    assert "cursor" in str(err.value) and all(name in str(err.value) for name in PROVIDERS)


def test_credential_files_are_the_current_paths() -> None:
    assert ADAPTERS["claude_code"].required_credential_files == (".claude/.credentials.json",)
    assert ".claude.json" in ADAPTERS["claude_code"].credential_files
    assert ADAPTERS["codex"].credential_files == (".codex/auth.json",)
    assert ADAPTERS["gemini_cli"].required_credential_files == (".gemini/oauth_creds.json",)
    assert ".gemini/google_accounts.json" in ADAPTERS["gemini_cli"].credential_files


# -- run commands ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_api_key_goes_in_the_environment_never_in_argv_or_files(provider: str) -> None:
    a = adapter(provider)
    cmd = a.run_command("hello", ENV, api_key=KEY)
    assert cmd.env[a.api_key_env] == KEY
    assert not any(KEY in arg for arg in cmd.argv)
    assert not any(KEY.encode() in f.data for f in cmd.files)
    assert [k for k, v in cmd.env.items() if v == KEY] == [a.api_key_env]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_oauth_mode_sets_no_key_variable(provider: str) -> None:
    a = adapter(provider)
    cmd = a.run_command("hello", ENV)
    assert a.api_key_env not in cmd.env
    assert not any("KEY" in k for k in cmd.env)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_run_environment_has_proxy_ca_and_home_and_nothing_of_the_host(
        provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYDEV_HOST_ONLY", "leak")
    cmd = adapter(provider).run_command("hello", ENV)
    assert {k: cmd.env[k] for k in ENV.proxy_vars()} == ENV.proxy_vars()
    assert cmd.env["HTTPS_PROXY"] == "http://10.0.2.2:3128" and "127.0.0.1" in cmd.env["NO_PROXY"]
    assert cmd.env[CA_VAR[provider]] == "/run/polydev/ca.pem"
    assert cmd.env["HOME"] == "/root" and cmd.cwd == "/root/work"
    assert cmd.env["PATH"].split(":")[0] == "/usr/local/bin"
    assert "POLYDEV_HOST_ONLY" not in cmd.env
    assert not cmd.pty


@pytest.mark.parametrize("provider", PROVIDERS)
def test_without_proxy_ca_or_base_url_none_of_their_variables_is_set(provider: str) -> None:
    cmd = adapter(provider).run_command("hello", BARE, api_key=KEY)
    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "NODE_EXTRA_CA_CERTS", "CODEX_CA_CERTIFICATE",
                "ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "CODE_ASSIST_ENDPOINT"):
        assert var not in cmd.env
    assert not any("model_provider" in arg for arg in cmd.argv)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_prompt_goes_on_stdin_not_in_argv(provider: str) -> None:
    prompt = "--help me " + "é" * 70_000  # an option look-alike, over Linux's 128 KiB per argument
    cmd = adapter(provider).run_command(prompt, ENV, api_key=KEY)
    assert cmd.stdin == prompt.encode() and not cmd.keep_stdin_open
    assert not any("help me" in arg for arg in cmd.argv)
    assert sum(len(a) for a in cmd.argv) < 1000


def test_claude_run_is_stream_json_with_permissions_bypassed_and_no_background_traffic() -> None:
    cmd = ADAPTERS["claude_code"].run_command("hello", ENV)
    assert cmd.argv[:5] == ["claude", "-p", "--output-format", "stream-json", "--verbose"]
    assert cmd.argv[cmd.argv.index("--permission-mode") + 1] == "bypassPermissions"
    assert cmd.env["IS_SANDBOX"] == "1"  # bypassPermissions is refused to root otherwise
    assert cmd.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert cmd.env["ANTHROPIC_BASE_URL"] == "http://10.0.2.2:8080"
    assert cmd.files == ()


def test_codex_run_turns_background_off_and_the_sandbox_off() -> None:
    argv = ADAPTERS["codex"].run_command("hello", BARE, api_key=KEY).argv
    assert argv[:4] == ["codex", "exec", "--json", "--skip-git-repo-check"]
    assert argv[argv.index("analytics.enabled=false") - 1] == "-c"
    assert argv[argv.index("--disable") + 1] == "plugins"
    assert argv[argv.index("-s") + 1] == "danger-full-access"
    assert "-m" not in argv  # the real provider: the CLI's default model
    assert argv[-1] == "-"  # the prompt comes from stdin


@pytest.mark.parametrize(("api_key", "auth"), [(KEY, 'env_key="CODEX_API_KEY"'), (None, "requires_openai_auth=true")])
def test_codex_base_url_is_a_custom_provider(api_key: str | None, auth: str) -> None:
    argv = ADAPTERS["codex"].run_command("hello", ENV, api_key=api_key).argv
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
    assert "model_provider=polydev" in configs
    entry = next(c for c in configs if c.startswith("model_providers.polydev="))
    assert 'base_url="http://10.0.2.2:8080/v1"' in entry and auth in entry and "supports_websockets=false" in entry
    assert argv[argv.index("-m") + 1] == "gpt-5.5"  # tools are offered to a custom provider with this one
    assert argv.index("-m") < argv.index("-")


@pytest.mark.parametrize(("api_key", "auth_type", "base_var", "other_var"), [
    (KEY, "gemini-api-key", "GOOGLE_GEMINI_BASE_URL", "CODE_ASSIST_ENDPOINT"),
    (None, "oauth-personal", "CODE_ASSIST_ENDPOINT", "GOOGLE_GEMINI_BASE_URL")])
def test_gemini_settings_and_base_url_follow_the_auth_mode(
        api_key: str | None, auth_type: str, base_var: str, other_var: str) -> None:
    cmd = ADAPTERS["gemini_cli"].run_command("hello", ENV, api_key=api_key)
    settings = settings_of(cmd, ENV)
    assert settings["security"]["auth"]["selectedType"] == auth_type
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert cmd.env[base_var] == "http://10.0.2.2:8080" and other_var not in cmd.env
    assert cmd.env["GEMINI_CLI_TRUST_WORKSPACE"] == "true"
    assert "--yolo" in cmd.argv and cmd.argv[cmd.argv.index("--output-format") + 1] == "stream-json"


def test_settings_files_are_not_credentials() -> None:
    for a in ADAPTERS.values():
        paths = {f.path for f in a.run_command("hello", BARE).files}
        assert not paths & {BARE.home_path(p) for p in a.credential_files}


# -- login plans -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_browser_login_uses_the_hook_a_display_and_the_network_path(provider: str) -> None:
    plan = adapter(provider).login_plan("browser", ENV)
    env = plan.command.env
    assert plan.method == "browser"
    assert env["BROWSER"] == ENV.browser_hook and env["PATH"].split(":")[0] == ENV.hook_bin
    assert env["DISPLAY"]  # Claude and Gemini open no browser without one
    assert env["HTTPS_PROXY"] == ENV.https_proxy and env[CA_VAR[provider]] == ENV.ca_cert_path
    # The hook script itself is the platform's to write (with or without the in-VM browser behind it).
    assert not {f.path for f in plan.command.files} & {ENV.browser_hook, f"{ENV.hook_bin}/xdg-open"}
    assert adapter(provider).api_key_env not in env


def test_claude_login_runs_under_a_pty_and_takes_a_pasted_code() -> None:
    a = ADAPTERS["claude_code"]
    plan = a.login_plan("browser", ENV)
    assert plan.command.argv == ["claude", "auth", "login"]
    assert plan.command.pty and plan.command.keep_stdin_open and plan.accepts_code
    assert plan.ends == "exit" and plan.callback_port is None
    assert plan.command.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert a.code_input("  abc123#state-xyz \n") == b"abc123#state-xyz\r"
    with pytest.raises(ValueError):
        a.login_plan("device", ENV)


def test_codex_logins_browser_on_its_fixed_port_and_device_code() -> None:
    a = ADAPTERS["codex"]
    assert a.login_methods == ("browser", "device")
    browser = a.login_plan("browser", ENV)
    assert browser.command.argv[:2] == ["codex", "login"] and browser.callback_port == CALLBACK_PORT == 1455
    assert not browser.accepts_code and "analytics.enabled=false" in browser.command.argv
    device = a.login_plan("device", ENV)
    assert device.method == "device" and "--device-auth" in device.command.argv and device.ends == "exit"
    with pytest.raises(ValueError):
        a.code_input("123")


def test_gemini_login_is_a_prompt_run_that_the_flow_stops_when_the_files_are_there() -> None:
    a = ADAPTERS["gemini_cli"]
    plan = a.login_plan("browser", ENV)
    assert plan.ends == "files" and not plan.accepts_code
    assert plan.command.stdin == b"Y\n"  # "Do you want to continue? [Y/n]"
    assert settings_of(plan.command, ENV)["security"]["auth"]["selectedType"] == "oauth-personal"
    assert plan.command.env["CODE_ASSIST_ENDPOINT"] == ENV.api_base_url
    with pytest.raises(ValueError):
        a.login_plan("device", ENV)


def test_codex_device_code_and_link_from_real_device_auth_output() -> None:
    text = (DATA / "codex_device_login.out").read_text()
    assert "\x1b[" in text  # coloured even without a terminal
    prompt = ADAPTERS["codex"].parse_login_output(text)
    assert prompt.device_code == INDEX["codex_device_login"]["user_code"]
    assert prompt.verification_url == DEVICE_URL and prompt.auth_url is None


def test_codex_auth_url_from_real_login_output() -> None:
    text = (DATA / "codex_browser_login.out").read_text()
    prompt = ADAPTERS["codex"].parse_login_output(text)
    assert prompt.auth_url == (DATA / "codex_browser_login.url").read_text().strip()
    assert prompt.device_code is None


def test_claude_auth_url_from_real_pty_login_output() -> None:
    text = (DATA / "claude_paste_login.pty").read_bytes().decode()  # keeps the PTY's \r
    url = ADAPTERS["claude_code"].parse_login_output(text).auth_url
    assert url is not None and url.startswith("https://claude.com/cai/oauth/authorize?")
    state = parse_qs(urlparse(url).query)["state"][0]
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", state) and f"state={state}\r" in text  # not the \r after it
    assert "redirect_uri=https%3A%2F%2Fplatform.claude.com%2Foauth%2Fcode%2Fcallback" in url
    assert INDEX["claude_paste_login"]["exit_code"] == 0  # the pasted code#state completed the login


def test_gemini_auth_url_from_output() -> None:
    url = (DATA / "gemini_browser_login.url").read_text().strip()
    text = f"Please visit the following URL to authorize the application:\n\n{url}\n\nEnter the authorization code:"
    assert ADAPTERS["gemini_cli"].parse_login_output(text).auth_url == url


def test_a_url_or_code_cut_off_at_the_end_of_the_output_so_far_is_not_taken() -> None:
    device = (DATA / "codex_device_login.out").read_text()
    code = INDEX["codex_device_login"]["user_code"]
    cut = device[: device.index(code) + len(code) - 1]  # the last character has not arrived yet
    assert ADAPTERS["codex"].parse_login_output(cut).device_code is None
    browser = (DATA / "codex_browser_login.out").read_text()
    url = (DATA / "codex_browser_login.url").read_text().strip()
    assert ADAPTERS["codex"].parse_login_output(browser[: browser.index(url) + 60]).auth_url is None
    pty = (DATA / "claude_paste_login.pty").read_bytes().decode()
    assert ADAPTERS["claude_code"].parse_login_output(pty[: pty.index("&state=") + 10]).auth_url is None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_url_yet_is_an_empty_prompt(provider: str) -> None:
    prompt = adapter(provider).parse_login_output("Starting…\nWarning: TERM=dumb\n")
    assert (prompt.auth_url, prompt.device_code, prompt.verification_url) == (None, None, None)


# -- parsers on real output --------------------------------------------------------------------------------

ROUND_TRIPS = [("claude_code", "claude_tool_round_trip", "Bash", "cat note.txt"),
               ("codex", "codex_tool_round_trip", "command_execution", "/bin/bash -lc 'cat note.txt'"),
               ("gemini_cli", "gemini_tool_round_trip", "run_shell_command", "cat note.txt")]


@pytest.mark.parametrize(("provider", "name", "tool", "command"), ROUND_TRIPS)
def test_tool_round_trip_maps_to_call_result_text_done(provider: str, name: str, tool: str, command: str) -> None:
    events = parse_recording(provider, name)
    kinds = [e["type"] for e in events]
    assert kinds == ["status", "tool_call", "tool_result", "text", "done"]
    assert all(k in EVENT_TYPES for k in kinds)
    call, result, text, done = events[1:]
    assert call["name"] == tool and call["input"]["command"] == command and call["id"]
    assert result["id"] == call["id"] and NOTE in result["output"] and result["is_error"] is False
    assert text["text"].startswith("The note says") and NOTE in text["text"]
    assert done["result"] == text["text"]
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] >= 0
    assert all(isinstance(v, (int, float)) for v in done["usage"].values())


def test_claude_done_carries_cost_and_turns_and_init_the_version() -> None:
    events = parse_recording("claude_code", "claude_tool_round_trip")
    assert events[0]["cli_version"] == INDEX["claude_tool_round_trip"]["version"]
    assert events[-1]["num_turns"] == 2 and "cost_usd" in events[-1]["usage"]


def test_codex_and_gemini_usage_fields() -> None:
    codex = parse_recording("codex", "codex_tool_round_trip")[-1]["usage"]
    assert codex == {"input_tokens": 24, "cached_input_tokens": 0, "cache_write_input_tokens": 0,
                     "output_tokens": 14, "reasoning_output_tokens": 0}
    gemini = parse_recording("gemini_cli", "gemini_tool_round_trip")[-1]["usage"]
    assert gemini["total_tokens"] == 57 and gemini["tool_calls"] == 1


@pytest.mark.parametrize(("provider", "name", "is_error"), [
    ("claude_code", "claude_tool_error", True), ("codex", "codex_tool_error", True),
    ("gemini_cli", "gemini_tool_error", False)])  # Gemini reports a command that exited 1 as "success"
def test_a_failing_tool_is_reported_as_the_cli_sees_it(provider: str, name: str, is_error: bool) -> None:
    events = parse_recording(provider, name)
    (result,) = [e for e in events if e["type"] == "tool_result"]
    assert "No such file or directory" in result["output"] and result["is_error"] is is_error
    assert events[-1]["type"] == "done"  # a failed tool does not fail the run


def test_a_huge_tool_output_is_cut_and_marked() -> None:
    line = json.loads(next(x for x in recorded("claude_tool_round_trip") if '"tool_result"' in x))
    line["message"]["content"][0]["content"] = "y" * (MAX_TOOL_OUTPUT + 10)
    (result,) = ADAPTERS["claude_code"].new_parser().feed(json.dumps(line))
    assert len(result["output"]) == MAX_TOOL_OUTPUT and result["truncated"] is True
    small = parse_recording("claude_code", "claude_tool_round_trip")[2]
    assert small["type"] == "tool_result" and "truncated" not in small


def test_codex_items_other_than_commands() -> None:
    # Shapes from Codex's exec JSON schema (not produced by the stand-in): file changes and MCP tool calls.
    parser = ADAPTERS["codex"].new_parser()
    lines = [
        {"type": "item.started", "item": {"id": "i1", "type": "mcp_tool_call", "server": "docs", "tool": "search",
                                          "arguments": {"q": "x"}, "status": "in_progress"}},
        {"type": "item.completed", "item": {"id": "i1", "type": "mcp_tool_call", "server": "docs", "tool": "search",
                                            "arguments": {"q": "x"}, "error": {"message": "timed out"},
                                            "status": "failed"}},
        {"type": "item.completed", "item": {"id": "i2", "type": "file_change", "status": "completed",
                                            "changes": [{"path": "a.py", "kind": "update"}]}},
        {"type": "item.completed", "item": {"id": "i3", "type": "reasoning", "text": "thinking"}},
    ]
    events = [e for line in lines for e in parser.feed(json.dumps(line))]
    assert [(e["type"], e["id"]) for e in events] == [("tool_call", "i1"), ("tool_result", "i1"),
                                                      ("tool_call", "i2"), ("tool_result", "i2")]
    assert events[0]["name"] == "docs.search" and events[0]["input"] == {"q": "x"}
    assert events[1]["is_error"] is True and events[1]["output"] == "timed out"
    assert events[2]["input"]["changes"][0]["path"] == "a.py" and events[3]["is_error"] is False


@pytest.mark.parametrize(("provider", "name", "message"), [
    ("claude_code", "claude_api_rejected", "Failed to authenticate"),
    ("codex", "codex_api_rejected", "401 Unauthorized"),
    ("gemini_cli", "gemini_api_rejected", "invalid authentication credentials")])
def test_rejected_api_ends_in_one_error_with_the_clis_reason(provider: str, name: str, message: str) -> None:
    assert INDEX[name]["exit_code"] != 0
    events = parse_recording(provider, name)
    assert events[-1]["type"] == "error" and message in events[-1]["message"]
    assert [e["type"] for e in events].count("error") == 1 and "done" not in [e["type"] for e in events]
    assert not [e for e in events if e["type"] == "text"]  # Claude's synthetic error message is not answer text


def test_retries_show_as_warnings_not_errors() -> None:
    for provider, name in (("claude_code", "claude_api_rejected"), ("codex", "codex_api_rejected")):
        warnings = [e for e in parse_recording(provider, name) if e.get("level") == "warning"]
        assert len(warnings) >= 5 and all(e["type"] == "status" for e in warnings)
    claude = [e for e in parse_recording("claude_code", "claude_api_rejected") if e.get("level") == "warning"]
    assert claude[0]["message"] == "API error 401 (authentication_failed), retry 1/10"


@pytest.mark.parametrize(("provider", "name"), [(p, n) for p, n, _, _ in ROUND_TRIPS])
def test_a_crash_before_the_final_line_ends_in_error_with_the_exit_code(provider: str, name: str) -> None:
    lines = recorded(name)[:-1]  # the CLI died before its final event
    events = parse(provider, lines, 137)
    assert events[-1]["type"] == "error" and "137" in events[-1]["message"] and events[-1]["exit_code"] == 137
    assert "done" not in [e["type"] for e in events]
    exited_zero = parse(provider, lines, 0)
    assert exited_zero[-1]["type"] == "error" and "without a final result" in exited_zero[-1]["message"]


@pytest.mark.parametrize(("provider", "name"), [(p, n) for p, n, _, _ in ROUND_TRIPS])
def test_final_line_then_a_nonzero_exit_is_an_error(provider: str, name: str) -> None:
    events = parse(provider, recorded(name), 1)
    assert events[-1]["type"] == "error" and [e["type"] for e in events].count("done") == 0


@pytest.mark.parametrize(("provider", "name"), [(p, n) for p, n, _, _ in ROUND_TRIPS])
def test_every_prefix_of_a_stream_ends_in_exactly_one_terminal_event(provider: str, name: str) -> None:
    lines = recorded(name)
    for cut in range(len(lines) + 1):
        for code in (0, 1):
            kinds = [e["type"] for e in parse(provider, lines[:cut], code)]
            assert kinds.count("done") + kinds.count("error") == 1 and kinds[-1] in ("done", "error")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_finish_is_once_and_feed_after_it_is_ignored(provider: str) -> None:
    parser = adapter(provider).new_parser()
    assert len(parser.finish(2)) == 1
    assert parser.finish(0) == [] and parser.feed('{"type": "result"}') == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_crash_message_explains_with_the_last_output_line_but_no_secret(provider: str) -> None:
    parser = adapter(provider).new_parser()
    assert parser.feed("not json at all") == [] and parser.feed("[1, 2]") == [] and parser.feed("{broken") == []
    assert parser.feed(f"fatal: could not use key {KEY}") == []
    (err,) = parser.finish(1)
    assert err["type"] == "error" and "fatal: could not use key" in err["message"] and KEY not in err["message"]


def test_gemini_without_a_usable_login_says_so() -> None:
    # Observed with no oauth_creds.json: nothing on stdout, this on stderr (red), exit 41.
    parser = ADAPTERS["gemini_cli"].new_parser()
    assert parser.feed("\x1b[31mManual authorization is required but the current session is non-interactive."
                       " Please run the Gemini CLI in an interactive terminal to log in\x1b[0m") == []
    (err,) = parser.finish(41)
    assert "log in again" in err["message"] and err["exit_code"] == 41


def test_crash_detail_has_no_terminal_escapes() -> None:
    parser = ADAPTERS["codex"].new_parser()
    parser.feed("\x1b[31mError: model refused\x1b[0m")
    (err,) = parser.finish(1)
    assert err["message"] == "codex exited with code 1: Error: model refused"


def test_non_json_lines_of_a_real_login_run_are_ignored() -> None:
    # Gemini's login prints its question on stdout before the stream-json of the prompt it then runs.
    events = parse("gemini_cli", recorded("gemini_browser_login", "out"), 0)
    assert [e["type"] for e in events] == ["status", "text", "done"]


@pytest.mark.parametrize("name", sorted(n for n in INDEX if (DATA / f"{n}.stdout").exists()))
def test_every_event_type_in_the_real_recordings_is_one_the_adapter_knows(name: str) -> None:
    events = parse_recording(INDEX[name]["provider"], name)
    assert not [e for e in events if "raw_type" in e], "a recorded CLI event was taken for an unknown one"


@pytest.mark.parametrize(("provider", "name"), [(p, n) for p, n, _, _ in ROUND_TRIPS])
def test_an_event_type_a_newer_cli_might_send_becomes_a_status_naming_it(provider: str, name: str) -> None:
    """The stream goes on as before around it: the run still ends done, with nothing else changed."""
    lines = recorded(name)
    unknown = json.dumps({"type": "telemetry.sampled", "detail": "x" * 5000})
    mixed = [lines[0], unknown, *lines[1:]]
    events = parse(provider, mixed, INDEX[name]["exit_code"])
    status = [e for e in events if e.get("raw_type") == "telemetry.sampled"]
    assert len(status) == 1 and status[0]["type"] == "status" and "telemetry.sampled" in status[0]["message"]
    assert status[0]["raw"].startswith('{"type": "telemetry.sampled"') and len(status[0]["raw"]) <= 2001
    assert [e for e in events if e is not status[0]] == parse(provider, lines, INDEX[name]["exit_code"])
    assert events[-1]["type"] == "done"
    no_type = parse(provider, [lines[0], json.dumps({"hello": 1}), *lines[1:]], INDEX[name]["exit_code"])
    assert [e.get("raw_type") for e in no_type if "raw_type" in e] == ["None"]


def test_each_adapter_was_written_for_the_version_the_image_installs_by_default() -> None:
    from polydev.vm.images import CLI_PACKAGES

    assert {a.package: a.written_for for a in ADAPTERS.values()} == dict(CLI_PACKAGES)


def test_a_newer_cli_is_said_in_the_runs_first_status() -> None:
    from polydev.core.run_flow import first_status
    from polydev.providers.base import newer_than_written_for
    from polydev.vm.types import EngineInfo

    claude = adapter("claude_code")

    class Engine:
        def __init__(self, version: str | None) -> None:
            self.clis = {claude.package: version} if version else {}

        def describe(self) -> EngineInfo:
            return EngineInfo(backend="qemu", accel="tcg", network_mode="user", image_clis=self.clis)

    assert first_status(claude, Engine(claude.written_for), turn=False) == {"type": "status", "message": "starting a VM"}
    assert first_status(claude, Engine(None), turn=True)["message"] == "waking the workspace"
    newer = first_status(claude, Engine("2.10.0"), turn=False)  # numerically newer, not by string order
    assert newer["cli_version"] == "2.10.0" and newer["written_for"] == claude.written_for
    assert newer["message"] == (f"starting a VM; Claude Code 2.10.0 is newer than {claude.written_for}, the version "
                                "this adapter was written for")
    assert not newer_than_written_for(claude, "2.1.9")  # older
    assert newer_than_written_for(claude, "v3.0.0-beta.1") and not newer_than_written_for(claude, "weird")
