"""Workspace rows (polydev.core.workspaces): whose project, on which VM, in what state."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import Workspace, utcnow

LIVE_STATES = ("creating", "ready", "paused", "failed")  # all but deleted: a failed one stays until deleted


class WorkspaceRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def add(self, row: Workspace) -> None:
        async with session_scope(self._factory) as s:
            s.add(row)

    async def get(self, workspace_id: uuid.UUID) -> Workspace | None:
        async with self._factory() as s:
            row = await s.get(Workspace, workspace_id)
            return row if row is not None and row.state != "deleted" else None

    async def update(self, workspace_id: uuid.UUID, **fields: Any) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(Workspace).where(Workspace.id == workspace_id).values(**fields))

    async def delete(self, workspace_id: uuid.UUID) -> bool:
        """Marked deleted, once: False when it already was. The secrets it held (the git token, a sleeping
        VM's agent token) go with it; the row stays as the record that it was."""
        async with session_scope(self._factory) as s:
            done = await s.execute(update(Workspace).where(Workspace.id == workspace_id,
                                                           Workspace.state != "deleted")
                                   .values(state="deleted", deleted_at=utcnow(), vm_id=None, sealed_git_token=None,
                                           sealed_agent=None))
            return bool(done.rowcount)  # type: ignore[attr-defined]

    async def live(self, *, user_id: uuid.UUID | None = None, states: tuple[str, ...] = LIVE_STATES
                   ) -> list[Workspace]:
        q = select(Workspace).where(Workspace.state.in_(states)).order_by(Workspace.created_at, Workspace.id)
        if user_id is not None:
            q = q.where(Workspace.user_id == user_id)
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def usage(self, user_id: uuid.UUID) -> tuple[int, int]:
        """(workspaces, bytes) the user holds now."""
        q = select(func.count(), func.coalesce(func.sum(Workspace.size_bytes), 0)).where(
            Workspace.user_id == user_id, Workspace.state.in_(LIVE_STATES))
        async with self._factory() as s:
            count, total = (await s.execute(q)).one()
        return int(count), int(total)

    async def idle(self, before: datetime) -> list[Workspace]:
        """Ready workspaces not used since `before` (to be paused)."""
        q = select(Workspace).where(Workspace.state == "ready", Workspace.used_at < before)
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def paused_with_memory(self, user_id: uuid.UUID) -> int:
        """How many of the user's workspaces sleep with their memory saved (the per-user paused-VM limit)."""
        q = select(func.count()).where(Workspace.user_id == user_id, Workspace.state == "paused",
                                       Workspace.paused_memory.is_(True))
        async with self._factory() as s:
            return int((await s.execute(q)).scalar_one())
