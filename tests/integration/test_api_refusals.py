"""What the API answers when it must refuse, and that a refusal starts nothing: run files over
MAX_RUN_FILES_BYTES, `/health` with its database or session store down (real servers of the test's own,
stopped under it), and `503 vm_capacity` when every network slot is taken (tap mode, real slots)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.services import open_services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.engine import VMEngine, find_marked_processes
from polydev.vm.network import SlotNetwork
from tests.support import servers
from tests.support.agent_backend import AgentBackend
from tests.support.app import Api, make_settings
from tests.support.engine_fakes import FakeBackend
from tests.support.flow_api import api_key_user, no_vms_left, wait_run
from tests.support.netns import host_namespace, require_root_netns

FILES_LIMIT = 1000


def _backend(api: Api) -> AgentBackend:
    assert api.services.engine is not None and isinstance(api.services.engine.backend, AgentBackend)
    return api.services.engine.backend


async def test_run_files_over_the_limit_are_refused_and_start_nothing(flows: Api) -> None:
    flows.services.settings = flows.services.settings.model_copy(update={"max_run_files_bytes": FILES_LIMIT})
    h = await api_key_user(flows)
    over = {"a.txt": "x" * 600, "b.txt": "y" * (FILES_LIMIT - 600 + 1)}  # the total counts, not each file
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi", "files": over},
                                headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "files_too_large", r.text
    message = r.json()["error"]["message"]
    assert f"{FILES_LIMIT + 1} bytes" in message and str(FILES_LIMIT) in message  # what was sent, and the limit
    # Nothing started: no run recorded, no VM asked for.
    assert (await flows.client.get("/api/runs", headers=h)).json() == []
    assert _backend(flows).started == []
    await no_vms_left(flows)
    # At the limit exactly, the same run goes through.
    at = {"a.txt": "x" * 600, "b.txt": "y" * (FILES_LIMIT - 600)}
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi", "files": at},
                                headers=h)
    assert r.status_code == 202, r.text
    assert (await wait_run(flows, h, r.json()["id"]))["status"] == "succeeded"
    assert len(_backend(flows).started) == 1



@pytest.fixture
def own_servers(tmp_path: Path) -> Iterator[tuple[servers.Server, servers.Server, Settings]]:
    """A PostgreSQL and a Redis of this test's own, which it may stop, and settings that use them."""
    pg, redis = servers.start_postgres(private=True), servers.start_redis(private=True)
    try:
        yield pg, redis, make_settings(tmp_path, database_url=servers.create_database(pg.url, "health"),
                                       redis_url=redis.url)
    finally:
        redis.close()
        pg.close()


@pytest.fixture
async def own_api(own_servers: tuple[servers.Server, servers.Server, Settings]) -> AsyncIterator[Api]:
    svc = await open_services(own_servers[2])
    try:
        app = create_app(services=svc)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://polydev.test",
                                     timeout=60) as client:
            yield Api(svc, client, "")
    finally:
        await svc.close()


def _stop(server: servers.Server) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown (clients are cut off); Redis exits
    server.proc.wait(60)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("down", ["database", "session_store"])
async def test_health_is_503_degraded_when_its_database_or_session_store_is_down(
        own_servers: tuple[servers.Server, servers.Server, Settings], own_api: Api, down: str) -> None:
    pg, redis, _ = own_servers
    api = own_api
    r = await api.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    _stop(pg if down == "database" else redis)
    r = await api.client.get("/health")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "degraded"
    assert body[down]["ok"] is False
    up = "session_store" if down == "database" else "database"
    assert body[up]["ok"] is True  # and it says which one


@pytest.fixture
async def one_slot(stack: Settings) -> AsyncIterator[Api]:
    """The VM API over an engine in tap mode whose pool has a single network slot (real slots, in a namespace
    of the test's own; the stand-in hypervisor)."""
    require_root_netns()
    with host_namespace() as prefix:
        svc = await open_services(stack)
        issued = await svc.users.bootstrap_admin()
        assert issued is not None
        network = SlotNetwork("192.168.100.2", "192.168.100.3", prefix=prefix, host_netns=f"{prefix}-host")
        svc.engine = VMEngine(backend=FakeBackend(), vms=VmRepo(svc.factory), cleanup=CleanupTaskRepo(svc.factory),
                              leases=LeaseRepo(svc.factory), data_dir=stack.data_dir, network=network)
        try:
            app = create_app(services=svc)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://polydev.test") as client:
                yield Api(svc, client, issued.secret)
        finally:
            tag = svc.engine.tag
            await svc.close()
            assert find_marked_processes(tag) == {}


async def test_no_free_network_slot_answers_503_vm_capacity(one_slot: Api) -> None:
    h = one_slot.auth(one_slot.admin_token)
    r = await one_slot.client.post("/api/vms", json={"purpose": "cli"}, headers=h)
    assert r.status_code == 201, r.text
    first = r.json()["id"]
    r = await one_slot.client.post("/api/vms", json={"purpose": "cli"}, headers=h)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "vm_capacity"
    assert error["message"] == "no capacity for another VM right now: all 1 network slots are in use"
    # The refused VM's row says why, and nothing of it runs: only the first VM has a process.
    engine = one_slot.services.engine
    assert engine is not None
    refused = await engine.get(uuid.UUID(error["vm_id"]))
    assert refused is not None and refused.status == "failed"
    assert set(find_marked_processes(engine.tag)) == {uuid.UUID(first)}
    # A freed slot is capacity again.
    assert (await one_slot.client.delete(f"/api/vms/{first}", headers=h)).status_code in (200, 204)
    r = await one_slot.client.post("/api/vms", json={"purpose": "cli"}, headers=h)
    assert r.status_code == 201, r.text
