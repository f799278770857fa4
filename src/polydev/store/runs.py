"""Runs and their events: the durable record of every prompt a user sent and everything it streamed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import add_unique, hosted_by, session_scope
from polydev.store.models import Run, RunEvent, utcnow

RUN_LIVE = ("queued", "running")
RUN_TERMINAL = ("succeeded", "failed", "cancelled", "timeout")
# The largest event number: run_events.seq is a 32-bit INTEGER (on PostgreSQL), and a reader's "after" is
# compared with it, so a larger one cannot even be asked for.
MAX_EVENT_SEQ = 2**31 - 1


class CredentialBusy(Exception):
    """Another run holds this user's credential for the provider (or, for a turn, its workspace)."""


class WorkspaceTurnBusy(Exception):
    """Another turn is live on this workspace."""


def live_key(user_id: uuid.UUID, provider: str) -> str:
    return f"{user_id}:{provider}"


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    data: dict[str, Any]


class RunRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], server_id: uuid.UUID | None = None) -> None:
        self._factory = factory
        self.server_id = server_id  # stamped on the runs this process creates (and so drives)

    async def create(self, user_id: uuid.UUID, provider: str, prompt: str, *, timeout_seconds: int,
                     credential_kind: str, workspace_id: uuid.UUID | None = None,
                     conversation_id: uuid.UUID | None = None) -> Run:
        """A queued run holding the credential (and, for a turn, its workspace); CredentialBusy if a live run
        already holds the credential, WorkspaceTurnBusy if one holds the workspace."""
        row = Run(user_id=user_id, provider=provider, prompt=prompt, status="queued",
                  live_key=live_key(user_id, provider), timeout_seconds=timeout_seconds,
                  credential_kind=credential_kind, server_id=self.server_id, workspace_id=workspace_id,
                  conversation_id=conversation_id, turn_key=f"ws:{workspace_id}" if workspace_id else None)
        if workspace_id is not None and await self.live_turn(workspace_id) is not None:
            raise WorkspaceTurnBusy(str(workspace_id))
        try:
            return await add_unique(self._factory, row, CredentialBusy(provider))
        except CredentialBusy:
            # The database refused it: the credential's live_key, or (two turns racing past the read above)
            # the workspace's turn_key. Say which.
            if workspace_id is not None and await self.live_turn(workspace_id) is not None:
                raise WorkspaceTurnBusy(str(workspace_id)) from None
            raise

    async def live_turn(self, workspace_id: uuid.UUID) -> Run | None:
        async with self._factory() as s:
            return await s.scalar(select(Run).where(Run.turn_key == f"ws:{workspace_id}"))

    async def set_changes(self, run_id: uuid.UUID, changes: list[dict[str, Any]], patch: str) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(Run).where(Run.id == run_id)
                            .values(changes_json=json.dumps(changes), patch=patch))

    async def turns(self, conversation_id: uuid.UUID) -> list[Run]:
        async with self._factory() as s:
            return list(await s.scalars(select(Run).where(Run.conversation_id == conversation_id)
                                        .order_by(Run.created_at, Run.id)))

    async def get(self, run_id: uuid.UUID) -> Run | None:
        async with self._factory() as s:
            return await s.get(Run, run_id)

    async def get_owned(self, user_id: uuid.UUID, run_id: uuid.UUID) -> Run | None:
        """The run if it belongs to `user_id`; another user's run is indistinguishable from none."""
        async with self._factory() as s:
            return await s.scalar(select(Run).where(Run.id == run_id, Run.user_id == user_id))

    async def list_for(self, user_id: uuid.UUID, limit: int = 50) -> list[Run]:
        async with self._factory() as s:
            return list(await s.scalars(select(Run).where(Run.user_id == user_id)
                                        .order_by(Run.created_at.desc()).limit(limit)))

    async def live(self, servers: Collection[uuid.UUID | None] | None = None) -> list[Run]:
        """Runs not ended; given `servers`, only those driven by one of them (None: rows that name none)."""
        q = select(Run).where(Run.status.in_(RUN_LIVE))
        if servers is not None:
            q = q.where(hosted_by(Run.server_id, servers))
        async with self._factory() as s:
            return list(await s.scalars(q))

    async def mark_running(self, run_id: uuid.UUID, vm_id: uuid.UUID) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(Run).where(Run.id == run_id, Run.status.in_(RUN_LIVE))
                            .values(status="running", vm_id=vm_id, started_at=utcnow()))

    async def finish(self, run_id: uuid.UUID, status: str, *, error: str | None = None,
                     exit_code: int | None = None, usage: dict[str, Any] | None = None,
                     result: str | None = None, refreshed: bool = False) -> bool:
        """End a live run and release its credential; False if it had already ended."""
        if status not in RUN_TERMINAL:
            raise ValueError(f"{status!r} is not a terminal run status")
        async with session_scope(self._factory) as s:
            res = await s.execute(
                update(Run).where(Run.id == run_id, Run.status.in_(RUN_LIVE))
                .values(status=status, error_message=error, exit_code=exit_code, live_key=None, turn_key=None,
                        usage_json=json.dumps(usage) if usage is not None else None, result_text=result,
                        credential_refreshed=refreshed, finished_at=utcnow()))
            return res.rowcount == 1

    async def append_events(self, run_id: uuid.UUID, events: list[StoredEvent]) -> None:
        if not events:
            return
        async with session_scope(self._factory) as s:
            s.add_all(RunEvent(run_id=run_id, seq=e.seq, type=str(e.data.get("type", "")),
                               data=json.dumps(e.data)) for e in events)

    async def events_after(self, run_id: uuid.UUID, after: int = -1, limit: int = 500) -> list[StoredEvent]:
        async with self._factory() as s:
            rows = await s.scalars(select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.seq > after)
                                   .order_by(RunEvent.seq).limit(limit))
            return [StoredEvent(r.seq, json.loads(r.data)) for r in rows]

    async def last_seq(self, run_id: uuid.UUID) -> int:
        """The number of the run's last stored event, -1 when it has none."""
        async with self._factory() as s:
            last = await s.scalar(select(func.max(RunEvent.seq)).where(RunEvent.run_id == run_id))
            return -1 if last is None else int(last)

    async def count_by_status(self) -> dict[str, int]:
        async with self._factory() as s:
            rows = await s.execute(select(Run.status, func.count()).group_by(Run.status))
            return {status: int(n) for status, n in rows}
