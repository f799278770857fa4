"""The service as users run it: a separate process on the embedded default."""

from __future__ import annotations

import json

import httpx

from tests.support.live_server import LiveServer

KEY = "sk-live-SECRETSECRETSECRET0123456789"


def test_health_answers_ok(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.url}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["database"]["kind"] == "sqlite" and r.json()["session_store"]["kind"] == "memory"


def test_secrets_never_reach_the_log(live_server: LiveServer) -> None:
    h = {"Authorization": f"Bearer {live_server.admin_token}"}
    r = httpx.put(f"{live_server.url}/api/credentials/codex/api-key", json={"api_key": KEY}, headers=h)
    assert r.status_code == 200
    # A rejected body holding the secret, and a wrong token, must not be echoed either.
    r = httpx.put(f"{live_server.url}/api/credentials/codex/api-key", json={"api_key": KEY, "x": 1}, headers=h)
    assert r.status_code == 422 and KEY not in r.text
    httpx.get(f"{live_server.url}/api/me", headers={"Authorization": f"Bearer pd_{KEY}"})
    log = live_server.log.read_text()
    assert log.strip(), "the server logs something"
    assert KEY not in log and live_server.admin_token not in log
    for line in log.splitlines():
        json.loads(line)  # every log line is structured JSON
