"""Several servers on one database (core/cluster.py, store/servers.py): each start registers, a start ends only
what its own earlier starts and gone servers left (never a live peer's work), a gone server's logins, runs and
VMs are ended once, with the reason in words, by whichever live server claims it first, and each host's
capacity counts only its own VMs. The sweeps are called directly: nothing here waits on a clock."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from polydev.core import login_flow, run_flow
from polydev.core.quotas import HostFull
from polydev.services import Services, open_services
from polydev.store.leases import LeaseRepo
from polydev.store.models import Server, utcnow
from polydev.store.runs import RunRepo
from polydev.store.servers import ServerRepo
from polydev.store.vault import generate_master_key
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.engine import VMEngine
from tests.support.app import make_settings
from tests.support.engine_fakes import FakeBackend

Opener = Callable[..., Awaitable[Services]]


@pytest.fixture
async def servers(database_url: str, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens servers on one database and one master key, each on a data directory of its own."""
    key = generate_master_key()
    opened: list[Services] = []

    async def open_one(name: str, **settings: object) -> Services:
        svc = await open_services(make_settings(tmp_path / name, database_url=database_url,
                                                credential_encryption_key=key, **settings))
        opened.append(svc)
        return svc

    yield open_one
    for svc in reversed(opened):
        await svc.close()


async def hosted_work(svc: Services, server_id: uuid.UUID | None) -> tuple[str, uuid.UUID, uuid.UUID]:
    """A live login, a running run holding a network lease's VM, as `server_id` would have made them."""
    user = await svc.users.create(f"u{uuid.uuid4().hex[:8]}")
    svc.login_sessions.repo.server_id = server_id
    try:
        login = (await svc.login_sessions.start(user.id, "claude_code"))["session_id"]
    finally:
        svc.login_sessions.repo.server_id = svc.server_id
    run = await RunRepo(svc.factory, server_id).create(user.id, "claude_code", "hi", timeout_seconds=60,
                                                       credential_kind="api_key")
    vm = await VmRepo(svc.factory, server_id).create(purpose="cli", backend="fake", vcpu_count=1, memory_mb=256)
    await svc.runs.mark_running(run.id, vm.vm_id)
    await LeaseRepo(svc.factory).acquire(vm.vm_id, 4, lambda i: f"192.168.100.{i * 2 + 2}")
    return login, run.id, vm.vm_id


async def age(svc: Services, server_id: uuid.UUID, seconds: float = 3600) -> None:
    """Make a server's last heartbeat `seconds` old: as if it was killed that long ago."""
    async with svc.factory() as s:
        await s.execute(update(Server).where(Server.id == server_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        await s.commit()


async def test_a_gone_servers_work_is_ended_once_with_the_reason(servers: Opener) -> None:
    a = await servers("a")
    b = await servers("b")
    await a.cluster.start(runs_vms=True)
    await b.cluster.start(runs_vms=True)
    login_a, run_a, vm_a = await hosted_work(a, a.server_id)
    login_b, run_b, vm_b = await hosted_work(a, b.server_id)

    await age(b, a.server_id)  # A was killed: its heartbeat stopped
    assert await b.cluster.sweep() == {"logins": 1, "runs": 1, "vms": 1}
    assert await a.cluster.sweep() == {"logins": 0, "runs": 0, "vms": 0}, "claimed once, by B"

    url = a.settings.internal_url
    row = await b.login_sessions.repo.get(uuid.UUID(login_a))
    assert row is not None and row.status == "failed"
    assert row.error_message == f"the server driving this login ({url}) stopped responding; start a new session"
    run = await b.runs.get(run_a)
    assert run is not None and run.status == "failed"
    assert run.error_message == f"the server driving this run ({url}) stopped responding"
    assert (await b.runs.events_after(run_a))[-1].data == {"type": "error", "message": run.error_message}
    vm = await VmRepo(b.factory).get(vm_a)
    assert vm is not None and vm.status == "failed" and url in (vm.error_message or "")
    assert vm_a not in (await LeaseRepo(b.factory).held()).values()
    # B's own work goes on.
    assert (await b.login_sessions.repo.get(uuid.UUID(login_b))).status == "initializing"  # type: ignore[union-attr]
    assert (await b.runs.get(run_b)).status == "running"  # type: ignore[union-attr]
    assert vm_b in (await LeaseRepo(b.factory).held()).values()
    peer = await ServerRepo(b.factory).get(a.server_id)
    assert peer is not None and peer.reaped_by == b.server_id


async def test_a_start_ends_its_earlier_starts_work_and_leaves_live_peers_alone(servers: Opener) -> None:
    peer = await servers("peer")
    await peer.cluster.start(runs_vms=True)
    first = await servers("same")
    await first.cluster.start(runs_vms=True)
    peer_login, peer_run, peer_vm = await hosted_work(peer, peer.server_id)
    old_login, old_run, _ = await hosted_work(peer, first.server_id)
    # The first start crashed (its heartbeat is still fresh); the next one on the same data directory:
    again = await servers("same")
    assert await again.cluster.live_peers() == {peer.server_id}, "its earlier start is not a live peer"
    assert await again.cluster.start(runs_vms=True) == {"logins": 1, "runs": 1, "vms": 1}

    row = await again.login_sessions.repo.get(uuid.UUID(old_login))
    assert row is not None and (row.status, row.error_message) == ("failed", login_flow.RESTARTED)
    run = await again.runs.get(old_run)
    assert run is not None and (run.status, run.error_message) == ("failed", run_flow.RESTARTED)
    assert (await again.login_sessions.repo.get(uuid.UUID(peer_login))).status == "initializing"  # type: ignore[union-attr]
    assert (await again.runs.get(peer_run)).status == "running"  # type: ignore[union-attr]
    assert (await VmRepo(again.factory).get(peer_vm)).status == "creating"  # type: ignore[union-attr]


async def test_rows_from_before_the_registry_end_at_the_next_start(servers: Opener) -> None:
    a = await servers("a")
    _, run, _ = await hosted_work(a, None)
    assert (await a.cluster.start(runs_vms=True))["logins"] == 1
    assert (await a.runs.get(run)).error_message == run_flow.RESTARTED  # type: ignore[union-attr]


async def test_a_clean_stop_is_recorded_and_no_work_is_placed_there(servers: Opener) -> None:
    a = await servers("a", host_vcpus=8, host_memory_mb=8192)
    b = await servers("b", host_vcpus=8, host_memory_mb=8192)
    await a.cluster.start(runs_vms=True)
    await b.cluster.start(runs_vms=True)
    await VmRepo(a.factory, a.server_id).create(purpose="cli", backend="fake", vcpu_count=4, memory_mb=4096)
    best = await a.cluster.place(1, 1024)
    assert best is not None and best.server_id == b.server_id, "B has more room"
    assert await b.cluster.place(1, 1024) is None, "B is the roomiest: it keeps its own request"

    await b.cluster.stop()
    row = await ServerRepo(a.factory).get(b.server_id)
    assert row is not None and row.stopped_at is not None
    assert await a.cluster.place(1, 1024) is None, "a stopped server gets no new work"


async def test_each_hosts_capacity_counts_only_its_own_vms(servers: Opener) -> None:
    a = await servers("a", host_vcpus=2, host_memory_mb=2048)
    b = await servers("b", host_vcpus=2, host_memory_mb=2048)
    user = await a.users.create("capacity")
    await VmRepo(a.factory, a.server_id).create(user_id=user.id, purpose="cli", backend="fake", vcpu_count=1,
                                                memory_mb=2048)
    with pytest.raises(HostFull):
        await a.admission.check(user.id, "vm", 1, 2048)
    await b.admission.check(user.id, "vm", 1, 2048)  # B's host is empty: admitted


async def test_a_live_server_is_never_claimed_and_one_wrongly_taken_for_dead_rejoins(servers: Opener) -> None:
    a = await servers("a")
    b = await servers("b")
    await a.cluster.start(runs_vms=True)
    await b.cluster.start(runs_vms=True)
    repo = ServerRepo(b.factory)
    assert not await repo.claim_gone(a.server_id, b.server_id, b.cluster.stale_after), "its heartbeat is fresh"
    await age(b, a.server_id)
    assert await repo.claim_gone(a.server_id, b.server_id, b.cluster.stale_after)
    # A was only slow: its next heartbeat finds itself reaped, and it joins again.
    assert not await repo.heartbeat(a.server_id)
    assert await repo.rejoin(a.server_id)
    assert a.server_id in {s.id for s in await repo.alive(b.cluster.stale_after)}


async def test_an_engine_reaps_and_destroys_only_the_vms_its_server_hosts(servers: Opener) -> None:
    a = await servers("a")
    engine = VMEngine(backend=FakeBackend(), vms=VmRepo(a.factory, a.server_id), cleanup=CleanupTaskRepo(a.factory),
                      leases=LeaseRepo(a.factory), data_dir=a.settings.data_dir)
    # Another server's VM, expired and with a cleanup task due: its process id means nothing on this machine
    # (here it is a bystander's, which must survive).
    bystander = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(120)")
    try:
        past = utcnow() - timedelta(minutes=1)
        other = await VmRepo(a.factory, uuid.uuid4()).create(purpose="cli", backend="fake", expires_at=past,
                                                             backend_pid=bystander.pid)
        await engine.cleanup.schedule(other.vm_id, past)
        mine = await engine.create(None, "cli", ttl=timedelta(minutes=5))
        await engine.vms.update(mine.id, expires_at=past)

        assert await engine.reaper.reap_once() == 1, "its own expired VM only"
        assert await engine.destroy(other.vm_id) is False
        assert bystander.returncode is None and Path(f"/proc/{bystander.pid}").exists()
        assert (await engine.vms.get(other.vm_id)).status == "creating"  # type: ignore[union-attr]
        assert (await engine.vms.get(mine.id)).status == "destroyed"  # type: ignore[union-attr]
        assert len(await engine.cleanup.pending_for(other.vm_id)) == 1, "left for its own server"
    finally:
        bystander.kill()
        await bystander.wait()
        await engine.close()


async def test_a_workspace_and_its_conversations_are_hosted_where_its_vm_is(servers: Opener) -> None:
    """The peer routing (api/peers.py) passes a workspace's calls and its turns to the server named here."""
    from polydev.store.conversations import ConversationRepo
    from polydev.store.models import Workspace
    from polydev.store.workspaces import WorkspaceRepo

    a = await servers("a")
    b = await servers("b")
    await a.cluster.start(runs_vms=True)
    await b.cluster.start(runs_vms=True)
    user = await a.users.create("hosted")
    vm = await VmRepo(a.factory, b.server_id).create(purpose="cli", backend="fake", vcpu_count=1, memory_mb=256)
    workspace = Workspace(user_id=user.id, name="w", source="empty", state="paused", vm_id=vm.vm_id)
    await WorkspaceRepo(a.factory).add(workspace)
    conversation = await ConversationRepo(a.factory).create(user.id, workspace.id, "codex")
    for repo in (a.cluster.servers, b.cluster.servers):
        assert (await repo.host_of_workspace(workspace.id)).id == b.server_id  # type: ignore[union-attr]
        assert (await repo.host_of_conversation(conversation.id)).id == b.server_id  # type: ignore[union-attr]
        assert await repo.host_of_workspace(uuid.uuid4()) is None
        assert await repo.host_of_conversation(uuid.uuid4()) is None
