"""Sandbox rows (polydev.core.sandboxes): who owns which E2B-style sandbox, on which VM, until when."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import Sandbox, utcnow

LIVE_STATES = ("running", "paused")


class SandboxRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def add(self, row: Sandbox) -> None:
        async with session_scope(self._factory) as s:
            s.add(row)

    async def get(self, sandbox_id: str) -> Sandbox | None:
        async with self._factory() as s:
            return await s.get(Sandbox, sandbox_id)

    async def update(self, sandbox_id: str, **fields: Any) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(Sandbox).where(Sandbox.id == sandbox_id).values(**fields))

    async def end(self, sandbox_id: str) -> bool:
        """Killed, once: False when it had already ended."""
        async with session_scope(self._factory) as s:
            done = await s.execute(update(Sandbox).where(Sandbox.id == sandbox_id, Sandbox.state.in_(LIVE_STATES))
                                   .values(state="killed", ended_at=utcnow(), vm_id=None))
            return bool(done.rowcount)  # type: ignore[attr-defined]

    async def live(self, *, user_id: uuid.UUID | None = None) -> list[Sandbox]:
        q = select(Sandbox).where(Sandbox.state.in_(LIVE_STATES)).order_by(Sandbox.started_at, Sandbox.id)
        if user_id is not None:
            q = q.where(Sandbox.user_id == user_id)
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def expired(self, now: datetime | None = None) -> list[Sandbox]:
        q = select(Sandbox).where(Sandbox.state.in_(LIVE_STATES), Sandbox.end_at <= (now or utcnow()))
        async with self._factory() as s:
            return list(await s.scalars(q))
