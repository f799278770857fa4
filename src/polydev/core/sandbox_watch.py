"""envd's directory watchers (`files.watch_dir`), kept by this server: each polls the watched directory in the
sandbox's VM through the agent's file listing and turns every difference into an E2B filesystem event
(create, write, remove; a rename shows as a remove and a create).

Polling from the host, not inotify in the guest: the agent needs nothing new, and a listing every POLL_S is
cheap next to what a sandbox runs. A watcher ends when it is removed, when its sandbox stops answering (killed,
paused) or when this server stops.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from posixpath import relpath

import structlog

from polydev.core.tasks import cancel_and_wait
from polydev.protocol import FsEntry

log = structlog.get_logger(__name__)

POLL_S = 0.5
MAX_PENDING = 10_000  # events kept for a watcher nobody reads: the oldest go first
CREATE, WRITE, REMOVE = "EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE", "EVENT_TYPE_REMOVE"

Lister = Callable[[], list[FsEntry]]  # the watched directory's entries (recursively when asked); blocking
Event = tuple[str, str]  # (name relative to the watched directory, event type)
_State = dict[str, tuple[str, int, float]]  # name -> (type, size, mtime)


def _state(entries: list[FsEntry], root: str) -> _State:
    return {relpath(e.path, root): (e.type, e.size, e.mtime) for e in entries}


def changes(before: _State, after: _State) -> list[Event]:
    """The events that take a directory from `before` to `after`."""
    events = [(name, CREATE) for name in after if name not in before]
    events += [(name, WRITE) for name, seen in after.items()
               if name in before and seen != before[name] and seen[0] != "dir"]
    events += [(name, REMOVE) for name in before if name not in after]
    return events


@dataclass
class _Watcher:
    sandbox_id: str
    pending: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


async def _poll(lister: Lister, root: str, before: _State, emit: Callable[[list[Event]], None]) -> None:
    """Emit the changes of `root` from `before` on, until its listing fails (the sandbox went away)."""
    while True:
        await asyncio.sleep(POLL_S)
        try:
            after = _state(await asyncio.to_thread(lister), root)
        except Exception as exc:  # noqa: BLE001 - killed, paused, or the directory removed: the watch ends
            log.info("sandbox_watch_ended", root=root, reason=type(exc).__name__)
            return
        if events := changes(before, after):
            emit(events)
        before = after


class Watchers:
    def __init__(self) -> None:
        self._watchers: dict[str, _Watcher] = {}

    async def create(self, sandbox_id: str, lister: Lister, root: str) -> str:
        """A watcher of `root` (its first listing is taken now: a missing directory raises here)."""
        before = _state(await asyncio.to_thread(lister), root)
        watcher_id = secrets.token_hex(8)
        watcher = self._watchers[watcher_id] = _Watcher(sandbox_id)

        def emit(events: list[Event]) -> None:
            watcher.pending = (watcher.pending + events)[-MAX_PENDING:]

        watcher.task = asyncio.get_running_loop().create_task(_poll(lister, root, before, emit),
                                                              name=f"watch-{watcher_id}")
        return watcher_id

    def events(self, sandbox_id: str, watcher_id: str) -> list[Event] | None:
        """The events since the last call; None for no such watcher of this sandbox."""
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != sandbox_id:
            return None
        events, watcher.pending = watcher.pending, []
        return events

    async def remove(self, sandbox_id: str, watcher_id: str) -> bool:
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != sandbox_id:
            return False
        del self._watchers[watcher_id]
        await cancel_and_wait([watcher.task])
        return True

    @staticmethod
    async def stream(lister: Lister, root: str) -> AsyncIterator[list[Event]]:
        """The changes of `root` as they are seen, for one streaming client (envd's WatchDir): first [] once
        its first listing is taken (a missing directory raises there), then each batch of changes."""
        queue: asyncio.Queue[list[Event] | None] = asyncio.Queue()
        before = _state(await asyncio.to_thread(lister), root)
        yield []

        async def run() -> None:
            try:
                await _poll(lister, root, before, queue.put_nowait)
            finally:
                queue.put_nowait(None)

        task = asyncio.get_running_loop().create_task(run())
        try:
            while (events := await queue.get()) is not None:
                yield events
        finally:
            await cancel_and_wait([task])

    async def close(self) -> None:
        watchers, self._watchers = list(self._watchers.values()), {}
        await cancel_and_wait([w.task for w in watchers])
