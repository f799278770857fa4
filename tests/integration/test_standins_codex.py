"""The real Codex CLI against the stand-ins, in a loopback-only network namespace."""

from __future__ import annotations

import json
import secrets
import stat
from pathlib import Path

from tests.standins import clis, flows, oauth
from tests.standins.api import OPENAI
from tests.standins.harness import Standins

# The plugin gives the fixtures and marks every test here `standins`.
pytest_plugins = ["tests.standins.fixtures"]

API_KEY = "sk-proj-standin-" + "k" * 8


def _events(stdout: str) -> list[dict]:
    return clis.json_lines(stdout)


def _agent_messages(events: list[dict]) -> list[str]:
    return [e["item"]["text"] for e in events
            if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"]


def _claims(jwt: str) -> dict:
    import base64

    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_exec_json_ends_in_turn_completed_with_standin_text(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path) -> None:
    text = "stand-in says " + secrets.token_hex(4)
    standins.api.script.text = text
    # The proxy is offered too: with the background-traffic switches on, nothing but the API is contacted.
    env = clis.codex_env(cli_home, CODEX_API_KEY=API_KEY, **standins.env())
    run = standins.run(clis.codex_run_args(codex_exe, "say something", standins.api_url), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    events = _events(run.stdout)
    types = [e["type"] for e in events]
    assert types[0] == "thread.started" and "turn.started" in types and types[-1] == "turn.completed"
    assert _agent_messages(events) == [text]
    assert events[-1]["usage"]["output_tokens"] == 7
    turns = standins.api.model_turns(OPENAI)
    assert len(turns) == 1 and turns[0].path == "/v1/responses" and turns[0].body["stream"] is True
    assert turns[0].credential == API_KEY
    assert standins.proxy.log.connects == []
    assert standins.oauth.requests == []


def test_without_the_switches_the_cli_calls_home_through_the_proxy(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path) -> None:
    """Control for the test above: the proxy does catch calls home when the switches are left out."""
    args = clis.codex_run_args(codex_exe, "say something", standins.api_url)
    i = args.index("analytics.enabled=false")
    assert args[i - 1:i + 3] == ["-c", "analytics.enabled=false", "--disable", "plugins"]
    del args[i - 1:i + 3]
    run = standins.run(args, clis.codex_env(cli_home, CODEX_API_KEY=API_KEY, **standins.env()), cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert standins.proxy.log.connects != []


def test_tool_round_trip_runs_the_command_and_returns_its_output(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path) -> None:
    nonce = "note-" + secrets.token_hex(6)
    (workdir / "note.txt").write_text(nonce + "\n")
    standins.api.script.tool = clis.codex_shell_tool("cat note.txt")
    standins.api.script.final_text = "The note says {tool_output}"
    env = clis.codex_env(cli_home, CODEX_API_KEY=API_KEY)
    run = standins.run(clis.codex_run_args(codex_exe, "what does note.txt say?", standins.api_url), env,
                       cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [t.answered for t in standins.api.model_turns(OPENAI)] == ["tool_call", "final"]
    assert any(nonce in out for out in standins.api.tool_outputs)
    events = _events(run.stdout)
    commands = [e["item"] for e in events
                if e.get("type") == "item.completed" and e["item"].get("type") == "command_execution"]
    assert commands and "cat note.txt" in commands[0]["command"]
    assert commands[0]["exit_code"] == 0 and nonce in commands[0]["aggregated_output"]
    final = _agent_messages(events)
    assert final and final[-1].startswith("The note says") and nonce in final[-1]
    assert events[-1]["type"] == "turn.completed"


def _assert_chatgpt_auth(auth: dict, generation: int) -> None:
    assert auth["auth_mode"] == "chatgpt"
    tokens = auth["tokens"]
    assert tokens["refresh_token"] == f"codex-refresh-{generation}"
    assert _claims(tokens["access_token"])["standin_token"] == f"codex-access-{generation}"
    assert tokens["account_id"] == "acc-standin"
    assert _claims(tokens["id_token"])["email"] == "standin-user@example.com"
    assert auth["last_refresh"]


def test_browser_login_writes_auth_json_and_forced_refresh_writes_back_rotated_tokens(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path, tmp_path: Path) -> None:
    login = flows.codex_login(standins, codex_exe, cli_home, tmp_path / "hook")
    assert login.returncode == 0, login.stderr[-3000:] + login.stdout[-3000:]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fauth%2Fcallback" in login.auth_url
    auth_path = clis.codex_credentials(cli_home)
    assert stat.S_IMODE(auth_path.stat().st_mode) == 0o600
    auth = json.loads(auth_path.read_text())
    _assert_chatgpt_auth(auth, 1)
    assert auth["OPENAI_API_KEY"] == "sk-standin-exchanged-key"  # from the token exchange
    assert [r.kind for r in standins.oauth.requests if r.host == "auth.openai.com"] == ["login", "token_exchange"]

    # The API refuses the access token: Codex refreshes (single-use refresh token) and writes the new pair back.
    standins.api.script.reject_tokens = {"codex-access-1"}
    standins.api.script.text = "after refresh"
    env = clis.codex_env(cli_home, **standins.env())
    run = standins.run(clis.codex_run_args(codex_exe, "hello again", standins.api_url, chatgpt_auth=True), env,
                       cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _agent_messages(_events(run.stdout)) == ["after refresh"]
    seen = [r.credential for r in standins.api.requests if r.path == "/v1/responses"]
    assert seen[0] == "codex-access-1" and seen[-1] == "codex-access-2"
    refreshes = standins.oauth.of_kind("refresh")
    assert [r.body["refresh_token"] for r in refreshes] == ["codex-refresh-1"]
    _assert_chatgpt_auth(json.loads(auth_path.read_text()), 2)
    assert stat.S_IMODE(auth_path.stat().st_mode) == 0o600


def test_device_code_login_writes_auth_json(standins: Standins, codex_exe: Path, cli_home: Path) -> None:
    login = flows.codex_device_login(standins, codex_exe, cli_home)
    assert login.returncode == 0, login.stderr[-3000:] + login.stdout[-3000:]
    user_code = standins.oauth.device[next(iter(standins.oauth.device))]["user_code"]
    assert "https://auth.openai.com/codex/device" in login.stdout and user_code in login.stdout
    kinds = [r.kind for r in standins.oauth.requests]
    assert kinds[0] == "device_code" and "device_poll" in kinds and kinds[-1] == "login"
    assert standins.oauth.of_kind("login")[0].body["redirect_uri"] == "https://auth.openai.com/deviceauth/callback"
    auth_path = clis.codex_credentials(cli_home)
    assert stat.S_IMODE(auth_path.stat().st_mode) == 0o600
    _assert_chatgpt_auth(json.loads(auth_path.read_text()), 1)


def test_expired_access_token_is_refreshed_before_the_run_and_written_back(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path) -> None:
    access, refresh = standins.oauth.seed_tokens("codex")
    auth_path = clis.codex_credentials(cli_home)
    auth_path.parent.mkdir(parents=True)
    auth_path.write_text(json.dumps({"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": {
        "id_token": oauth.codex_id_token(), "access_token": oauth.codex_access_token(access, expires_in=-60),
        "refresh_token": refresh, "account_id": "acc-standin"}, "last_refresh": "2026-01-01T00:00:00Z"}))
    auth_path.chmod(0o600)
    env = clis.codex_env(cli_home, **standins.env())
    run = standins.run(clis.codex_run_args(codex_exe, "hello", standins.api_url, chatgpt_auth=True), env,
                       cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _agent_messages(_events(run.stdout)) == [standins.api.script.text]
    assert [r.body["refresh_token"] for r in standins.oauth.of_kind("refresh")] == [refresh]
    assert {r.credential for r in standins.api.requests if r.path == "/v1/responses"} == {"codex-access-2"}
    _assert_chatgpt_auth(json.loads(auth_path.read_text()), 2)


def test_reused_refresh_token_is_refused(standins: Standins, codex_exe: Path, cli_home: Path,
                                         workdir: Path) -> None:
    """Refresh tokens are single-use: a second VM restoring the same auth.json cannot refresh."""
    access, refresh = standins.oauth.seed_tokens("codex")
    assert standins.oauth.refresh("codex", refresh) == ("codex-access-2", "codex-refresh-2")
    auth_path = clis.codex_credentials(cli_home)
    auth_path.parent.mkdir(parents=True)
    auth_path.write_text(json.dumps({"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": {
        "id_token": oauth.codex_id_token(), "access_token": oauth.codex_access_token(access, expires_in=-60),
        "refresh_token": refresh, "account_id": "acc-standin"}, "last_refresh": "2026-01-01T00:00:00Z"}))
    standins.api.script.reject_tokens = {access}  # it has expired
    env = clis.codex_env(cli_home, **standins.env())
    run = standins.run(clis.codex_run_args(codex_exe, "hello", standins.api_url, chatgpt_auth=True), env,
                       cwd=workdir)
    refused = standins.oauth.of_kind("refresh")
    assert refused and all(r.status == 401 for r in refused)
    assert not any(r.status == 200 for r in standins.api.requests if r.path == "/v1/responses")
    assert json.loads(auth_path.read_text())["tokens"]["refresh_token"] == refresh
    assert run.returncode != 0
    failed = [e for e in _events(run.stdout) if e.get("type") == "turn.failed"]
    assert failed and "refresh token was already used" in failed[0]["error"]["message"]


def test_login_with_api_key_on_stdin_writes_auth_json_used_by_runs(
        standins: Standins, codex_exe: Path, cli_home: Path, workdir: Path) -> None:
    key = "sk-proj-stdin-" + secrets.token_hex(4)
    login = standins.run([str(codex_exe), "login", "--with-api-key", *clis.codex_background_off()],
                         clis.codex_env(cli_home), input=key + "\n")
    assert login.returncode == 0, login.stderr[-3000:]
    auth_path = clis.codex_credentials(cli_home)
    assert stat.S_IMODE(auth_path.stat().st_mode) == 0o600
    assert json.loads(auth_path.read_text()) == {"auth_mode": "apikey", "OPENAI_API_KEY": key}
    run = standins.run(clis.codex_run_args(codex_exe, "hello", standins.api_url, chatgpt_auth=True),
                       clis.codex_env(cli_home), cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [t.credential for t in standins.api.model_turns(OPENAI)] == [key]
