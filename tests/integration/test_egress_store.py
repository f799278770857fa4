"""Egress identities and accounting in the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from polydev.config.egress import AddressPool
from polydev.services import Services
from polydev.store.egress import Delta, EgressRepo, PoolExhausted

POOL = AddressPool.parse("203.0.113.10-203.0.113.11,2001:db8:7::/64")


async def users(services: Services, n: int) -> list[uuid.UUID]:
    return [(await services.users.create(f"u{uuid.uuid4().hex[:8]}")).id for _ in range(n)]


async def test_address_mode_gives_each_user_their_own_address_and_keeps_it(services: Services) -> None:
    repo = EgressRepo(services.factory, services.credentials)
    a, b, c = await users(services, 3)
    ea = await repo.set(a, "address", pool=POOL)
    eb = await repo.set(b, "address", pool=POOL)
    assert (ea.address, eb.address) == ("203.0.113.10", "203.0.113.11")
    with pytest.raises(PoolExhausted):
        await repo.set(c, "address", pool=POOL, family=4)
    assert (await repo.set(c, "address", pool=POOL, family=6)).address == "2001:db8:7::1"
    await repo.set(a, "direct", pool=POOL)
    assert (await repo.set(a, "address", pool=POOL)).address == "203.0.113.10"  # sticky
    assert (await repo.get(a)).mode == "address"


async def test_proxy_url_is_sealed_and_not_a_provider_credential(services: Services) -> None:
    repo = EgressRepo(services.factory, services.credentials)
    (a,) = await users(services, 1)
    with pytest.raises(ValueError):
        await repo.set(a, "proxy", pool=POOL)
    e = await repo.set(a, "proxy", pool=POOL, proxy_url="http://u:secret@proxy.test:3128")
    assert e.has_proxy and e.mode == "proxy"
    assert await repo.proxy_url(a) == "http://u:secret@proxy.test:3128"
    assert await services.credentials.list(a) == []
    async with services.factory() as s:
        from sqlalchemy import select

        from polydev.store.models import Credential
        stored = list(await s.scalars(select(Credential.encrypted_credentials)))
    assert stored and all("secret" not in c for c in stored)


async def test_usage_adds_up_per_user_and_host(services: Services) -> None:
    repo = EgressRepo(services.factory, services.credentials)
    a, b = await users(services, 2)
    now = datetime.now(timezone.utc)
    await repo.record([Delta(a, "api.anthropic.com", 2, 100, 1000, 0, None, now, now),
                       Delta(b, "api.openai.com", 1, 5, 6, 1, "limit: 1 concurrent connections reached", now, now)])
    await repo.record([Delta(a, "api.anthropic.com", 1, 1, 2, 0, None, now, now)])
    mine = await repo.usage(a)
    assert [(u.host, u.connections, u.bytes_up, u.bytes_down) for u in mine] == [("api.anthropic.com", 3, 101, 1002)]
    everyone = await repo.usage(all_users=True)
    assert {u.user_id for u in everyone} == {a, b}
    assert (await repo.bytes_today())[a] == 1103
