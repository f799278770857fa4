from __future__ import annotations

import asyncio
import uuid

import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo, PoolExhausted


async def test_leases_are_unique_under_concurrency_and_reused_after_release(services: Services) -> None:
    repo = LeaseRepo(services.factory)
    vms = [uuid.uuid4() for _ in range(8)]
    got = await asyncio.gather(*(repo.acquire(vm, 8, lambda i: f"10.0.0.{2 * i}") for vm in vms))
    assert sorted(got) == list(range(8))
    with pytest.raises(PoolExhausted):
        await repo.acquire(uuid.uuid4(), 8, str)
    assert await repo.release(vms[3]) == got[3]
    assert await repo.release(vms[3]) is None
    newcomer = uuid.uuid4()
    assert await repo.acquire(newcomer, 8, str) == got[3]
    held = await repo.held()
    assert held[got[3]] == newcomer and len(held) == 8


async def test_leases_survive_a_restart(services: Services) -> None:
    vm = uuid.uuid4()
    index = await LeaseRepo(services.factory).acquire(vm, 4, str)
    fresh = LeaseRepo(services.factory)  # a new process would see the same rows
    assert (await fresh.held()) == {index: vm}
    assert await fresh.acquire(uuid.uuid4(), 4, str) != index
