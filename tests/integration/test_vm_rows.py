from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from polydev.services import Services
from polydev.store.models import utcnow
from polydev.store.vms import CleanupTaskRepo, VmRepo


async def test_vm_row_lifecycle_and_expiry(services: Services) -> None:
    repo = VmRepo(services.factory)
    soon = await repo.create(purpose="cli", backend="qemu", expires_at=utcnow() - timedelta(seconds=1))
    later = await repo.create(purpose="browser", backend="qemu", expires_at=utcnow() + timedelta(hours=1))
    assert {v.vm_id for v in await repo.list()} == {soon.vm_id, later.vm_id}
    assert [v.vm_id for v in await repo.expired()] == [soon.vm_id]
    await repo.update(later.vm_id, status="running", backend_pid=1234, agent_port=40000)
    await repo.mark_failed(soon.vm_id, "agent not ready after 60 s")
    await repo.mark_destroyed(soon.vm_id)  # keeps the failure and its reason
    failed = await repo.get(soon.vm_id)
    assert failed is not None and failed.status == "failed" and failed.error_message == "agent not ready after 60 s"
    assert [v.vm_id for v in await repo.list()] == [later.vm_id]
    await repo.mark_destroyed(later.vm_id)
    assert await repo.list() == [] and len(await repo.list(live_only=False)) == 2


async def test_cleanup_tasks_are_claimed_once_and_survive_a_crash(services: Services) -> None:
    repo = CleanupTaskRepo(services.factory)
    vm = uuid.uuid4()
    due = await repo.schedule(vm, utcnow() - timedelta(seconds=1))
    await repo.schedule(uuid.uuid4(), utcnow() + timedelta(hours=1))
    claims = await asyncio.gather(repo.claim_due(), repo.claim_due())
    assert sorted(len(c) for c in claims) == [0, 1]
    # The claiming process dies before finishing; a restart puts the task back.
    assert await repo.requeue_interrupted() == 1
    again = await repo.claim_due()
    assert [t.id for t in again] == [due]
    await repo.finish(due)
    assert await repo.claim_due() == [] and await repo.pending_for(vm) == []


async def test_count_by_status_counts_live_vms(services: Services) -> None:
    repo = VmRepo(services.factory)
    a = await repo.create(purpose="cli", backend="qemu")
    b = await repo.create(purpose="cli", backend="qemu")
    await repo.create(purpose="cli", backend="qemu")
    await repo.update(a.vm_id, status="running")
    await repo.mark_destroyed(b.vm_id)
    assert await repo.count_by_status() == {"creating": 1, "running": 1}
