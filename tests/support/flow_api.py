"""Helpers for tests that drive the login and run flows through the API (tests/integration/test_flows.py and
the tests built on it): wait for a status, read an SSE body, log a scripted user in, post a run."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from polydev.providers.base import CredentialBundle
from polydev.vm.engine import find_marked_processes
from tests.support.app import Api


async def wait_status(api: Api, h: dict[str, str], sid: str, *statuses: str, timeout: float = 60) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await api.client.get(f"/api/auth/sessions/{sid}", headers=h)).json()
        if body["status"] in statuses:
            return body
        assert asyncio.get_running_loop().time() < deadline, f"session stuck in {body}"
        await asyncio.sleep(0.05)


async def wait_run(api: Api, h: dict[str, str], rid: str, timeout: float = 60) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await api.client.get(f"/api/runs/{rid}", headers=h)).json()
        if body["status"] not in ("queued", "running"):
            return body
        assert asyncio.get_running_loop().time() < deadline, f"run stuck in {body}"
        await asyncio.sleep(0.05)


async def no_vms_left(api: Api) -> None:
    engine = api.services.engine
    assert engine is not None
    assert await engine.list() == []
    assert find_marked_processes(engine.tag) == {}


def sse(text: str) -> list[tuple[int, str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in fields:
            out.append((int(fields.get("id", -1)), fields.get("event", ""), json.loads(fields["data"])))
    return out


async def stored(api: Api, uid: str) -> CredentialBundle:
    found = await api.services.credentials.reveal_with_kind(uuid.UUID(uid), "claude_code")
    assert found is not None
    return CredentialBundle.from_bytes(found[1], found[0])


async def login(api: Api, h: dict[str, str]) -> str:
    sid = (await api.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(api, h, sid, "awaiting_user_auth")
    r = await api.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 202, r.text
    assert (await wait_status(api, h, sid, "completed", "failed"))["status"] == "completed"
    return sid


async def logged_in(api: Api) -> tuple[str, dict[str, str]]:
    """A new user whose fake account is connected: (user id, auth headers)."""
    uid, token = await api.new_user()
    h = api.auth(token)
    await login(api, h)
    return uid, h


async def api_key_user(api: Api) -> dict[str, str]:
    """A new user whose run would start at once (a stored API key): their auth headers."""
    _, token = await api.new_user()
    h = api.auth(token)
    r = await api.client.put("/api/credentials/claude_code/api-key", json={"api_key": "sk-fake-1"}, headers=h)
    assert r.status_code == 200, r.text
    return h


async def post_run(api: Api, h: dict[str, str], prompt: str, **extra: Any) -> str:
    r = await api.client.post("/api/runs", json={"provider": "claude_code", "prompt": prompt, **extra}, headers=h)
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def until_event(api: Api, h: dict[str, str], rid: str, kind: str) -> None:
    for _ in range(600):
        stored_events = await api.services.runs.events_after(uuid.UUID(rid))
        if any(e.data["type"] == kind for e in stored_events):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} event")
