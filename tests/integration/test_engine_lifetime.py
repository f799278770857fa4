"""The engine's side of a VM's lifetime, with a stand-in hypervisor: the deadline file its supervisor reads
follows the VM's expiry (created, pooled, handed out, assigned), and close() lets no creation under way start a
VM after it (polydev.vm.lifetime; the supervisor itself is tests/unit/test_vm_supervisor.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.models import User
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import lifetime
from polydev.vm.engine import VMCreateError, VMEngine, find_marked_processes
from tests.support.engine_fakes import FakeBackend


def make_engine(services: Services, backend: FakeBackend, **kw: object) -> VMEngine:
    return VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                    leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir,
                    **kw)  # type: ignore[arg-type]


def deadline_of(engine: VMEngine, vm_id: uuid.UUID) -> datetime | None:
    text = lifetime.deadline_file(engine.workdir(vm_id)).read_text().strip()
    return datetime.fromtimestamp(float(text), timezone.utc) if text else None


def near(when: datetime | None, expected: datetime | None) -> bool:
    return when is not None and expected is not None and abs((when - expected).total_seconds()) < 0.01


async def test_the_deadline_file_follows_the_vms_expiry(services: Services) -> None:
    backend = FakeBackend()
    eng = make_engine(services, backend, pool_size=1)
    try:
        vm = await eng.create(None, "cli", ttl=timedelta(minutes=5))
        assert near(deadline_of(eng, vm.id), vm.expires_at)
        assert backend.started[-1].deadline == lifetime.deadline_file(eng.workdir(vm.id))  # the backend's to use

        assert await eng.fill_pool() == 1
        [pooled] = eng.pool.ready
        assert deadline_of(eng, pooled) is None  # no expiry until it is handed out
        user = uuid.uuid4()
        async with services.factory() as s, s.begin():
            s.add(User(id=user, name="pool-user"))
        handed = await eng.create(user, "cli", ttl=timedelta(minutes=7))
        assert handed.id == pooled and near(deadline_of(eng, pooled), handed.expires_at)

        assigned = await eng.assign(pooled, user, timedelta(hours=1))
        assert assigned.expires_at is not None and near(deadline_of(eng, pooled), assigned.expires_at)
        await eng.pool.settled()
    finally:
        await eng.close()
    assert find_marked_processes(eng.tag) == {}


async def test_close_waits_for_a_creation_under_way_and_then_refuses_new_ones(services: Services) -> None:
    backend = FakeBackend()
    backend.block = asyncio.Event()  # the creation hangs in its backend's start, its hypervisor running
    eng = make_engine(services, backend)
    creating = asyncio.create_task(eng.create(None, "cli"))
    while not backend.started:
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(eng.close())
    await asyncio.sleep(0.1)  # close() gets as far as waiting for the creation
    backend.block.set()
    await closing
    vm = await creating
    # It came up after close() began, and close() destroyed it: nothing runs after the engine is closed.
    assert find_marked_processes(eng.tag) == {}
    row = await eng.get(vm.id)
    assert row is not None and row.status == "destroyed"
    with pytest.raises(VMCreateError, match="shutting down"):
        await eng.create(None, "cli")
