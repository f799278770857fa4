"""One contract, two implementations: the in-process store and Redis (a real server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from polydev.store.sessions import MemorySessionStore, RedisSessionStore, SessionStore


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        s: SessionStore = MemorySessionStore(default_ttl=600)
    else:
        s = RedisSessionStore.from_url(request.getfixturevalue("redis_server"), default_ttl=600)
    yield s
    await s.close()


def sid() -> str:
    return str(uuid.uuid4())


async def test_create_then_get_returns_what_was_stored(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {"status": "initializing", "provider": "codex", "n": 1})
    assert await store.get(key) == {"status": "initializing", "provider": "codex", "n": 1}


async def test_unknown_session_reads_as_none(store: SessionStore) -> None:
    assert await store.get(sid()) is None
    assert await store.ttl(sid()) is None


async def test_returned_data_is_a_copy(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {"status": "ready"})
    got = await store.get(key)
    assert got is not None
    got["status"] = "mutated"
    assert (await store.get(key)) == {"status": "ready"}


async def test_update_merges_fields(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {"status": "initializing", "provider": "claude_code"})
    merged = await store.update(key, {"status": "awaiting_user_auth", "auth_url": "https://example.invalid/x"})
    assert merged == {"status": "awaiting_user_auth", "provider": "claude_code", "auth_url": "https://example.invalid/x"}
    assert await store.get(key) == merged


async def test_update_of_missing_session_does_not_create_it(store: SessionStore) -> None:
    key = sid()
    assert await store.update(key, {"status": "ready"}) is None
    assert await store.get(key) is None


async def test_ttl_is_set_from_default_and_from_argument(store: SessionStore) -> None:
    a, b = sid(), sid()
    await store.create(a, {})
    await store.create(b, {}, ttl=30)
    ttl_a, ttl_b = await store.ttl(a), await store.ttl(b)
    assert ttl_a is not None and 590 < ttl_a <= 600
    assert ttl_b is not None and 20 < ttl_b <= 30


async def test_update_restarts_the_ttl(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {}, ttl=30)
    await store.update(key, {"status": "ready"})
    ttl = await store.ttl(key)
    assert ttl is not None and ttl > 590


async def test_expired_session_reads_as_gone(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {"status": "ready"}, ttl=1)
    assert await store.get(key) is not None
    # Wait until the store itself has expired it (Redis expires on its own clock); bounded, not timed.
    for _ in range(100):
        if await store.get(key) is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get(key) is None
    assert await store.ttl(key) is None
    assert await store.update(key, {"status": "completed"}) is None, "an expired session must not be revived"
    assert await store.get(key) is None


async def test_delete(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {"a": 1})
    assert await store.delete(key) is True
    assert await store.get(key) is None
    assert await store.delete(key) is False


async def test_concurrent_updates_lose_nothing(store: SessionStore) -> None:
    key = sid()
    await store.create(key, {})
    await asyncio.gather(*(store.update(key, {f"f{i}": i}) for i in range(20)))
    assert await store.get(key) == {f"f{i}": i for i in range(20)}


async def test_ping(store: SessionStore) -> None:
    assert await store.ping() is True


async def test_redis_store_reports_unreachable_server() -> None:
    from tests.support.servers import free_port

    dead = RedisSessionStore.from_url(f"redis://127.0.0.1:{free_port()}/0", default_ttl=600)
    try:
        assert await dead.ping() is False
    finally:
        await dead.close()


def test_memory_store_expiry_follows_its_clock() -> None:
    now = [1000.0]
    store = MemorySessionStore(default_ttl=600, clock=lambda: now[0])

    async def go() -> None:
        await store.create("a", {"x": 1})
        now[0] += 599.9
        assert await store.get("a") == {"x": 1}
        now[0] += 0.2
        assert await store.get("a") is None

    asyncio.run(go())
