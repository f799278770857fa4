"""VM rows and delayed-cleanup tasks: the engine's durable state."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import hosted_by, session_scope
from polydev.store.models import VmCleanupTask, VmRecord, utcnow

LIVE = ("creating", "running")


class VmRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], server_id: uuid.UUID | None = None) -> None:
        self._factory = factory
        self.server_id = server_id  # stamped on the VMs this process creates (and so hosts)

    async def create(self, **fields: Any) -> VmRecord:
        async with session_scope(self._factory) as s:
            vm = VmRecord(status="creating", server_id=self.server_id, **fields)
            s.add(vm)
            await s.flush()
            return vm

    async def update(self, vm_id: uuid.UUID, **fields: Any) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(VmRecord).where(VmRecord.vm_id == vm_id).values(**fields))

    async def update_returning(self, vm_id: uuid.UUID, **fields: Any) -> VmRecord | None:
        """Update a row and return it as it now is, in one statement (a warm-pool hand-out waits on it)."""
        async with session_scope(self._factory) as s:
            return (await s.scalars(update(VmRecord).where(VmRecord.vm_id == vm_id).values(**fields)
                                    .returning(VmRecord))).first()

    async def mark_failed(self, vm_id: uuid.UUID, error: str) -> None:
        await self.update(vm_id, status="failed", error_message=error, destroyed_at=utcnow())

    async def mark_destroyed(self, vm_id: uuid.UUID) -> None:
        """Destroyed, unless it already ended as failed (keep that reason)."""
        async with session_scope(self._factory) as s:
            await s.execute(update(VmRecord).where(VmRecord.vm_id == vm_id, VmRecord.status != "failed")
                            .values(status="destroyed", destroyed_at=utcnow()))

    async def get(self, vm_id: uuid.UUID) -> VmRecord | None:
        async with self._factory() as s:
            return await s.get(VmRecord, vm_id)

    async def list(self, *, live_only: bool = True, user_id: uuid.UUID | None = None,
                   servers: Collection[uuid.UUID | None] | None = None,
                   statuses: Collection[str] | None = None) -> list[VmRecord]:
        """VMs (live ones by default, or those in `statuses`); given `servers`, only those hosted by one of
        them (None: rows that name no server)."""
        q = select(VmRecord).order_by(VmRecord.created_at)
        if statuses is not None:
            q = q.where(VmRecord.status.in_(tuple(statuses)))
        elif live_only:
            q = q.where(VmRecord.status.in_(LIVE))
        if user_id is not None:
            q = q.where(VmRecord.user_id == user_id)
        if servers is not None:
            q = q.where(hosted_by(VmRecord.server_id, servers))
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def count_by_status(self, statuses: tuple[str, ...] = LIVE) -> dict[str, int]:
        async with self._factory() as s:
            rows = await s.execute(select(VmRecord.status, func.count()).where(VmRecord.status.in_(statuses))
                                   .group_by(VmRecord.status))
            return {status: int(n) for status, n in rows}

    async def expired(self, now: datetime | None = None) -> list[VmRecord]:
        """Live VMs past their expiry, of this server (when the repository has one: it reaps only its own)."""
        q = select(VmRecord).where(VmRecord.status.in_(LIVE), VmRecord.expires_at.is_not(None),
                                   VmRecord.expires_at <= (now or utcnow()))
        if self.server_id is not None:
            q = q.where(VmRecord.server_id == self.server_id)
        async with self._factory() as s:
            return list(await s.scalars(q))


class CleanupTaskRepo:
    """`vm_cleanup_tasks`: destroy-at-a-time requests that survive restarts."""

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def schedule(self, vm_id: uuid.UUID, at: datetime, session_id: uuid.UUID | None = None) -> uuid.UUID:
        async with session_scope(self._factory) as s:
            task = VmCleanupTask(vm_id=vm_id, cleanup_at=at, session_id=session_id)
            s.add(task)
            await s.flush()
            return task.id

    async def claim_due(self, now: datetime | None = None, limit: int = 20,
                        server_id: uuid.UUID | None = None) -> list[VmCleanupTask]:
        """Move due tasks from pending to processing; each task is claimed by exactly one caller. Given
        `server_id`, only tasks of the VMs that server hosts (a VM is torn down on its own machine)."""
        q = select(VmCleanupTask.id).where(VmCleanupTask.status == "pending",
                                           VmCleanupTask.cleanup_at <= (now or utcnow()))
        if server_id is not None:
            q = q.where(VmCleanupTask.vm_id.in_(select(VmRecord.vm_id).where(VmRecord.server_id == server_id)))
        async with self._factory() as s:
            ids = list(await s.scalars(q.order_by(VmCleanupTask.cleanup_at).limit(limit)))
        claimed: list[VmCleanupTask] = []
        for task_id in ids:
            async with session_scope(self._factory) as s:
                result = await s.execute(update(VmCleanupTask).where(
                    VmCleanupTask.id == task_id, VmCleanupTask.status == "pending").values(status="processing"))
                if result.rowcount == 1:
                    claimed.append(await s.get_one(VmCleanupTask, task_id))
        return claimed

    async def finish(self, task_id: uuid.UUID, error: str | None = None) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(VmCleanupTask).where(VmCleanupTask.id == task_id).values(
                status="failed" if error else "completed", error_message=error, completed_at=utcnow()))

    async def requeue_interrupted(self, keep: Collection[uuid.UUID] = ()) -> int:
        """At start-up: tasks a crashed process had claimed go back to pending, except those of the VMs of
        the live servers in `keep` (which may be working on them)."""
        q = update(VmCleanupTask).where(VmCleanupTask.status == "processing")
        if keep:
            q = q.where(VmCleanupTask.vm_id.not_in(select(VmRecord.vm_id).where(VmRecord.server_id.in_(keep))))
        async with session_scope(self._factory) as s:
            result = await s.execute(q.values(status="pending"))
            return result.rowcount

    async def pending_for(self, vm_id: uuid.UUID) -> list[VmCleanupTask]:
        async with self._factory() as s:
            return list(await s.scalars(select(VmCleanupTask).where(
                VmCleanupTask.vm_id == vm_id, VmCleanupTask.status == "pending")))
