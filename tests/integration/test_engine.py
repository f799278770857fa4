"""The engine's bookkeeping with a stand-in hypervisor: rows, processes, disks, leases, slots, reclaim."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.agent_client import AgentClient
from polydev.vm.engine import (
    VM,
    VMCapacityError,
    VMCreateError,
    VMEngine,
    find_marked_processes,
    marker_for,
)
from tests.support.engine_fakes import FakeBackend


def make_engine(services: Services, backend: FakeBackend, **kw: object) -> VMEngine:
    return VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                    leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def engine(services: Services) -> AsyncIterator[VMEngine]:
    eng = make_engine(services, FakeBackend())
    yield eng
    await eng.close()
    # Whatever a test left, a fresh engine reclaims (and the test run leaves no process behind).
    await make_engine(services, FakeBackend()).reconcile()


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_create_and_destroy(engine: VMEngine) -> None:
    vm = await engine.create(None, "cli", ttl=timedelta(minutes=5))
    assert vm.status == "running" and vm.backend == "fake"
    procs = find_marked_processes(engine.tag)
    assert list(procs) == [vm.id]
    workdir = engine.workdir(vm.id)
    assert (workdir / "disk.qcow2").exists()
    assert [v.id for v in await engine.list()] == [vm.id]
    assert await engine.destroy(vm.id) is True
    assert not pid_alive(procs[vm.id]) and not workdir.exists()
    row = await engine.get(vm.id)
    assert row is not None and row.status == "destroyed"
    assert await engine.destroy(vm.id) is False
    assert await engine.list() == []


async def test_failed_create_leaves_nothing_and_says_why(engine: VMEngine) -> None:
    backend = engine.backend
    assert isinstance(backend, FakeBackend)
    backend.fail_next = "agent not ready after 300 s"
    with pytest.raises(VMCreateError) as info:
        await engine.create(None, "cli")
    err = info.value
    assert "agent not ready" in str(err) and err.console_log is not None and err.console_log.exists()
    assert "booted" in err.console_log.read_text()
    assert find_marked_processes(engine.tag) == {}
    assert not engine.workdir(err.vm_id).exists()
    row = await engine.get(err.vm_id)
    assert row is not None and row.status == "failed" and "agent not ready" in (row.error or "")
    assert str(err.console_log) in (row.error or "")


async def test_reaper_destroys_expired_vms(engine: VMEngine) -> None:
    old = await engine.create(None, "cli", ttl=timedelta(seconds=0))
    young = await engine.create(None, "cli", ttl=timedelta(hours=1))
    assert await engine.reap_once() == 1
    assert [v.id for v in await engine.list()] == [young.id]
    assert set(find_marked_processes(engine.tag)) == {young.id}
    assert (await engine.get(old.id)).status == "destroyed"  # type: ignore[union-attr]


async def test_reconcile_after_an_engine_is_lost(services: Services, engine: VMEngine) -> None:
    a = await engine.create(None, "cli")
    b = await engine.create(None, "browser")
    # Debris a crash can leave: a marked process with no row, a disk with no row, a lease with no VM.
    stray_id = uuid.uuid4()
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)", marker_for(engine.tag, stray_id)],
                             start_new_session=True)
    # Popen returns once the exec began; the new command line shows in /proc a moment later.
    while str(stray_id).encode() not in Path(f"/proc/{stray.pid}/cmdline").read_bytes():
        await asyncio.sleep(0.001)
    (engine.vms_dir / str(uuid.uuid4())).mkdir()
    await engine.leases.acquire(uuid.uuid4(), 8, str)

    successor = make_engine(services, FakeBackend())  # the restarted control plane: knows no tokens
    counts = await successor.reconcile()
    stray.wait(timeout=10)
    assert counts["processes"] == 3 and counts["rows"] == 2 and counts["disks"] == 3 and counts["leases"] == 1
    assert find_marked_processes(engine.tag) == {}
    assert await successor.list() == [] and await successor.leases.held() == {}
    assert list(engine.vms_dir.iterdir()) == []
    for vm in (a, b):
        row = await successor.get(vm.id)
        assert row is not None and row.status == "failed" and "control plane stopped" in (row.error or "")
    assert await successor.reconcile() == dict.fromkeys(counts, 0), "a second pass finds nothing"


async def test_engines_with_other_data_dirs_are_left_alone(services: Services, engine: VMEngine,
                                                           tmp_path: Path) -> None:
    vm = await engine.create(None, "cli")
    other = VMEngine(backend=FakeBackend(), vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                     leases=LeaseRepo(services.factory), data_dir=tmp_path / "elsewhere")
    await other.reconcile()
    assert vm.id in find_marked_processes(engine.tag)


CRASHER = textwrap.dedent('''
    import asyncio, sys
    from pathlib import Path
    from polydev.config import Settings
    from polydev.services import open_services
    from polydev.store.leases import LeaseRepo
    from polydev.store.vms import CleanupTaskRepo, VmRepo
    from polydev.vm.engine import VMEngine
    sys.path.insert(0, sys.argv[2])
    from tests.support.engine_fakes import FakeBackend

    async def main():
        s = await open_services(Settings(POLYDEV_DATA_DIR=Path(sys.argv[1]), DATABASE_URL=sys.argv[3]))
        backend = FakeBackend()
        e = VMEngine(backend=backend, vms=VmRepo(s.factory), cleanup=CleanupTaskRepo(s.factory),
                     leases=LeaseRepo(s.factory), data_dir=Path(sys.argv[1]))
        for _ in range(2):
            await e.create(None, "cli")
        backend.block = asyncio.Event()  # the third creation hangs mid-way, as a slow boot would
        task = asyncio.create_task(e.create(None, "cli"))
        while len(backend.started) < 3:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task
    asyncio.run(main())
''')


async def test_sigkill_while_running_and_mid_creation_then_reconcile(services: Services, engine: VMEngine) -> None:
    root = Path(__file__).resolve().parents[2]
    url = services.settings.effective_database_url
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(services.settings.data_dir), str(root), url],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or lines[-1] not in ("ready", ""):  # skip its log lines
        lines.append((await asyncio.to_thread(proc.stdout.readline)).strip())
    assert lines[-1] == "ready", lines
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(find_marked_processes(engine.tag)) == 3, "the VMs outlive their engine"
    rows = await engine.vms.list()
    assert sorted(r.status for r in rows) == ["creating", "running", "running"]

    counts = await engine.reconcile()
    assert counts["processes"] == 3 and counts["rows"] == 3
    assert find_marked_processes(engine.tag) == {}
    assert await engine.list() == []
    assert not any(engine.vms_dir.iterdir())
    assert await engine.leases.held() == {}


async def test_tap_mode_slot_follows_the_vm_and_is_reclaimed(services: Services) -> None:
    from polydev.vm.network import SlotNetwork
    from tests.support.netns import POOL, host_namespace, require_root_netns

    require_root_netns()
    # pyroute2's sync API runs an event loop of its own: from async code, call it in a thread (as the engine does).
    with host_namespace() as prefix:
        network = SlotNetwork(*POOL, prefix=prefix, host_netns=f"{prefix}-host")
        eng = make_engine(services, FakeBackend(), network=network)
        a = await eng.create(None, "cli")
        b = await eng.create(None, "cli")
        assert {a.slot_index, b.slot_index} == {0, 1} and await asyncio.to_thread(network.existing) == {0, 1}
        backend = eng.backend
        assert isinstance(backend, FakeBackend) and backend.started[0].slot is not None
        await eng.destroy(a.id)
        assert await asyncio.to_thread(network.existing) == {b.slot_index}
        assert set((await eng.leases.held()).keys()) == {b.slot_index}
        c = await eng.create(None, "cli")
        assert c.slot_index == a.slot_index, "a released slot is reused"
        # The engine is lost; its successor reclaims slots, leases and processes.
        successor = make_engine(services, FakeBackend(), network=network)
        counts = await successor.reconcile()
        assert counts["slots"] == 2 and counts["processes"] == 2
        assert await asyncio.to_thread(network.existing) == set() and await successor.leases.held() == {}

        # A pool of one slot: the second VM is refused as a capacity problem, and leaves nothing behind.
        tiny = SlotNetwork("192.168.100.2", "192.168.100.3", prefix=prefix, host_netns=f"{prefix}-host")
        small = make_engine(services, FakeBackend(), network=tiny)
        only = await small.create(None, "cli")
        with pytest.raises(VMCapacityError, match="network slots are in use"):
            await small.create(None, "cli")
        assert set(find_marked_processes(small.tag)) == {only.id}
        await small.close()


async def test_warm_pool_hands_out_running_vms_and_refills(services: Services) -> None:
    backend = FakeBackend()
    eng = make_engine(services, backend, pool_size=2)
    try:
        assert await eng.fill_pool() == 2
        pooled = {v.id for v in await eng.list()}
        assert len(pooled) == 2 and all(v.user_id is None and v.expires_at is None for v in await eng.list())
        user = uuid.uuid4()
        async with services.factory() as s:  # a real user row: vms.user_id is a foreign key
            from polydev.store.models import User

            s.add(User(id=user, name="pool-user"))
            await s.commit()
        starts_before = len(backend.started)
        vm = await eng.create(user, "cli", ttl=timedelta(minutes=5))
        assert vm.id in pooled and vm.user_id == user and vm.expires_at is not None
        assert len(backend.started) == starts_before, "handed out without starting anything"
        await eng.pool.settled()  # the row follows the hand-out
        row = await eng.get(vm.id)
        assert row is not None and row.user_id == user and row.expires_at == vm.expires_at
        browser = await eng.create(user, "browser")
        assert browser.id not in pooled, "the pool only holds cli VMs"
        eng.start_pool()
        for _ in range(500):  # the background filler tops the pool up again
            if len(eng.pool.ready) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(eng.pool.ready) == 2 and vm.id not in eng.pool.ready
    finally:
        await eng.close()
    assert find_marked_processes(eng.tag) == {}, "close() destroys pooled VMs too"


async def test_pool_prepare_runs_before_a_vm_is_pooled_and_the_hand_out_says_so(services: Services) -> None:
    seen: list[tuple[uuid.UUID, bool, str]] = []

    async def prepare(vm: VM, client: AgentClient) -> None:
        seen.append((vm.id, vm.id in eng.pool.ready, client.base_url))

    eng = make_engine(services, FakeBackend(), pool_size=1, pool_prepare=prepare)
    try:
        assert await eng.fill_pool() == 1
        [(prepared_id, was_pooled, url)] = seen
        assert not was_pooled, "prepared before it is counted as ready"
        assert eng.pool.ready == (prepared_id,) and url == "http://127.0.0.1:9", "given a client of that VM's agent"
        vm = await eng.create(None, "cli")
        assert vm.id == prepared_id and vm.prepared
        fresh = await eng.create(None, "cli")  # the pool is empty: a plain start, not prepared
        assert fresh.id != prepared_id and not fresh.prepared and len(seen) == 1
    finally:
        await eng.close()
    assert find_marked_processes(eng.tag) == {}


async def test_a_vm_whose_preparation_fails_is_destroyed_not_pooled(services: Services) -> None:
    fail = True

    async def prepare(vm: VM, client: AgentClient) -> None:
        if fail:
            raise RuntimeError("the guest said no")

    eng = make_engine(services, FakeBackend(), pool_size=1, pool_prepare=prepare)
    try:
        with pytest.raises(VMCreateError, match="pool preparation failed: the guest said no") as info:
            await eng.fill_pool()
        assert eng.pool.ready == () and await eng.list() == []
        assert find_marked_processes(eng.tag) == {} and await eng.leases.held() == {}
        assert not eng.workdir(info.value.vm_id).exists()
        row = await eng.get(info.value.vm_id)
        assert row is not None and row.status == "failed" and "the guest said no" in (row.error or "")
        fail = False
        assert await eng.fill_pool() == 1, "the next fill succeeds"
    finally:
        await eng.close()
    assert find_marked_processes(eng.tag) == {}


async def test_close_while_the_pool_prepares_a_vm_leaves_nothing(services: Services) -> None:
    preparing = asyncio.Event()

    async def prepare(vm: VM, client: AgentClient) -> None:
        preparing.set()
        await asyncio.Event().wait()  # never finishes on its own

    eng = make_engine(services, FakeBackend(), pool_size=1, pool_prepare=prepare)
    eng.start_pool()
    await asyncio.wait_for(preparing.wait(), 30)
    await eng.close()
    assert find_marked_processes(eng.tag) == {}
    assert await eng.list() == [] and eng.pool.ready == ()
    assert not any(eng.vms_dir.iterdir())


async def test_a_start_cancelled_midway_leaves_nothing_and_says_so_in_words(engine: VMEngine) -> None:
    backend = engine.backend
    assert isinstance(backend, FakeBackend)
    backend.block = asyncio.Event()  # the hypervisor is up, its agent not yet ready
    task = asyncio.create_task(engine.create(None, "cli"))
    for _ in range(3000):
        if backend.started:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [spec] = backend.started
    row = await engine.vms.get(spec.vm_id)
    assert row is not None and row.status == "failed"
    assert row.error_message == "cancelled before it started"  # was "CancelledError (console log: …)"
    assert find_marked_processes(engine.tag) == {} and not spec.workdir.exists()
    assert not (engine.logs_dir / f"{spec.vm_id}.console.log").exists()
