"""Per-user egress limits counted in Redis, so that with several servers a user's limits hold across all of
them (each server's own counters would let a user with VMs on N servers open N times their limit).

The same three limits and the same order of checks as `LimitTracker` (polydev.egress.limits), made atomic by
one Lua script per admission, so two servers admitting at the same instant cannot both take the last place:
- open tunnels: a sorted set per user whose members are this server's tunnels, scored with a lease expiry
  that the server renews while they are open; a server that dies stops renewing, and its tunnels stop
  counting within LEASE_S (no counter is left stuck by a kill -9);
- new tunnels in the last minute: a sorted set of admission times per user (a sliding window, as locally);
- bytes today: a counter per user and UTC day, charged in batches (every FLUSH_S and when a tunnel ends).

When Redis cannot be reached, this server falls back to its own counters for that moment (logged): limits
then hold per server, as without Redis, rather than every tunnel being refused while the store is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from polydev.egress.limits import REASONS, WINDOW_S, Limits, LimitTracker, today
from polydev.egress.policy import Refused

log = structlog.get_logger(__name__)

LEASE_S = 60.0  # an open tunnel's lease; renewed every LEASE_S / 3 while it is open
FLUSH_S = 1.0  # bytes are added to the shared counter at most this long after they flowed
_ORDER = ("concurrent", "per_minute", "bytes_per_day")  # the script's answers 1, 2, 3
BYTES_TTL_S = 3 * 86400  # a day's counter outlives its day (clocks differ a little between servers)

# KEYS: open set, recent set, bytes counter. ARGV: now, lease expiry, member, concurrent, per_minute,
# bytes_per_day, window. Returns 0 (admitted) or 1/2/3: the limit that refused it, in LimitTracker's order.
_ADMIT = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[7]))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 2 end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[6]) then return 3 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) - now) + 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]) + 1)
return 0
"""
# KEYS: bytes counter. ARGV: a floor (today's bytes from the accounting), ttl. Raises the counter to the floor.
_SEED = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 0
"""


class SharedLimitTracker:
    """LimitTracker's interface, counted in Redis for every server at once."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "egress:limits:",
                 clock: Callable[[], float] = time.time, day: Callable[[], str] = today) -> None:
        self._redis = client
        self._prefix = prefix
        self._clock = clock
        self._day = day
        self._admit_script = client.register_script(_ADMIT)
        self._seed_script = client.register_script(_SEED)
        self._server = uuid.uuid4().hex[:12]  # members name their server: no two servers' tunnels collide
        self._numbers = itertools.count()
        self._open: dict[uuid.UUID | None, list[str]] = defaultdict(list)  # this server's tunnels, per user
        self._unsent: dict[tuple[uuid.UUID | None, str], int] = defaultdict(int)
        self._local = LimitTracker(clock=time.monotonic, day=day)  # while Redis is away
        self._fallback: set[uuid.UUID | None] = set()  # users whose open tunnels the local tracker counted
        self._task: asyncio.Task[None] | None = None

    def _key(self, kind: str, user: uuid.UUID | None, day: str | None = None) -> str:
        return f"{self._prefix}{kind}:{user or 'platform'}" + (f":{day}" if day else "")

    def start(self) -> None:
        """Renew this server's leases and send its byte counts, in the background (call with a running loop)."""
        self._task = asyncio.create_task(self._loop(), name="egress-limits")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._send_bytes()  # (the client is its owner's to close)

    async def admit(self, user: uuid.UUID | None, limits: Limits) -> None:
        member = f"{self._server}:{next(self._numbers)}"
        now = self._clock()
        try:
            await self._send_bytes()  # today's bytes as of now, not as of the last batch
            refused = await self._admit_script(
                keys=[self._key("open", user), self._key("recent", user), self._key("bytes", user, self._day())],
                args=[now, now + LEASE_S, member, limits.concurrent, limits.per_minute, limits.bytes_per_day,
                      WINDOW_S])
        except (RedisError, OSError) as exc:
            log.warning("egress_limits_local", reason=f"Redis unreachable: {exc}")
            await self._local.admit(user, limits)
            self._fallback.add(user)
            self._open[user].append("")  # "" marks a tunnel the local tracker counted
            return
        if refused:
            raise Refused(REASONS[_ORDER[int(refused) - 1]](limits), kind="limit")
        self._open[user].append(member)

    async def release(self, user: uuid.UUID | None) -> None:
        members = self._open.get(user)
        if not members:
            return
        member = members.pop(0)
        if not members:
            del self._open[user]
        if member == "":
            await self._local.release(user)
            return
        with contextlib.suppress(RedisError, OSError):  # unreachable: the lease ends it within LEASE_S
            await self._redis.zrem(self._key("open", user), member)
            await self._send_bytes()

    def charge(self, user: uuid.UUID | None, nbytes: int) -> None:
        self._unsent[(user, self._day())] += nbytes
        self._local.charge(user, nbytes)

    async def seed_bytes(self, user: uuid.UUID | None, nbytes: int) -> None:
        self._local.seed_bytes_now(user, nbytes)
        with contextlib.suppress(RedisError, OSError):
            await self._seed_script(keys=[self._key("bytes", user, self._day())], args=[nbytes, BYTES_TTL_S])

    async def open_count(self, user: uuid.UUID | None) -> int:
        """Open tunnels of `user` on every server (leases not yet expired)."""
        return int(await self._redis.zcount(self._key("open", user), self._clock(), "+inf"))

    async def _send_bytes(self) -> None:
        if not self._unsent:
            return
        batch, self._unsent = self._unsent, defaultdict(int)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (user, day), n in batch.items():
                    key = self._key("bytes", user, day)
                    pipe.incrby(key, n)
                    pipe.expire(key, BYTES_TTL_S)
                await pipe.execute()
        except BaseException:
            for k, n in batch.items():  # not sent: kept for the next batch
                self._unsent[k] += n
            raise

    async def _renew(self) -> None:
        expiry = self._clock() + LEASE_S
        async with self._redis.pipeline(transaction=False) as pipe:
            for user, members in list(self._open.items()):
                mine = {m: expiry for m in members if m}
                if mine:
                    pipe.zadd(self._key("open", user), mine, xx=True)  # xx: never revive a released one
                    pipe.expire(self._key("open", user), int(LEASE_S) + 1)
            await pipe.execute()

    async def _loop(self) -> None:
        renewed = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self._send_bytes()
                if time.monotonic() - renewed >= LEASE_S / 3:
                    await self._renew()
                    renewed = time.monotonic()
            except (RedisError, OSError) as exc:
                log.warning("egress_limits_sync_failed", reason=str(exc))

