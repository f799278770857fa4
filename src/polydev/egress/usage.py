"""Accounting: per user and destination host, tunnels, bytes each way, refusals with their reasons, first
and last seen. Counted in memory as tunnels run and handed to the store in batches (`drain`), so a tunnel
costs no database write; /metrics gets totals without a per-user label."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from prometheus_client import Counter

from polydev.store.egress import Delta

TUNNELS = Counter("polydev_egress_tunnels", "CONNECT requests through the egress gateway, by purpose and result",
                  ["purpose", "result"])
BYTES = Counter("polydev_egress_bytes", "Bytes tunnelled through the egress gateway, by direction", ["direction"])


class UsageBook:
    def __init__(self) -> None:
        self._pending: dict[tuple[uuid.UUID | None, str], Delta] = {}

    def _row(self, user: uuid.UUID | None, host: str) -> Delta:
        key = (user, host.lower())
        row = self._pending.get(key)
        if row is None:
            row = self._pending[key] = Delta(user, host.lower())
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

    def drain(self) -> list[Delta]:
        """Everything counted since the last drain; the book starts empty again."""
        out, self._pending = list(self._pending.values()), {}
        return out
