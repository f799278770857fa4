"""A run's events: stored in `run_events` as they arrive, numbered in order, and streamed to its readers.

The table is the source of truth: a client that connects late or reconnects with Last-Event-ID reads the
whole run from it. `RunEvents` wakes the readers of this process as soon as an event is stored; readers on
other replicas poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from polydev.store.db import when_reachable
from polydev.store.runs import RUN_TERMINAL, RunRepo, StoredEvent

KEEP_ALIVE_S = 15  # a reader with nothing to send yields None this often (the caller sends a keep-alive)


class Wake(asyncio.Event):
    """Set when a run's events are stored; `stored` holds those the writer passed along (already in the table)."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[StoredEvent] = []


class RunEvents:
    """Wakes the readers of a run when new events are stored. In-process only: readers on another replica
    fall back to polling the table, so this is a latency shortcut, not the source of truth."""

    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, Wake] = {}

    def waiter(self, run_id: uuid.UUID) -> Wake:
        ev = self._waiters.get(run_id)
        if ev is None or ev.is_set():
            ev = self._waiters[run_id] = Wake()
        return ev

    def notify(self, run_id: uuid.UUID, stored: list[StoredEvent] | None = None) -> None:
        """Call after the events are committed: readers may hand `stored` on without reading it back."""
        ev = self._waiters.pop(run_id, None)
        if ev is not None:
            ev.stored = stored or []
            ev.set()


class EventWriter:
    """Stores one run's events in order; one writer a run (the process driving it, or the one ending a run
    nobody drives)."""

    def __init__(self, runs: RunRepo, events: RunEvents, run_id: uuid.UUID) -> None:
        self.runs = runs
        self.events = events
        self.run_id = run_id
        self.seq = -1
        self.pending: asyncio.Task[None] | None = None  # an event being stored in the background

    def emit_soon(self, ev: dict[str, Any]) -> None:
        """Store an event while the caller goes on; the next `emit` waits for it, so the order holds."""
        self.pending = asyncio.create_task(self._store(ev))

    async def settle(self) -> None:
        """Wait until the event being stored in the background is; raises what storing it raised."""
        pending = self.pending
        if pending is not None:
            await asyncio.wait([pending])  # not `await pending`: cancelling the run must not cancel the store
            self.pending = None
            pending.result()

    async def emit(self, ev: dict[str, Any], seq_from_db: bool = False) -> None:
        """Store an event after those before it. `seq_from_db`: number it after what the table holds (a
        writer that did not write the run's earlier events)."""
        await self.settle()
        await self._store(ev, seq_from_db)

    async def _store(self, ev: dict[str, Any], seq_from_db: bool = False) -> None:
        # A database restarting under the run: the event waits for it (the CLI's output keeps coming into the
        # guest's pipe meanwhile), rather than the run failing for it.
        if seq_from_db:
            self.seq = await when_reachable(lambda: self.runs.last_seq(self.run_id), "a run's events")
        self.seq += 1
        stored = [StoredEvent(self.seq, ev)]
        await when_reachable(lambda: self.runs.append_events(self.run_id, stored), "a run's events")
        self.events.notify(self.run_id, stored)


async def stream(runs: RunRepo, events: RunEvents, run_id: uuid.UUID, after: int = -1, *,
                 poll_interval: float) -> AsyncIterator[StoredEvent | None]:
    """Every event after `after`, then the live ones as they come, until the run has ended. Yields None
    while nothing happens (the caller sends a keep-alive)."""
    idle_since = time.monotonic()
    while True:
        waiter = events.waiter(run_id)  # taken before reading, so no event slips between the two
        batch = await runs.events_after(run_id, after)
        for ev in batch:
            after = ev.seq
            yield ev
        if batch:
            idle_since = time.monotonic()
            continue
        row = await runs.get(run_id)
        if row is None or row.status in RUN_TERMINAL:
            for ev in await runs.events_after(run_id, after):  # written just before the end
                yield ev
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll_interval):
                await waiter.wait()
        if waiter.stored and waiter.stored[0].seq == after + 1:
            # What woke us follows on from what we sent: on without a read back (the next loop reads).
            for ev in waiter.stored:
                after = ev.seq
                yield ev
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since > KEEP_ALIVE_S:
            idle_since = time.monotonic()
            yield None
