"""Two replicas behind one load balancer (PostgreSQL + Redis shared): a login driven by replica A takes the
user's code and cancel sent to replica B (core/relay.py, core/login_relay.py), and a run driven by A is
cancelled through B. Same stand-in VMs as test_flows.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.core.login_relay import CODE_KEY, LoginRelay
from polydev.services import open_services
from polydev.store.sessions import MemorySessionStore
from polydev.store.vault import SealedRecord, VaultError
from tests.support.app import Api
from tests.support.flow_api import (
    logged_in,
    no_vms_left,
    post_run,
    sse,
    stored,
    until_event,
    wait_run,
    wait_status,
)
from tests.support.flow_fakes import host_guest_paths

# Two replicas exist only on the shared deployment (the embedded one's in-process session store is not shared):
# tests with replica_b run on PostgreSQL + Redis alone, rather than skipping on the other.
SHARED = pytest.mark.parametrize("stack", [pytest.param("redis", marks=[pytest.mark.postgres, pytest.mark.redis])],
                                 indirect=True)


@pytest.fixture
async def replica_b(flows: Api, stack: Settings, tmp_path: Path) -> AsyncIterator[Api]:  # noqa: F811
    """A second server on the same database and session store, running no VMs of its own."""
    assert stack.redis_url is not None, "a second replica needs a shared session store: mark the test SHARED"
    svc = await open_services(stack)
    svc.guest_paths = host_guest_paths(str(tmp_path / "guest"))
    app = create_app(services=svc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica-b.test",
                                 timeout=60) as client:
        yield Api(svc, client, flows.admin_token)
    await svc.close()


async def start_on_a(a: Api) -> tuple[str, dict[str, str], str]:
    uid, token = await a.new_user()
    h = a.auth(token)
    r = await a.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)
    assert r.status_code == 202, r.text
    return uid, h, r.json()["session_id"]


@SHARED
async def test_a_code_sent_to_another_replica_completes_the_login(flows: Api, replica_b: Api) -> None:  # noqa: F811
    uid, h, sid = await start_on_a(flows)
    await wait_status(replica_b, h, sid, "awaiting_user_auth")  # B reads the shared state
    r = await replica_b.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 202, r.text
    assert (await wait_status(replica_b, h, sid, "completed", "failed"))["status"] == "completed"
    assert json.loads((await stored(flows, uid)).files[".fake/creds.json"][0])["access"] == "from-paste"
    live = await flows.services.session_store.get(sid)
    assert live is not None and not live.get(CODE_KEY)  # taken (and removed) by A
    await no_vms_left(flows)


@SHARED
async def test_bad_input_is_refused_by_the_replica_that_receives_it(flows: Api, replica_b: Api) -> None:  # noqa: F811
    _, h, sid = await start_on_a(flows)
    await wait_status(replica_b, h, sid, "awaiting_user_auth")
    r = await replica_b.client.post(f"/api/auth/sessions/{sid}/code",
                                    json={"code": "http://localhost/callback?code=good-code"}, headers=h)
    assert r.status_code == 422 and "http://localhost:PORT" in r.json()["error"]["message"], r.text
    live = await flows.services.session_store.get(sid)
    assert live is not None and not live.get(CODE_KEY)  # nothing was relayed
    # Another user learns nothing about the session on either replica.
    _, other = await flows.new_user()
    r = await replica_b.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"},
                                    headers=flows.auth(other))
    assert r.status_code == 404
    assert (await wait_status(flows, h, sid, "awaiting_user_auth"))["status"] == "awaiting_user_auth"
    await flows.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h)
    await no_vms_left(flows)


@SHARED
async def test_cancel_sent_to_another_replica_ends_the_login_and_its_vm(flows: Api, replica_b: Api) -> None:  # noqa: F811
    _, h, sid = await start_on_a(flows)
    await wait_status(replica_b, h, sid, "awaiting_user_auth")
    r = await replica_b.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled" and r.json()["error_message"] == "cancelled by the user"
    await no_vms_left(flows)  # A, which drove it, destroyed the VM


async def test_a_relayed_code_is_sealed_and_bound_to_its_session(flows: Api) -> None:  # noqa: F811
    store = MemorySessionStore(60)
    relay = LoginRelay(store, flows.services.vault)
    user, sid, other_sid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await store.create(str(sid), {"status": "awaiting_user_auth"})
    await relay.send_code(user, sid, "one-time-code-123")
    state = await store.get(str(sid))
    assert state is not None and "one-time-code-123" not in json.dumps(state)
    record = SealedRecord(**state[CODE_KEY])
    assert flows.services.vault.open(user, f"login-code:{sid}", record) == b"one-time-code-123"
    with pytest.raises(VaultError):  # replayed into another session (or user) it does not open
        flows.services.vault.open(user, f"login-code:{other_sid}", record)


@SHARED
async def test_a_run_cancelled_through_another_replica_ends_on_the_one_driving_it(flows: Api,  # noqa: F811
                                                                                 replica_b: Api) -> None:
    _, h = await logged_in(flows)
    rid = await post_run(flows, h, "sleep 60")
    await until_event(flows, h, rid, "text")
    r = await replica_b.client.post(f"/api/runs/{rid}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert r.json()["error_message"] == "cancelled by the user"
    events = sse((await replica_b.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert [e[0] for e in events] == list(range(len(events)))  # one writer: no gap, no clash
    assert [e[2]["message"] for e in events if e[1] == "error"] == ["cancelled by the user"]
    await no_vms_left(flows)  # A killed the CLI and destroyed the VM
    # The credential is free again.
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "next"}, headers=h)
    assert r.status_code == 202, r.text
    await wait_run(flows, h, r.json()["id"])
