"""The provider adapters drive the real CLIs: each adapter's own commands, run in the stand-ins' namespace.

Nothing here builds a CLI command by hand: argv, environment, cwd, stdin and the files to write all come from
`run_command` / `login_plan`; `tests.standins.adapters` only swaps argv[0] for the installed CLI.
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from polydev.providers import ADAPTERS
from polydev.providers.base import GuestEnv, RunParser
from tests.standins import adapters, clis, flows, oauth
from tests.standins.harness import Standins, kill_group, read_urls, wait_for

# The plugin gives the fixtures and marks every test here `standins`.
pytest_plugins = ["tests.standins.fixtures"]

PROVIDERS = sorted(ADAPTERS)
KEYS = {"claude_code": "sk-ant-api03-adapter-" + "k" * 8, "codex": "sk-proj-adapter-" + "k" * 8,
        "gemini_cli": "AIza-adapter-" + "k" * 8}
SHELL_TOOL = {"claude_code": clis.claude_shell_tool, "codex": clis.codex_shell_tool,
              "gemini_cli": clis.gemini_shell_tool}
OAUTH_NAME = {"claude_code": oauth.CLAUDE, "codex": oauth.CODEX, "gemini_cli": oauth.GOOGLE}
EXE_FIXTURE = {"claude_code": "claude_exe", "codex": "codex_exe", "gemini_cli": "gemini_exe"}


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def exe(provider: str, request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(EXE_FIXTURE[provider]))


@pytest.fixture
def genv(standins: Standins, tmp_path: Path) -> GuestEnv:
    return adapters.guest_env(standins, tmp_path / "guest")


def _parse(provider: str, run: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    events, parser = _feed(provider, run.stdout)
    return events + parser.finish(run.returncode)


def _feed(provider: str, output: str) -> tuple[list[dict[str, Any]], RunParser]:
    parser = ADAPTERS[provider].new_parser()
    return [e for line in output.splitlines() for e in parser.feed(line)], parser


def _assert_round_trip(events: list[dict[str, Any]], nonce: str) -> None:
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds, events
    call = kinds.index("tool_call")
    result = kinds.index("tool_result", call)
    text = kinds.index("text", result)
    assert call < result < text < len(kinds) - 1
    assert events[result]["id"] == events[call]["id"] and nonce in events[result]["output"]
    assert nonce in events[text]["text"] and nonce in events[-1]["result"]


def test_api_key_run_round_trips_a_tool_call_with_no_background_traffic(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    nonce = "note-" + secrets.token_hex(6)
    (Path(genv.workdir) / "note.txt").write_text(nonce + "\n")
    standins.api.script.tool = SHELL_TOOL[provider]("cat note.txt")
    standins.api.script.final_text = "The note says {tool_output}"
    cmd = ADAPTERS[provider].run_command("-what does note.txt say?", genv, api_key=KEYS[provider])
    run = adapters.run(standins, cmd, exe)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_round_trip(_parse(provider, run), nonce)
    turns = standins.api.model_turns()
    assert [t.answered for t in turns] == ["tool_call", "final"]
    assert {t.credential for t in turns} == {KEYS[provider]}
    assert standins.proxy.log.connects == []  # the proxy was offered: nothing but the API was contacted


def test_a_prompt_longer_than_one_argument_may_be_reaches_the_model(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """Linux caps one argv string at 128 KiB; the adapters pass the prompt on stdin, whole."""
    end = "end-" + secrets.token_hex(6)
    prompt = "-" + "lorem ipsum " * 16_000 + end  # ~190 KB, starting like an option
    run = adapters.run(standins, ADAPTERS[provider].run_command(prompt, genv, api_key=KEYS[provider]), exe)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _parse(provider, run)[-1]["type"] == "done"
    sent = json.dumps([t.body for t in standins.api.model_turns()])
    assert end in sent and "-lorem ipsum lorem" in sent


def _write_stored_credentials(provider: str, si: Standins, genv: GuestEnv, *, expiring: bool = False) -> str:
    """Credential files as a login leaves them (shapes from FACTS.md); returns the access token sent.

    `expiring`: the access token is about to expire (Claude: within its 5-minute margin) or has expired, which
    makes each CLI refresh it before its first API call."""
    access, refresh = si.oauth.seed_tokens(OAUTH_NAME[provider])
    now_ms = int(time.time() * 1000)
    if not expiring:
        expiry_ms = now_ms + 3_600_000
    else:
        expiry_ms = now_ms + (60_000 if provider == "claude_code" else -60_000)
    if provider == "claude_code":
        doc: dict[str, Any] = {"claudeAiOauth": {
            "accessToken": access, "refreshToken": refresh, "expiresAt": expiry_ms,
            "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}
    elif provider == "codex":
        token = oauth.codex_access_token(access, expires_in=(expiry_ms - now_ms) // 1000)
        doc = {"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "last_refresh": "2026-11-27T00:00:00Z",
               "tokens": {"id_token": oauth.codex_id_token(), "access_token": token,
                          "refresh_token": refresh, "account_id": "acc-standin"}}
    else:
        doc = {"access_token": access, "refresh_token": refresh, "token_type": "Bearer", "scope": "openid",
               "expiry_date": expiry_ms}
    path = Path(genv.home_path(ADAPTERS[provider].required_credential_files[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return access


def test_oauth_run_with_restored_credential_files_round_trips_a_tool_call(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    access = _write_stored_credentials(provider, standins, genv)
    nonce = "note-" + secrets.token_hex(6)
    (Path(genv.workdir) / "note.txt").write_text(nonce + "\n")
    standins.api.script.tool = SHELL_TOOL[provider]("cat note.txt")
    standins.api.script.final_text = "The note says {tool_output}"
    run = adapters.run(standins, ADAPTERS[provider].run_command("what does note.txt say?", genv), exe)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_round_trip(_parse(provider, run), nonce)
    # (the stand-in records Codex's JWT access token by the token name inside it)
    assert {t.credential for t in standins.api.model_turns()} == {access}
    assert standins.oauth.of_kind("refresh") == []


REFRESHED: dict[str, Callable[[dict[str, Any]], tuple[str, ...]]] = {  # what each credential file holds after the stand-in's first refresh
    "claude_code": lambda d: (d["claudeAiOauth"]["accessToken"], d["claudeAiOauth"]["refreshToken"]),
    "codex": lambda d: (d["tokens"]["refresh_token"],),
    "gemini_cli": lambda d: (d["access_token"], d["refresh_token"]),
}
EXPECTED_AFTER_REFRESH = {"claude_code": ("claude-access-2", "claude-refresh-2"), "codex": ("codex-refresh-2",),
                          "gemini_cli": ("google-access-2", "google-refresh-1")}  # Google keeps its refresh token


def test_oauth_run_refreshes_an_expiring_token_and_writes_the_new_one_back(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """What the run flow relies on: after the run the credential files hold the rotated tokens."""
    _write_stored_credentials(provider, standins, genv, expiring=True)
    run = adapters.run(standins, ADAPTERS[provider].run_command("hello", genv), exe)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _parse(provider, run)[-1]["type"] == "done"
    assert len(standins.oauth.of_kind("refresh")) == 1
    assert {t.credential for t in standins.api.model_turns()} == {f"{OAUTH_NAME[provider]}-access-2"}
    path = Path(genv.home_path(ADAPTERS[provider].required_credential_files[0]))
    assert REFRESHED[provider](json.loads(path.read_text())) == EXPECTED_AFTER_REFRESH[provider]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_crash_mid_run_ends_the_stream_in_one_error(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """The CLI killed while its tool runs: the parser ends the stream with an error, never a done."""
    (Path(genv.workdir) / "note.txt").write_text("x\n")
    marker = Path(genv.workdir) / "tool-started"
    standins.api.script.tool = SHELL_TOOL[provider](f"touch {marker} && sleep 60")
    cmd = ADAPTERS[provider].run_command("run the tool", genv, api_key=KEYS[provider])
    with adapters.Running(standins, cmd, exe) as run:
        # Killed once the tool runs and its call has been streamed (as a cancel or a dying VM would).
        wait_for(lambda: marker.exists() and '"tool_call"' in json.dumps(_feed(provider, run.output())[0]), 120,
                 "the tool to start", run.proc)
    assert run.proc.returncode == -9
    events, parser = _feed(provider, run.output())
    events += parser.finish(-9)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "error" and "done" not in kinds and kinds.count("error") == 1
    assert "-9" in events[-1]["message"]


def test_browser_login_plan_completes_the_real_login(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """The plan as declared (PTY, stdin, hook files, environment) gets the URL caught by the hook and, once
    the user has authorized (the callback), the credential files written."""
    adapter = ADAPTERS[provider]
    plan = adapter.login_plan("browser", genv)
    required = [Path(genv.home_path(p)) for p in adapter.required_credential_files]
    with adapters.start_login(standins, plan, genv, exe) as login:
        url = wait_for(lambda: read_urls(Path(genv.urls_file)), 120, "the hook to catch the login URL", login.proc)[0]
        if plan.callback_port:
            assert f"127.0.0.1%3A{plan.callback_port}" in url
        flows._callback(standins, url, OAUTH_NAME[provider])
        if plan.ends == "exit":
            assert login.wait(120) == 0, login.output()[-3000:]
        else:  # the flow stops it once the credential files are complete
            wait_for(lambda: all(_complete_json(p) for p in required), 120, "the credential files", login.proc)
    for path in required:
        assert _complete_json(path) and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_claude_login_plan_takes_the_pasted_code(claude_exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """The paste flow: no callback; the user pastes `code#state` from the hosted page at the CLI's prompt."""
    adapter = ADAPTERS["claude_code"]
    plan = adapter.login_plan("browser", genv)
    assert plan.accepts_code
    with adapters.start_login(standins, plan, genv, claude_exe) as login:
        wait_for(lambda: "Paste code here" in login.output(), 120, "the paste prompt", login.proc)
        url = adapter.parse_login_output(login.output()).auth_url
        assert url and "platform.claude.com%2Foauth%2Fcode%2Fcallback" in url
        state = parse_qs(urlparse(url).query)["state"][0]
        login.write(adapter.code_input(f"{standins.oauth.new_code(oauth.CLAUDE)}#{state}"))
        assert login.wait(120) == 0, login.output()[-3000:]
    creds = json.loads(Path(genv.home_path(".claude/.credentials.json")).read_text())
    assert creds["claudeAiOauth"]["accessToken"] == "claude-access-1"
    assert [r.body["redirect_uri"] for r in standins.oauth.of_kind("login")] == [
        "https://platform.claude.com/oauth/code/callback"]


def _complete_json(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def test_codex_device_login_plan_prints_the_code_the_parser_finds(
        codex_exe: Path, standins: Standins, genv: GuestEnv) -> None:
    adapter = ADAPTERS["codex"]
    plan = adapter.login_plan("device", genv)
    proc = adapters.popen(standins, plan.command, codex_exe)
    try:
        wait_for(lambda: standins.oauth.of_kind("device_code"), 120, "the device-code request", proc)
        standins.oauth.approve_device_codes()
        out, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    prompt = adapter.parse_login_output(out + err)
    assert prompt.device_code == next(iter(standins.oauth.device.values()))["user_code"]
    assert prompt.verification_url == "https://auth.openai.com/codex/device"
    assert _complete_json(Path(genv.home_path(".codex/auth.json")))


def test_a_resumed_session_sends_the_earlier_turn_to_the_model(
        provider: str, exe: Path, standins: Standins, genv: GuestEnv) -> None:
    """A conversation's follow-up: `run_command(resume=session)` with the session id the first turn's `session
    started` status named continues the CLI's own session, so the model gets the first turn in its history."""
    first = "remember-" + secrets.token_hex(6)
    run = adapters.run(standins, ADAPTERS[provider].run_command(f"Remember the word {first}.", genv,
                                                                api_key=KEYS[provider]), exe)
    assert run.returncode == 0, run.stderr[-3000:]
    events = _parse(provider, run)
    sessions = {e["session_id"] for e in events if e["type"] == "status" and e.get("session_id")}
    assert len(sessions) == 1, events
    asked = len(standins.api.model_turns())
    run = adapters.run(standins, ADAPTERS[provider].run_command("Which word did I ask you to remember?", genv,
                                                                api_key=KEYS[provider], resume=sessions.pop()), exe)
    assert run.returncode == 0, run.stderr[-3000:]
    follow_up = standins.api.model_turns()[asked:]
    assert follow_up, "the follow-up reached no model"
    sent = json.dumps(follow_up[-1].body)
    assert first in sent and "Which word did I ask you to remember?" in sent
