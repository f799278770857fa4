"""Durable records of login sessions (the `auth_sessions` table); the live state is in the SessionStore."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import hosted_by, session_scope
from polydev.store.models import AUTH_SESSION_TERMINAL, AuthSession, utcnow


class AuthSessionRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], server_id: uuid.UUID | None = None) -> None:
        self._factory = factory
        self.server_id = server_id  # stamped on the sessions this process creates (and so drives)

    async def create(self, user_id: uuid.UUID, provider: str, status: str = "initializing",
                     method: str | None = None) -> AuthSession:
        async with session_scope(self._factory) as s:
            row = AuthSession(user_id=user_id, provider=provider, status=status, method=method,
                              server_id=self.server_id)
            s.add(row)
            await s.flush()
            return row

    async def get_owned(self, user_id: uuid.UUID, session_id: uuid.UUID) -> AuthSession | None:
        """The session if it belongs to `user_id`; another user's session is indistinguishable from none."""
        async with self._factory() as s:
            return await s.scalar(select(AuthSession).where(
                AuthSession.session_id == session_id, AuthSession.user_id == user_id))

    async def update(self, session_id: uuid.UUID, **fields: Any) -> bool:
        """Change a session that has not ended (status, auth_url, browser_vm_id, …); False if it had."""
        if fields.get("status") in AUTH_SESSION_TERMINAL:
            raise ValueError("use finish() for terminal statuses")
        async with session_scope(self._factory) as s:
            result = await s.execute(
                update(AuthSession)
                .where(AuthSession.session_id == session_id, AuthSession.status.not_in(AUTH_SESSION_TERMINAL))
                .values(**fields, last_heartbeat=utcnow()))
            return result.rowcount == 1

    async def get(self, session_id: uuid.UUID) -> AuthSession | None:
        async with self._factory() as s:
            return await s.get(AuthSession, session_id)

    async def live(self, servers: Collection[uuid.UUID | None] | None = None) -> list[AuthSession]:
        """Sessions not ended; given `servers`, only those driven by one of them (None: rows that name none)."""
        q = select(AuthSession).where(AuthSession.status.not_in(AUTH_SESSION_TERMINAL))
        if servers is not None:
            q = q.where(hosted_by(AuthSession.server_id, servers))
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def finish(self, session_id: uuid.UUID, status: str, error: str | None = None) -> bool:
        """Move a non-terminal session to a terminal status; False if it had already ended."""
        if status not in AUTH_SESSION_TERMINAL:
            raise ValueError(f"{status!r} is not a terminal status")
        async with session_scope(self._factory) as s:
            result = await s.execute(
                update(AuthSession)
                .where(AuthSession.session_id == session_id, AuthSession.status.not_in(AUTH_SESSION_TERMINAL))
                .values(status=status, error_message=error, completed_at=utcnow())
            )
            return result.rowcount == 1

    async def count_by_status(self) -> dict[str, int]:
        async with self._factory() as s:
            rows = await s.execute(select(AuthSession.status, func.count()).group_by(AuthSession.status))
            return {status: int(n) for status, n in rows}
