"""Network slot leases: which VM holds which slot of the address pool."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import NetworkLease


class PoolExhausted(Exception):
    pass


class LeaseRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def acquire(self, vm_id: uuid.UUID, capacity: int, host_ip_of: Callable[[int], str]) -> int:
        """Lease the lowest free slot to `vm_id`. Safe against concurrent callers in any process."""
        for _ in range(capacity + 1):
            held = set((await self.held()).keys())
            free = next((i for i in range(capacity) if i not in held), None)
            if free is None:
                raise PoolExhausted(f"all {capacity} network slots are in use")
            try:
                async with session_scope(self._factory) as s:
                    s.add(NetworkLease(slot_index=free, vm_id=vm_id, host_ip=host_ip_of(free)))
                return free
            except IntegrityError:
                continue  # someone else took it between our read and our insert: look again
        raise PoolExhausted("could not lease a network slot under contention")

    async def held(self) -> dict[int, uuid.UUID]:
        async with self._factory() as s:
            return {row.slot_index: row.vm_id for row in await s.scalars(select(NetworkLease))}

    async def release(self, vm_id: uuid.UUID) -> int | None:
        """Give back the VM's slot; returns its index (None when it held none)."""
        async with session_scope(self._factory) as s:
            index = await s.scalar(select(NetworkLease.slot_index).where(NetworkLease.vm_id == vm_id))
            await s.execute(delete(NetworkLease).where(NetworkLease.vm_id == vm_id))
            return index
