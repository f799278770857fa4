"""What each user has in use against their quotas, and the overrides admins set per user.

Use is counted from the durable rows every server writes (live VMs with their size, logins and runs not yet
ended), so it reads the same on every replica and survives restarts.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import AUTH_SESSION_TERMINAL, AuthSession, Run, User, VmRecord
from polydev.store.runs import RUN_TERMINAL
from polydev.store.vms import LIVE


@dataclass(frozen=True)
class Usage:
    vms: int = 0
    logins: int = 0
    runs: int = 0
    vcpus: int = 0
    memory_mb: int = 0
    vm_ids: frozenset[uuid.UUID] = frozenset()  # the live VMs counted (admission matches its holds to them)


class QuotaRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def usage(self, user_id: uuid.UUID | None = None, server_id: uuid.UUID | None = None) -> Usage:
        """One user's use, or (None) the whole deployment's; given `server_id`, only the VMs that server hosts
        (its host's capacity is its own). With the ids of the live VMs counted."""
        live = [VmRecord.status.in_(LIVE)]
        if user_id is not None:
            live.append(VmRecord.user_id == user_id)
        if server_id is not None:
            live.append(VmRecord.server_id == server_id)
        vms = select(VmRecord.vm_id, VmRecord.vcpu_count, VmRecord.memory_mb).where(*live)
        logins = select(func.count()).select_from(AuthSession).where(
            AuthSession.status.not_in(AUTH_SESSION_TERMINAL))
        runs = select(func.count()).select_from(Run).where(Run.status.not_in(RUN_TERMINAL))
        if user_id is not None:
            logins = logins.where(AuthSession.user_id == user_id)
            runs = runs.where(Run.user_id == user_id)
        async with self._factory() as s:
            # One read of the rows, so the ids are exactly the VMs the sums count.
            rows = (await s.execute(vms)).all()
            return Usage(len(rows), int(await s.scalar(logins) or 0), int(await s.scalar(runs) or 0),
                         sum(int(r.vcpu_count or 0) for r in rows), sum(int(r.memory_mb or 0) for r in rows),
                         frozenset(r.vm_id for r in rows))

    async def overrides(self, user_id: uuid.UUID) -> dict[str, int] | None:
        """The user's own limits ({} when none), or None for a user that does not exist."""
        async with self._factory() as s:
            row = await s.get(User, user_id)
            if row is None:
                return None
            return json.loads(row.quotas_json) if row.quotas_json else {}

    async def set_overrides(self, user_id: uuid.UUID, limits: dict[str, int]) -> bool:
        """Replace the user's own limits ({} drops them); False for a user that does not exist."""
        async with session_scope(self._factory) as s:
            row = await s.get(User, user_id)
            if row is None:
                return False
            row.quotas_json = json.dumps(limits, sort_keys=True) if limits else None
            return True
