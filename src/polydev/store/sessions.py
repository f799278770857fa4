"""Live login-session state with a time-to-live (the seed's `session:{id}` keys, 10 minutes).

Two implementations of one contract: Redis (shared by every replica) and in-process (the embedded
default). Both store JSON, so a caller never holds a reference into the store, and both treat an expired
session exactly like one that never existed.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

JSON = dict[str, Any]


class SessionStore(abc.ABC):
    kind: str

    def __init__(self, default_ttl: int) -> None:
        self.default_ttl = default_ttl

    @abc.abstractmethod
    async def create(self, session_id: str, data: JSON, ttl: int | None = None) -> None:
        """Store a new session (replacing any with that id) that expires after `ttl` seconds."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> JSON | None:
        """The session, or None when it never existed or has expired."""

    @abc.abstractmethod
    async def update(self, session_id: str, changes: JSON) -> JSON | None:
        """Merge `changes` into a live session and restart its TTL (activity keeps it alive).
        Returns the merged session, or None if it is gone: an expired session is never revived."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Remove a session; True if it was live."""

    @abc.abstractmethod
    async def ttl(self, session_id: str) -> float | None:
        """Seconds left, or None when gone."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    async def close(self) -> None:
        return None


class MemorySessionStore(SessionStore):
    kind = "memory"

    def __init__(self, default_ttl: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(default_ttl)
        self._clock = clock
        self._items: dict[str, tuple[float, str]] = {}
        self._ops = 0

    def _live(self, session_id: str) -> str | None:
        item = self._items.get(session_id)
        if item is None:
            return None
        expires, raw = item
        if expires <= self._clock():
            del self._items[session_id]
            return None
        return raw

    def _sweep(self) -> None:
        # Expired entries are dropped lazily on read; an occasional sweep bounds memory for never-read ones.
        self._ops += 1
        if self._ops % 1024:
            return
        now = self._clock()
        for key in [k for k, (exp, _) in self._items.items() if exp <= now]:
            del self._items[key]

    async def create(self, session_id: str, data: JSON, ttl: int | None = None) -> None:
        self._sweep()
        self._items[session_id] = (self._clock() + (ttl or self.default_ttl), json.dumps(data))

    async def get(self, session_id: str) -> JSON | None:
        raw = self._live(session_id)
        return None if raw is None else json.loads(raw)

    async def update(self, session_id: str, changes: JSON) -> JSON | None:
        raw = self._live(session_id)
        if raw is None:
            return None
        merged = {**json.loads(raw), **changes}
        self._items[session_id] = (self._clock() + self.default_ttl, json.dumps(merged))
        return merged

    async def delete(self, session_id: str) -> bool:
        live = self._live(session_id) is not None
        self._items.pop(session_id, None)
        return live

    async def ttl(self, session_id: str) -> float | None:
        if self._live(session_id) is None:
            return None
        return self._items[session_id][0] - self._clock()

    async def ping(self) -> bool:
        return True


def redis_client(url: str) -> aioredis.Redis:
    """A Redis client as every part of the server uses one: short timeouts, and a command retried (3 times,
    backing off) when its connection broke, so a Redis restart costs the pooled connections it closed a retry
    rather than each of them an error."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5,
                                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
                                   retry_on_error=[RedisConnectionError, RedisTimeoutError])


class RedisSessionStore(SessionStore):
    kind = "redis"

    def __init__(self, client: aioredis.Redis, default_ttl: int, prefix: str = "session:") -> None:
        super().__init__(default_ttl)
        self._redis = client
        self._prefix = prefix

    @classmethod
    def from_url(cls, url: str, default_ttl: int, prefix: str = "session:") -> RedisSessionStore:
        return cls(redis_client(url), default_ttl, prefix)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}{session_id}"

    async def create(self, session_id: str, data: JSON, ttl: int | None = None) -> None:
        await self._redis.set(self._key(session_id), json.dumps(data), ex=ttl or self.default_ttl)

    async def get(self, session_id: str) -> JSON | None:
        raw = await self._redis.get(self._key(session_id))
        return None if raw is None else json.loads(raw)

    async def update(self, session_id: str, changes: JSON) -> JSON | None:
        key = self._key(session_id)
        # Optimistic transaction: if another replica writes the key between our read and write, retry.
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        await pipe.reset()
                        return None
                    merged = {**json.loads(raw), **changes}
                    pipe.multi()
                    pipe.set(key, json.dumps(merged), ex=self.default_ttl)
                    await pipe.execute()
                    return merged
                except WatchError:
                    continue

    async def delete(self, session_id: str) -> bool:
        return bool(await self._redis.delete(self._key(session_id)))

    async def ttl(self, session_id: str) -> float | None:
        ms = await self._redis.pttl(self._key(session_id))
        return None if ms < 0 else ms / 1000

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def create_session_store(redis_url: str | None, default_ttl: int) -> SessionStore:
    if redis_url:
        return RedisSessionStore.from_url(redis_url, default_ttl)
    return MemorySessionStore(default_ttl)
