"""Egress identities (how each user's VMs reach the outside) and the gateway's accounting.

An upstream proxy's URL carries credentials, so it is sealed by the vault like a provider credential:
it is stored in `credentials` under the pseudo-provider `egress_proxy` (bound to its user, re-sealed by key
rotation with everything else, never listed among the user's provider credentials).
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.config.egress import AddressPool
from polydev.store.credentials import EGRESS_PROXY, CredentialRepo
from polydev.store.db import session_scope
from polydev.store.models import EGRESS_MODES, EgressIdentity, EgressUsage, utcnow


class PoolExhausted(Exception):
    """Every address of EGRESS_ADDRESS_POOL (of the family asked for) belongs to another user."""


@dataclass(frozen=True)
class Egress:
    """A user's egress identity as the gateway and the API see it (the proxy URL only as whether there is one)."""

    user_id: uuid.UUID
    mode: str
    address: str | None
    has_proxy: bool
    limits: dict[str, int]


@dataclass
class Delta:
    """Accounting for one (user, destination host): what the gateway counted since its last flush
    (polydev.egress.usage), or, read back, all days added up."""

    user_id: uuid.UUID | None
    host: str
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    refusals: int = 0
    last_refusal: str | None = None
    first_seen: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    last_seen: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


class EgressRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], credentials: CredentialRepo) -> None:
        self._factory = factory
        self._credentials = credentials

    async def get(self, user_id: uuid.UUID) -> Egress:
        """The user's identity; `direct` with no overrides when none was set."""
        async with self._factory() as s:
            row = await s.get(EgressIdentity, user_id)
        has_proxy = row is not None and row.mode == "proxy"
        if row is None:
            return Egress(user_id, "direct", None, False, {})
        return Egress(user_id, row.mode, row.address, has_proxy, json.loads(row.limits_json or "{}"))

    async def proxy_url(self, user_id: uuid.UUID) -> str | None:
        secret = await self._credentials.reveal(user_id, EGRESS_PROXY)
        return secret.decode() if secret is not None else None

    async def set(self, user_id: uuid.UUID, mode: str, *, pool: AddressPool, proxy_url: str | None = None,
                  family: int | None = None, limits: dict[str, int] | None = None) -> Egress:
        """Set the user's mode (and limits, when given). `address` assigns one from `pool` the first time
        (PoolExhausted when none is free) and keeps it; `proxy` seals `proxy_url` (required unless one is
        stored already)."""
        if mode not in EGRESS_MODES:
            raise ValueError(f"unknown egress mode {mode!r}")
        if mode == "proxy":
            if proxy_url is not None:
                await self._credentials.put(user_id, EGRESS_PROXY, "proxy", proxy_url.encode())
            elif await self._credentials.reveal(user_id, EGRESS_PROXY) is None:
                raise ValueError("proxy mode needs proxy_url")
        for _ in range(8):  # a concurrent assignment of the same free address: the unique key says so, retry
            try:
                async with session_scope(self._factory) as s:
                    row = await s.get(EgressIdentity, user_id)
                    if row is None:
                        row = EgressIdentity(user_id=user_id)
                        s.add(row)
                    row.mode = mode
                    if limits is not None:
                        row.limits_json = json.dumps(limits) if limits else None
                    if mode == "address" and (row.address is None or not _in_pool(row.address, pool, family)):
                        row.address = await self._free_address(s, pool, family)
                    row.updated_at = utcnow()
                    await s.flush()
                break
            except IntegrityError:
                continue
        return await self.get(user_id)

    async def _free_address(self, s: AsyncSession, pool: AddressPool, family: int | None) -> str:
        used = set(await s.scalars(select(EgressIdentity.address).where(EgressIdentity.address.is_not(None))))
        for ip in pool.candidates(family):
            if str(ip) not in used:
                return str(ip)
        which = f"IPv{family} " if family else ""
        raise PoolExhausted(f"no free {which}address left in EGRESS_ADDRESS_POOL ({pool.describe() or 'empty'})")

    async def record(self, deltas: Iterable[Delta]) -> None:
        """Add a batch of the gateway's counts to the day's rows."""
        day = today()
        async with session_scope(self._factory) as s:
            for d in deltas:
                row = await s.scalar(select(EgressUsage).where(
                    EgressUsage.user_id.is_(None) if d.user_id is None else EgressUsage.user_id == d.user_id,
                    EgressUsage.host == d.host, EgressUsage.day == day))
                if row is None:
                    row = EgressUsage(user_id=d.user_id, host=d.host, day=day, connections=0, bytes_up=0,
                                      bytes_down=0, refusals=0, first_seen=d.first_seen)
                    s.add(row)
                row.connections += d.connections
                row.bytes_up += d.bytes_up
                row.bytes_down += d.bytes_down
                row.refusals += d.refusals
                row.last_refusal = d.last_refusal or row.last_refusal
                row.last_seen = d.last_seen

    async def usage(self, user_id: uuid.UUID | None = None, *, all_users: bool = False) -> list[EgressUsage]:
        """Per (user, host): the days added up, most recent first. One user's, or everyone's for admins."""
        q = select(EgressUsage.user_id, EgressUsage.host, func.sum(EgressUsage.connections),
                   func.sum(EgressUsage.bytes_up), func.sum(EgressUsage.bytes_down), func.sum(EgressUsage.refusals),
                   func.max(EgressUsage.last_refusal), func.min(EgressUsage.first_seen),
                   func.max(EgressUsage.last_seen)).group_by(EgressUsage.user_id, EgressUsage.host)
        if not all_users:
            q = q.where(EgressUsage.user_id == user_id)
        async with self._factory() as s:
            rows = (await s.execute(q)).all()
        out = [EgressUsage(user_id=r[0], host=r[1], day="", connections=int(r[2]), bytes_up=int(r[3]),
                           bytes_down=int(r[4]), refusals=int(r[5]), last_refusal=r[6], first_seen=r[7],
                           last_seen=r[8]) for r in rows]
        return sorted(out, key=lambda u: u.last_seen, reverse=True)

    async def bytes_today(self) -> dict[uuid.UUID | None, int]:
        """Bytes each user moved today, for the gateway's daily limit after a restart."""
        async with self._factory() as s:
            rows = (await s.execute(select(EgressUsage.user_id, func.sum(EgressUsage.bytes_up + EgressUsage.bytes_down))
                                    .where(EgressUsage.day == today()).group_by(EgressUsage.user_id))).all()
        return {r[0]: int(r[1] or 0) for r in rows}


def _in_pool(address: str, pool: AddressPool, family: int | None) -> bool:
    ip = ipaddress.ip_address(address)
    return ip in pool and family in (None, ip.version)
