"""The real Claude Code CLI against the stand-ins, in a loopback-only network namespace."""

from __future__ import annotations

import json
import secrets
import stat
import time
from pathlib import Path

from tests.standins import clis, flows
from tests.standins.api import ANTHROPIC
from tests.standins.harness import Standins

# The plugin gives the fixtures and marks every test here `standins`.
pytest_plugins = ["tests.standins.fixtures"]

API_KEY = "sk-ant-api03-standin-" + "k" * 8


def _result(stdout: str) -> dict:
    results = [e for e in clis.json_lines(stdout) if e.get("type") == "result"]
    assert results, f"no result event in:\n{stdout[-3000:]}"
    return results[-1]


def test_one_shot_stream_json_ends_in_success_with_standin_text(
        standins: Standins, claude_exe: Path, cli_home: Path, workdir: Path) -> None:
    text = "stand-in says " + secrets.token_hex(4)
    standins.api.script.text = text
    # The proxy is offered too: with the background-traffic switch on, nothing but the API is contacted.
    env = clis.claude_env(cli_home, ANTHROPIC_BASE_URL=standins.api_url, ANTHROPIC_API_KEY=API_KEY, **standins.env())
    run = standins.run(clis.claude_run_args(claude_exe, "say something"), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    events = clis.json_lines(run.stdout)
    assert events[0]["type"] == "system" and events[0]["subtype"] == "init"
    assert events[0]["claude_code_version"] == clis.CLAUDE.version
    result = _result(run.stdout)
    assert result["subtype"] == "success" and result["result"] == text
    turns = standins.api.model_turns(ANTHROPIC)
    assert turns and turns[0].path == "/v1/messages" and "beta=true" in turns[0].query
    assert {t.credential for t in turns} == {API_KEY}
    assert turns[0].headers.get("x-api-key") == API_KEY
    assert turns[0].body["stream"] is True
    assert standins.proxy.log.connects == []
    assert standins.oauth.requests == []


def test_without_the_switch_the_cli_calls_home_through_the_proxy(
        standins: Standins, claude_exe: Path, cli_home: Path, workdir: Path) -> None:
    """Control for the test above: the proxy does catch calls home when the switch is left out."""
    env = clis.claude_env(cli_home, ANTHROPIC_BASE_URL=standins.api_url, ANTHROPIC_API_KEY=API_KEY, **standins.env())
    del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]
    run = standins.run(clis.claude_run_args(claude_exe, "say something"), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "api.anthropic.com" in standins.proxy.log.hosts()


def test_tool_round_trip_runs_the_command_and_returns_its_output(
        standins: Standins, claude_exe: Path, cli_home: Path, workdir: Path) -> None:
    nonce = "note-" + secrets.token_hex(6)
    (workdir / "note.txt").write_text(nonce + "\n")
    standins.api.script.tool = clis.claude_shell_tool("cat note.txt")
    standins.api.script.final_text = "The note says {tool_output}"
    env = clis.claude_env(cli_home, ANTHROPIC_BASE_URL=standins.api_url, ANTHROPIC_API_KEY=API_KEY)
    run = standins.run(clis.claude_run_args(claude_exe, "what does note.txt say?"), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [t.answered for t in standins.api.model_turns(ANTHROPIC)] == ["tool_call", "final"]
    assert any(nonce in out for out in standins.api.tool_outputs)
    events = clis.json_lines(run.stdout)
    tool_uses = [b for e in events if e.get("type") == "assistant" for b in e["message"]["content"]
                 if b.get("type") == "tool_use"]
    assert tool_uses and tool_uses[0]["name"] == "Bash"
    tool_results = [b for e in events if e.get("type") == "user" for b in e["message"]["content"]
                    if isinstance(b, dict) and b.get("type") == "tool_result"]
    assert tool_results and nonce in json.dumps(tool_results[0]["content"])
    assert _result(run.stdout)["result"] == f"The note says {nonce}"


def test_login_writes_credentials_and_forced_refresh_writes_back_rotated_tokens(
        standins: Standins, claude_exe: Path, cli_home: Path, workdir: Path, tmp_path: Path) -> None:
    login = flows.claude_login(standins, claude_exe, cli_home, tmp_path / "hook")
    assert login.returncode == 0, login.stderr[-3000:] + login.stdout[-3000:]
    assert "Login successful" in login.stdout
    assert "redirect_uri=http%3A%2F%2Flocalhost%3A" in login.auth_url and "code_challenge=" in login.auth_url
    creds_path = clis.claude_credentials(cli_home)
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())["claudeAiOauth"]
    assert creds["accessToken"] == "claude-access-1" and creds["refreshToken"] == "claude-refresh-1"
    assert creds["subscriptionType"] == "max"
    account = json.loads((cli_home / ".claude.json").read_text())["oauthAccount"]
    assert account["emailAddress"] == "standin-user@example.com"
    logins = standins.oauth.of_kind("login")
    assert len(logins) == 1 and logins[0].host == "platform.claude.com" and logins[0].body["code_verifier"]
    assert "platform.claude.com" in standins.proxy.log.hosts()

    # The API refuses the stored access token: the CLI refreshes, retries, and writes the rotated pair back.
    standins.api.script.reject_tokens = {"claude-access-1"}
    standins.api.script.text = "after refresh"
    env = clis.claude_env(cli_home, ANTHROPIC_BASE_URL=standins.api_url, **standins.env())
    run = standins.run(clis.claude_run_args(claude_exe, "hello again"), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _result(run.stdout)["result"] == "after refresh"
    seen = [r.credential for r in standins.api.requests if r.dialect == ANTHROPIC and r.path == "/v1/messages"]
    assert seen[0] == "claude-access-1" and seen[-1] == "claude-access-2"
    refreshes = standins.oauth.of_kind("refresh")
    assert [r.body["refresh_token"] for r in refreshes] == ["claude-refresh-1"]
    creds = json.loads(creds_path.read_text())["claudeAiOauth"]
    assert creds["accessToken"] == "claude-access-2" and creds["refreshToken"] == "claude-refresh-2"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600


def test_token_close_to_expiry_is_refreshed_before_the_run_and_written_back(
        standins: Standins, claude_exe: Path, cli_home: Path, workdir: Path) -> None:
    access, refresh = standins.oauth.seed_tokens("claude")
    creds_path = clis.claude_credentials(cli_home)
    creds_path.parent.mkdir(parents=True)
    creds_path.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": access, "refreshToken": refresh, "expiresAt": int(time.time() * 1000) + 60_000,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max",
        "rateLimitTier": "default_claude_max_20x"}}))
    creds_path.chmod(0o600)
    env = clis.claude_env(cli_home, ANTHROPIC_BASE_URL=standins.api_url, **standins.env())
    run = standins.run(clis.claude_run_args(claude_exe, "hello"), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _result(run.stdout)["subtype"] == "success"
    assert [r.body["refresh_token"] for r in standins.oauth.of_kind("refresh")] == [refresh]
    assert [t.credential for t in standins.api.model_turns(ANTHROPIC)] == ["claude-access-2"]
    creds = json.loads(creds_path.read_text())["claudeAiOauth"]
    assert creds["accessToken"] == "claude-access-2" and creds["refreshToken"] == "claude-refresh-2"
    assert creds["expiresAt"] > time.time() * 1000 + 30 * 60_000
