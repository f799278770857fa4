"""The HTTP API on both deployments: embedded (SQLite + memory) and PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from polydev.api.app import create_app
from polydev.services import open_services
from polydev.store.models import Credential, User
from tests.support.app import Api, idle_login, make_settings
from tests.support.live_asgi import serving

KEY = "sk-test-ABCDEFGHIJKLMNOPQRSTUV0123456789"


async def credential_count(api: Api) -> int:
    async with api.services.factory() as s:
        return int(await s.scalar(select(func.count()).select_from(Credential)) or 0)


async def test_health_reports_database_and_session_store(api: Api) -> None:
    r = await api.client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] is True and body["session_store"]["ok"] is True
    assert body["session_store"]["kind"] == api.services.session_store.kind


async def test_health_is_503_when_the_session_store_is_down(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> bool:
        return False

    monkeypatch.setattr(api.services.session_store, "ping", down)
    r = await api.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert r.json()["session_store"]["ok"] is False


async def test_requests_without_or_with_bad_token_are_401(api: Api) -> None:
    assert (await api.client.get("/api/credentials")).json()["error"]["code"] == "unauthorized"
    r = await api.client.get("/api/credentials", headers=api.auth("pd_not-a-real-token"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_only_admins_manage_users(api: Api) -> None:
    _, token = await api.new_user()
    r = await api.client.post("/api/users", json={"name": "eve"}, headers=api.auth(token))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await api.client.get("/api/users", headers=api.auth(api.admin_token))
    assert r.status_code == 200 and len(r.json()) == 2


async def test_duplicate_user_name_is_409_and_creates_nothing(api: Api) -> None:
    await api.new_user("carol")
    r = await api.client.post("/api/users", json={"name": "carol"}, headers=api.auth(api.admin_token))
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    async with api.services.factory() as s:
        assert await s.scalar(select(func.count()).select_from(User).where(User.name == "carol")) == 1


async def test_api_key_round_trip_never_returns_the_secret(api: Api) -> None:
    _, token = await api.new_user()
    r = await api.client.put("/api/credentials/codex/api-key", json={"api_key": KEY}, headers=api.auth(token))
    assert r.status_code == 200, r.text
    assert KEY not in r.text and r.json()["provider"] == "codex" and r.json()["kind"] == "api_key"
    r = await api.client.get("/api/credentials", headers=api.auth(token))
    assert [c["provider"] for c in r.json()] == ["codex"] and KEY not in r.text
    assert set(r.json()[0]) == {"provider", "kind", "is_valid", "created_at", "updated_at", "last_validated"}
    r = await api.client.delete("/api/credentials/codex", headers=api.auth(token))
    assert r.status_code == 204
    assert (await api.client.get("/api/credentials", headers=api.auth(token))).json() == []


async def test_user_b_gets_404_for_user_a_credential(api: Api) -> None:
    a_id, a_token = await api.new_user()
    _, b_token = await api.new_user()
    await api.client.put("/api/credentials/gemini_cli/api-key", json={"api_key": KEY}, headers=api.auth(a_token))
    assert (await api.client.get("/api/credentials", headers=api.auth(b_token))).json() == []
    r = await api.client.delete("/api/credentials/gemini_cli", headers=api.auth(b_token))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert await api.services.credentials.reveal(uuid.UUID(a_id), "gemini_cli") == KEY.encode()


async def test_user_b_gets_404_for_user_a_session_and_tokens(api: Api) -> None:
    a_id, a_token = await api.new_user()
    b_id, b_token = await api.new_user()
    session = await api.services.login_sessions.start(uuid.UUID(a_id), "claude_code")
    r = await api.client.get(f"/api/auth/sessions/{session['session_id']}", headers=api.auth(a_token))
    assert r.status_code == 200 and r.json()["status"] == "initializing"
    r = await api.client.get(f"/api/auth/sessions/{session['session_id']}", headers=api.auth(b_token))
    assert r.status_code == 404
    # B cannot mint tokens for A, and A's user id reads as absent.
    r = await api.client.post(f"/api/users/{a_id}/tokens", json={"name": "x"}, headers=api.auth(b_token))
    assert r.status_code == 404
    a_tokens = (await api.client.get("/api/tokens", headers=api.auth(a_token))).json()
    r = await api.client.delete(f"/api/tokens/{a_tokens[0]['id']}", headers=api.auth(b_token))
    assert r.status_code == 404
    assert (await api.client.get("/api/me", headers=api.auth(a_token))).status_code == 200


async def test_expired_session_answers_410_start_a_new_session(api: Api) -> None:
    uid, token = await api.new_user()
    session = await api.services.login_sessions.start(uuid.UUID(uid), "codex")
    # Expire it the way the TTL would: no activity for the TTL, and the live state gone from the store.
    await idle_login(api, session["session_id"], api.services.session_store.default_ttl + 5)
    await api.services.session_store.delete(session["session_id"])
    for _ in range(2):  # and it stays expired on every later read
        r = await api.client.get(f"/api/auth/sessions/{session['session_id']}", headers=api.auth(token))
        assert r.status_code == 410
        assert r.json()["error"]["code"] == "session_expired"
        assert r.json()["error"]["action"] == "start_new_session"
    row = await api.services.login_sessions.repo.get_owned(uuid.UUID(uid), uuid.UUID(session["session_id"]))
    assert row is not None and row.status == "timeout" and row.completed_at is not None


async def test_a_live_session_the_store_lost_is_published_again_from_its_row(api: Api) -> None:
    """A Redis restarted without its data loses every live session's state; a session active within the TTL
    has not expired: its state comes back from the database, and it reads (and goes on) as before."""
    uid, token = await api.new_user()
    session = await api.services.login_sessions.start(uuid.UUID(uid), "codex")
    sid = uuid.UUID(session["session_id"])
    await api.services.login_sessions.update(sid, status="awaiting_user_auth", auth_url="https://auth.example/x")
    await api.services.session_store.delete(session["session_id"])
    r = await api.client.get(f"/api/auth/sessions/{sid}", headers=api.auth(token))
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["auth_url"]) == ("awaiting_user_auth", "https://auth.example/x")
    assert (await api.services.session_store.get(str(sid)))["status"] == "awaiting_user_auth"
    row = await api.services.login_sessions.repo.get_owned(uuid.UUID(uid), sid)
    assert row is not None and row.status == "awaiting_user_auth"


async def test_finished_session_reads_from_the_database_after_its_ttl(api: Api) -> None:
    uid, token = await api.new_user()
    session = await api.services.login_sessions.start(uuid.UUID(uid), "codex")
    await api.services.login_sessions.repo.finish(uuid.UUID(session["session_id"]), "completed")
    await api.services.session_store.delete(session["session_id"])
    r = await api.client.get(f"/api/auth/sessions/{session['session_id']}", headers=api.auth(token))
    assert r.status_code == 200 and r.json()["status"] == "completed"


@pytest.mark.parametrize("status", ["completed", "failed", "timeout", "cancelled"])
async def test_a_code_for_an_ended_session_is_410_as_a_vnc_ticket_is(api: Api, status: str) -> None:
    uid, token = await api.new_user()
    h = api.auth(token)
    sid = uuid.UUID((await api.services.login_sessions.start(uuid.UUID(uid), "claude_code"))["session_id"])
    await api.services.login_sessions.finish(sid, status, "ended")
    code = await api.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    ticket = await api.client.post(f"/api/auth/sessions/{sid}/vnc-ticket", headers=h)
    assert code.status_code == ticket.status_code == 410, (code.text, ticket.text)
    assert code.json() == ticket.json()
    assert code.json()["error"]["code"] == "session_expired" and code.json()["error"]["action"] == "start_new_session"
    assert status in code.json()["error"]["message"]


async def test_an_ended_session_has_no_vnc_url(api: Api) -> None:
    uid, token = await api.new_user()
    h = api.auth(token)
    sid = uuid.UUID((await api.services.login_sessions.start(uuid.UUID(uid), "claude_code"))["session_id"])
    view = f"/api/auth/sessions/{sid}/vnc"
    await api.services.login_sessions.update(sid, status="awaiting_user_auth", vnc_url=view)
    assert (await api.client.get(f"/api/auth/sessions/{sid}", headers=h)).json()["vnc_url"] == view
    await api.services.login_sessions.finish(sid, "completed")
    body = (await api.client.get(f"/api/auth/sessions/{sid}", headers=h)).json()
    assert body["status"] == "completed" and body["vnc_url"] is None
    await api.services.session_store.delete(str(sid))  # read from its row from now on
    body = (await api.client.get(f"/api/auth/sessions/{sid}", headers=h)).json()
    assert body["status"] == "completed" and body["vnc_url"] is None


@pytest.mark.parametrize("method,path,kwargs,status,code", [
    ("put", "/api/credentials/codex/api-key", {"content": b'{"api_key": ', "headers": {"content-type": "application/json"}},
     400, "malformed_json"),
    ("put", "/api/credentials/openai/api-key", {"json": {"api_key": KEY}}, 422, "unknown_provider"),
    ("delete", "/api/credentials/CLAUDE", {}, 422, "unknown_provider"),
    ("put", "/api/credentials/codex/api-key", {"json": {"api_key": 12345678901}}, 422, "validation_error"),
    ("put", "/api/credentials/codex/api-key", {"json": ["not", "an", "object"]}, 422, "validation_error"),
    ("put", "/api/credentials/codex/api-key", {"json": {"api_key": "with spaces in it"}}, 422, "validation_error"),
    ("put", "/api/credentials/codex/api-key", {"json": {"api_key": KEY, "extra": 1}}, 422, "validation_error"),
    ("put", "/api/credentials/codex/api-key", {"json": {"api_key": "k" * 2_000_000}}, 413, "payload_too_large"),
    ("put", "/api/credentials/codex/api-key", {"content": b"api_key=abc", "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type"),
    ("get", "/api/auth/sessions/not-a-uuid", {}, 422, "malformed_id"),
    ("get", "/api/auth/sessions/1' OR '1'='1", {}, 422, "malformed_id"),
    ("post", "/api/users", {"json": {"name": "Bad Name!"}}, 422, "validation_error"),
    ("post", "/api/users", {"json": {"name": "ok", "role": "root"}}, 422, "validation_error"),
    ("get", "/api/nowhere", {}, 404, "not_found"),
    ("post", "/api/credentials", {"json": {}}, 405, "method_not_allowed"),
])
async def test_bad_input_is_a_json_4xx_and_changes_nothing(api: Api, method: str, path: str, kwargs: dict,
                                                          status: int, code: str) -> None:
    before = await credential_count(api)
    users_before = len((await api.client.get("/api/users", headers=api.auth(api.admin_token))).json())
    kwargs = dict(kwargs)  # parametrize shares the dict between the two stacks
    headers = {**api.auth(api.admin_token), **kwargs.pop("headers", {})}
    r = await api.client.request(method.upper(), path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert KEY not in r.text
    assert await credential_count(api) == before
    assert len((await api.client.get("/api/users", headers=api.auth(api.admin_token))).json()) == users_before


async def test_streamed_oversized_body_is_413(api: Api) -> None:
    async def chunks():
        for _ in range(40):
            yield b"x" * 65536

    r = await api.client.put("/api/credentials/codex/api-key", content=chunks(),
                             headers={**api.auth(api.admin_token), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_a_body_that_never_arrives_is_408_and_its_connection_closed(tmp_path: Path) -> None:
    """Against a real server on loopback: a client announces 100 bytes, sends 7 and waits."""
    svc = await open_services(make_settings(tmp_path, body_timeout_seconds=0.5))
    try:
        async with serving(create_app(services=svc)) as address:
            host, port = address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"POST /api/runs HTTP/1.1\r\nHost: polydev.test\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"prov"')
                await writer.drain()
                # All the server sends until it closes the connection (without the limit: nothing, ever).
                answer = await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()  # (else the server's shutdown would wait for this request's body forever)
    finally:
        await svc.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "within 0.5 s" in error["message"]


async def test_metrics_count_requests_by_route_and_sessions_by_status(api: Api) -> None:
    uid, token = await api.new_user()
    await api.services.login_sessions.start(uuid.UUID(uid), "codex")
    sid = (await api.services.login_sessions.start(uuid.UUID(uid), "codex"))["session_id"]
    await api.client.get(f"/api/auth/sessions/{sid}", headers=api.auth(token))
    text = (await api.client.get("/metrics")).text
    assert 'polydev_http_requests_total{method="GET",route="/api/auth/sessions/{session_id}",status="200"} 1.0' in text
    assert 'polydev_http_request_duration_seconds_count{method="GET",route="/api/auth/sessions/{session_id}"}' in text
    assert 'polydev_auth_sessions{status="initializing"} 2.0' in text
    assert 'polydev_auth_sessions{status="completed"} 0.0' in text


async def test_openapi_is_served(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    assert "/api/credentials/{provider}/api-key" in spec["paths"]
    assert "/api/auth/sessions/{session_id}" in spec["paths"]
