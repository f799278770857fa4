"""Accounting: per user and destination host, tunnels, bytes each way, refusals with their reasons, first
and last seen. Counted in memory as tunnels run and handed to the store in batches (`drain`), so a tunnel
costs no database write; /metrics gets totals without a per-user label."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prometheus_client import Counter

TUNNELS = Counter("polydev_egress_tunnels", "CONNECT requests through the egress gateway, by purpose and result",
                  ["purpose", "result"])
BYTES = Counter("polydev_egress_bytes", "Bytes tunnelled through the egress gateway, by direction", ["direction"])


@dataclass
class UsageDelta:
    """What happened for one (user, host) since the last drain."""

    user_id: uuid.UUID | None
    host: str
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    refusals: int = 0
    last_refusal: str | None = None
    first_seen: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    last_seen: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class UsageBook:
    def __init__(self) -> None:
        self._pending: dict[tuple[uuid.UUID | None, str], UsageDelta] = {}

    def _row(self, user: uuid.UUID | None, host: str) -> UsageDelta:
        key = (user, host.lower())
        row = self._pending.get(key)
        if row is None:
            row = self._pending[key] = UsageDelta(user, host.lower())
        row.last_seen = datetime.now(timezone.utc)
        return row

    def connected(self, user: uuid.UUID | None, host: str, purpose: str) -> None:
        self._row(user, host).connections += 1
        TUNNELS.labels(purpose, "opened").inc()

    def transferred(self, user: uuid.UUID | None, host: str, up: int, down: int) -> None:
        row = self._row(user, host)
        row.bytes_up += up
        row.bytes_down += down
        BYTES.labels("up").inc(up)
        BYTES.labels("down").inc(down)

    def refused(self, user: uuid.UUID | None, host: str, purpose: str, kind: str, reason: str) -> None:
        row = self._row(user, host)
        row.refusals += 1
        row.last_refusal = reason
        TUNNELS.labels(purpose, f"refused_{kind}").inc()

    def drain(self) -> list[UsageDelta]:
        """Everything counted since the last drain; the book starts empty again."""
        out, self._pending = list(self._pending.values()), {}
        return out
