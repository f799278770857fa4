"""The real Gemini CLI against the stand-ins, in a loopback-only network namespace."""

from __future__ import annotations

import json
import secrets
import stat
import time
from pathlib import Path

from tests.standins import clis, flows
from tests.standins.api import CODE_ASSIST, GEMINI
from tests.standins.harness import Standins

# The plugin gives the fixtures and marks every test here `standins`.
pytest_plugins = ["tests.standins.fixtures"]

API_KEY = "AIza-standin-" + "k" * 8


def _api_key_env(si: Standins, home: Path) -> dict[str, str]:
    clis.gemini_settings(home, "gemini-api-key")
    return clis.gemini_env(home, GEMINI_API_KEY=API_KEY, GOOGLE_GEMINI_BASE_URL=si.api_url, **si.env())


def _result(events: list[dict]) -> dict:
    results = [e for e in events if e.get("type") == "result"]
    assert results, f"no result event in {events}"
    return results[-1]


def _assistant_text(events: list[dict]) -> str:
    return "".join(e["content"] for e in events if e.get("type") == "message" and e.get("role") == "assistant")


def test_one_shot_stream_json_ends_in_success_with_standin_text(
        standins: Standins, gemini_exe: Path, cli_home: Path, workdir: Path) -> None:
    text = "stand-in says " + secrets.token_hex(4)
    standins.api.script.text = text
    run = standins.run(clis.gemini_run_args(gemini_exe, "say something", yolo=False),
                       _api_key_env(standins, cli_home), cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    events = clis.json_lines(run.stdout)
    assert events[0]["type"] == "init"
    assert _assistant_text(events) == text
    assert _result(events)["status"] == "success"
    turns = standins.api.model_turns(GEMINI)
    assert len(turns) == 1 and turns[0].path.endswith(":streamGenerateContent") and turns[0].query == "alt=sse"
    assert turns[0].headers.get("x-goog-api-key") == API_KEY
    # The proxy was offered too: with usage statistics off, nothing but the API is contacted.
    assert standins.proxy.log.connects == []
    assert standins.oauth.requests == []


def test_without_the_switch_the_cli_calls_home_through_the_proxy(
        standins: Standins, gemini_exe: Path, cli_home: Path, workdir: Path) -> None:
    """Control for the test above: the proxy does catch calls home when usage statistics stay on."""
    env = _api_key_env(standins, cli_home)
    settings = clis.gemini_settings(cli_home, "gemini-api-key")
    settings.write_text(json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}}}))
    run = standins.run(clis.gemini_run_args(gemini_exe, "say something", yolo=False), env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert standins.proxy.log.connects != []


def test_tool_round_trip_runs_the_command_and_returns_its_output(
        standins: Standins, gemini_exe: Path, cli_home: Path, workdir: Path) -> None:
    nonce = "note-" + secrets.token_hex(6)
    (workdir / "note.txt").write_text(nonce + "\n")
    standins.api.script.tool = clis.gemini_shell_tool("cat note.txt")
    standins.api.script.final_text = "The note says {tool_output}"
    run = standins.run(clis.gemini_run_args(gemini_exe, "what does note.txt say?"),
                       _api_key_env(standins, cli_home), cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [t.answered for t in standins.api.model_turns(GEMINI)] == ["tool_call", "final"]
    assert any(nonce in out for out in standins.api.tool_outputs)
    events = clis.json_lines(run.stdout)
    uses = [e for e in events if e.get("type") == "tool_use"]
    results = [e for e in events if e.get("type") == "tool_result"]
    assert uses and uses[0]["tool_name"] == "run_shell_command" and uses[0]["parameters"]["command"] == "cat note.txt"
    assert results and results[0]["status"] == "success" and nonce in results[0]["output"]
    assert results[0]["tool_id"] == uses[0]["tool_id"]
    assert nonce in _assistant_text(events)
    assert _result(events)["status"] == "success" and _result(events)["stats"]["tool_calls"] == 1


def test_oauth_login_writes_credentials_and_expired_token_is_refreshed_and_written_back(
        standins: Standins, gemini_exe: Path, cli_home: Path, workdir: Path, tmp_path: Path) -> None:
    standins.api.script.text = "logged in"
    login = flows.gemini_login(standins, gemini_exe, cli_home, tmp_path / "hook", workdir, "hello")
    assert login.returncode == 0, login.stderr[-3000:] + login.stdout[-3000:]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in login.auth_url and "%2Foauth2callback" in login.auth_url
    assert _assistant_text(clis.json_lines(login.stdout)) == "logged in"
    creds_path = clis.gemini_credentials(cli_home)
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())
    assert creds["access_token"] == "google-access-1" and creds["refresh_token"] == "google-refresh-1"
    assert creds["expiry_date"] > time.time() * 1000
    assert json.loads((cli_home / ".gemini" / "google_accounts.json").read_text())["active"] == \
        "standin-user@example.com"
    assert [r.host for r in standins.oauth.of_kind("login")] == ["oauth2.googleapis.com"]
    code_assist = [r for r in standins.api.requests if r.dialect == CODE_ASSIST]
    assert code_assist[0].path == "/v1internal:loadCodeAssist"
    assert {r.credential for r in code_assist} == {"google-access-1"}

    # Gemini refreshes an expired token before use (a 401 from the API does not make it refresh: it fails).
    creds["expiry_date"] = int(time.time() * 1000) - 60_000
    creds_path.write_text(json.dumps(creds))
    before = len(standins.api.requests)
    standins.api.script.text = "after refresh"
    run = standins.run(clis.gemini_run_args(gemini_exe, "hello again", yolo=False),
                       flows.gemini_oauth_env(standins, cli_home), cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _assistant_text(clis.json_lines(run.stdout)) == "after refresh"
    assert [r.body["refresh_token"] for r in standins.oauth.of_kind("refresh")] == ["google-refresh-1"]
    assert {r.credential for r in standins.api.requests[before:]} == {"google-access-2"}
    creds = json.loads(creds_path.read_text())
    assert creds["access_token"] == "google-access-2" and creds["refresh_token"] == "google-refresh-1"
    assert creds["expiry_date"] > time.time() * 1000
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600


def test_oauth_run_rejected_with_401_fails_without_refreshing(
        standins: Standins, gemini_exe: Path, cli_home: Path, workdir: Path) -> None:
    """Observed at 0.61.0: a 401 from Code Assist is retried with the same token and the run fails."""
    access, refresh = standins.oauth.seed_tokens("google")
    creds_path = clis.gemini_credentials(cli_home)
    creds_path.parent.mkdir(parents=True)
    creds_path.write_text(json.dumps({"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
                                      "scope": "openid", "expiry_date": int(time.time() * 1000) + 3_600_000}))
    creds_path.chmod(0o600)
    clis.gemini_settings(cli_home, "oauth-personal")
    standins.api.script.reject_tokens = {access}
    run = standins.run(clis.gemini_run_args(gemini_exe, "hello", yolo=False),
                       flows.gemini_oauth_env(standins, cli_home), cwd=workdir, timeout=180)
    assert run.returncode != 0
    assert standins.api.requests and all(r.status == 401 for r in standins.api.requests)
    assert standins.oauth.of_kind("refresh") == []
    assert json.loads(creds_path.read_text())["access_token"] == access
