"""Per-user limits on tunnels: how many at once, how many new ones a minute, how many bytes a day.

Checked when a CONNECT arrives: past a limit the tunnel is refused with the limit's name and value, for
that user only (nobody else shares the counters, so nobody else is slowed). Bytes count both directions and
are charged as they flow; the day is the UTC day. `LimitTracker` counts in this process (the embedded
default); with Redis (REDIS_URL), `SharedLimitTracker` (polydev.egress.shared_limits) counts for every server
at once, so a user's limits hold across servers.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from polydev.config import Settings
from polydev.egress.policy import Refused

WINDOW_S = 60.0
NAMES = ("concurrent", "per_minute", "bytes_per_day")  # the limits, as settings and per-user overrides name them


@dataclass(frozen=True)
class Limits:
    concurrent: int = 64
    per_minute: int = 600
    bytes_per_day: int = 20 * 1024**3

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The defaults every user has unless an admin overrides them (EGRESS_LIMIT_*)."""
        return cls(settings.egress_limit_concurrent, settings.egress_limit_per_minute,
                   settings.egress_limit_bytes_per_day)

    def merged(self, overrides: dict[str, int] | None) -> Limits:
        """These limits with a user's overrides (keys: concurrent, per_minute, bytes_per_day) applied."""
        known = {k: int(v) for k, v in (overrides or {}).items() if k in NAMES}
        return Limits(**{**self.__dict__, **known})


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


# The refusal's words for each limit, in the order they are checked.
REASONS: dict[str, Callable[[Limits], str]] = {
    "concurrent": lambda lim: f"limit: {lim.concurrent} concurrent connections reached",
    "per_minute": lambda lim: f"limit: {lim.per_minute} new connections per minute reached",
    "bytes_per_day": lambda lim: f"limit: {lim.bytes_per_day} bytes per day reached",
}


class LimitBook(Protocol):
    """What the gateway asks of its limit counters (LimitTracker here, SharedLimitTracker with Redis)."""

    async def admit(self, user: uuid.UUID | None, limits: Limits) -> None:
        """Count a new tunnel for `user`, or Refused (kind limit) naming the limit it would pass."""
        ...

    async def release(self, user: uuid.UUID | None) -> None:
        """One of `user`'s tunnels ended."""
        ...

    def charge(self, user: uuid.UUID | None, nbytes: int) -> None:
        """Bytes that flowed through one of `user`'s tunnels (called for every piece: must not wait)."""
        ...

    async def seed_bytes(self, user: uuid.UUID | None, nbytes: int) -> None:
        """Today's bytes already used, from the accounting (so a restart resets no daily limit)."""
        ...


class LimitTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic, day: Callable[[], str] = today) -> None:
        self._clock = clock
        self._day = day
        self._open: dict[uuid.UUID | None, int] = defaultdict(int)
        self._recent: dict[uuid.UUID | None, deque[float]] = defaultdict(deque)
        self._bytes: dict[tuple[uuid.UUID | None, str], int] = defaultdict(int)

    async def admit(self, user: uuid.UUID | None, limits: Limits) -> None:
        """Count a new tunnel for `user`, or Refused (kind limit) naming the limit it would pass."""
        now = self._clock()
        recent = self._recent[user]
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        if self._open[user] >= limits.concurrent:
            raise Refused(REASONS["concurrent"](limits), kind="limit")
        if len(recent) >= limits.per_minute:
            raise Refused(REASONS["per_minute"](limits), kind="limit")
        if self._bytes[(user, self._day())] >= limits.bytes_per_day:
            raise Refused(REASONS["bytes_per_day"](limits), kind="limit")
        recent.append(now)
        self._open[user] += 1

    async def release(self, user: uuid.UUID | None) -> None:
        self._open[user] = max(0, self._open[user] - 1)

    def charge(self, user: uuid.UUID | None, nbytes: int) -> None:
        self._bytes[(user, self._day())] += nbytes

    async def seed_bytes(self, user: uuid.UUID | None, nbytes: int) -> None:
        """Today's bytes already used (read from the accounting at start-up, so a restart resets nothing)."""
        self.seed_bytes_now(user, nbytes)

    def seed_bytes_now(self, user: uuid.UUID | None, nbytes: int) -> None:
        self._bytes[(user, self._day())] = max(self._bytes[(user, self._day())], nbytes)

    def open_count(self, user: uuid.UUID | None) -> int:
        return self._open[user]
