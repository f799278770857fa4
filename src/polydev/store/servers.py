"""The server registry (`servers`): who is up, where peers reach them, what they host and hold.

Rows are written by polydev.core.cluster: one per server start, a heartbeat every few seconds, `stopped_at`
on a clean stop. A server whose heartbeat is older than the bound, or that stopped, is gone; exactly one live
server claims it (`claim_gone`: a conditional UPDATE, so two sweeping servers never both end its work).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import AuthSession, Conversation, Sandbox, Server, VmRecord, Workspace, utcnow
from polydev.store.vms import LIVE


@dataclass(frozen=True)
class Load:
    """A live server and what its live VMs hold of its capacity."""

    server_id: uuid.UUID
    url: str
    vcpus: int
    memory_mb: int
    used_vcpus: int
    used_memory_mb: int

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.used_vcpus

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.used_memory_mb


def _clock(s: AsyncSession) -> Any:
    """Now, by the database's clock on PostgreSQL: servers on several hosts then judge heartbeats by one clock,
    whatever their own say. SQLite serves one host, whose clock it is."""
    return func.now() if s.get_bind().dialect.name == "postgresql" else utcnow()


def _dead(s: AsyncSession, stale_after: timedelta) -> ColumnElement[bool]:
    return or_(Server.stopped_at.is_not(None), Server.heartbeat_at < _clock(s) - stale_after)


def _alive(s: AsyncSession, stale_after: timedelta) -> tuple[ColumnElement[bool], ...]:
    return (Server.stopped_at.is_(None), Server.reaped_at.is_(None), Server.heartbeat_at >= _clock(s) - stale_after)


class ServerRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def register(self, server_id: uuid.UUID, *, url: str, instance: str, vcpus: int, memory_mb: int,
                       runs_vms: bool) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(insert(Server).values(id=server_id, url=url, instance=instance, vcpus=vcpus,
                                                  memory_mb=memory_mb, runs_vms=runs_vms, started_at=_clock(s),
                                                  heartbeat_at=_clock(s)))

    async def heartbeat(self, server_id: uuid.UUID) -> bool:
        """False when the row says this server is stopped or was reaped (a peer judged it dead)."""
        async with session_scope(self._factory) as s:
            result = await s.execute(update(Server).where(
                Server.id == server_id, Server.stopped_at.is_(None), Server.reaped_at.is_(None))
                .values(heartbeat_at=_clock(s)))
            return result.rowcount == 1

    async def rejoin(self, server_id: uuid.UUID) -> bool:
        """A server taken for dead that is not: alive again from now on (what was ended stays ended)."""
        async with session_scope(self._factory) as s:
            result = await s.execute(update(Server).where(Server.id == server_id, Server.stopped_at.is_(None))
                                     .values(heartbeat_at=_clock(s), reaped_at=None, reaped_by=None))
            return result.rowcount == 1

    async def stop(self, server_id: uuid.UUID) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(update(Server).where(Server.id == server_id, Server.stopped_at.is_(None))
                            .values(stopped_at=_clock(s)))

    async def get(self, server_id: uuid.UUID) -> Server | None:
        async with self._factory() as s:
            return await s.get(Server, server_id)

    async def gone(self, stale_after: timedelta, *, instance: str | None = None) -> list[Server]:
        """Servers not yet reaped that stopped or whose heartbeat is older than `stale_after`, plus (given
        `instance`) every unreaped earlier start on that data directory, whatever its heartbeat."""
        async with self._factory() as s:
            dead = _dead(s, stale_after)
            if instance is not None:
                dead = or_(dead, Server.instance == instance)
            return list(await s.scalars(select(Server).where(Server.reaped_at.is_(None), dead)
                                        .order_by(Server.started_at)))

    async def claim_gone(self, server_id: uuid.UUID, by: uuid.UUID, stale_after: timedelta, *,
                         instance: str | None = None) -> bool:
        """Take the job of ending what `server_id` hosted; True for exactly one caller, and only while it is
        still gone (not for one whose heartbeat came back since `gone` listed it)."""
        async with session_scope(self._factory) as s:
            dead = _dead(s, stale_after)
            if instance is not None:
                dead = or_(dead, Server.instance == instance)
            result = await s.execute(update(Server).where(Server.id == server_id, Server.reaped_at.is_(None), dead)
                                     .values(reaped_by=by, reaped_at=_clock(s)))
            return result.rowcount == 1

    async def alive(self, stale_after: timedelta) -> list[Server]:
        """Servers neither stopped nor reaped whose heartbeat is fresher than `stale_after`."""
        async with self._factory() as s:
            return list(await s.scalars(select(Server).where(*_alive(s, stale_after))))

    async def live_loads(self, stale_after: timedelta) -> list[Load]:
        """Servers with a fresh heartbeat that run VMs, each with the vCPUs and memory its live VMs hold."""
        used = (select(VmRecord.server_id, func.coalesce(func.sum(VmRecord.vcpu_count), 0).label("v"),
                       func.coalesce(func.sum(VmRecord.memory_mb), 0).label("m"))
                .where(VmRecord.status.in_(LIVE)).group_by(VmRecord.server_id).subquery())
        async with self._factory() as s:
            q = (select(Server, used.c.v, used.c.m).outerjoin(used, used.c.server_id == Server.id)
                 .where(*_alive(s, stale_after), Server.runs_vms.is_(True)).order_by(Server.started_at))
            return [Load(row.id, row.url, row.vcpus, row.memory_mb, int(v or 0), int(m or 0))
                    for row, v, m in (await s.execute(q)).all()]

    async def host_of_vm(self, vm_id: uuid.UUID) -> Server | None:
        """The server a VM's row names, if any."""
        return await self._host(select(VmRecord.server_id).where(VmRecord.vm_id == vm_id))

    async def host_of_login(self, session_id: uuid.UUID) -> Server | None:
        """The server driving a login session, if its row names one."""
        return await self._host(select(AuthSession.server_id).where(AuthSession.session_id == session_id))

    async def host_of_sandbox(self, sandbox_id: str) -> Server | None:
        """The server hosting an E2B sandbox's VM, if its rows name one."""
        return await self._host(select(VmRecord.server_id).join(Sandbox, Sandbox.vm_id == VmRecord.vm_id)
                                .where(Sandbox.id == sandbox_id))

    async def host_of_workspace(self, workspace_id: uuid.UUID) -> Server | None:
        """The server hosting a workspace's VM (running or paused there), if its rows name one."""
        return await self._host(select(VmRecord.server_id).join(Workspace, Workspace.vm_id == VmRecord.vm_id)
                                .where(Workspace.id == workspace_id))

    async def host_of_conversation(self, conversation_id: uuid.UUID) -> Server | None:
        """The server hosting the VM of a conversation's workspace, if its rows name one."""
        return await self._host(select(VmRecord.server_id).join(Workspace, Workspace.vm_id == VmRecord.vm_id)
                                .join(Conversation, Conversation.workspace_id == Workspace.id)
                                .where(Conversation.id == conversation_id))

    async def _host(self, query: object) -> Server | None:
        async with self._factory() as s:
            server_id = await s.scalar(query)  # type: ignore[call-overload]
            return None if server_id is None else await s.get(Server, server_id)
