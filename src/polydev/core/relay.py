"""Requests for a login or run another replica drives, passed on through the shared session store.

A login or run is a task in the one process that started it (its VM, its CLI); behind a load balancer the
user's next request — a cancel, a login's pasted code — can reach any replica. With a shared session store
(Redis) the replica that gets such a request leaves it in the store; the driving replica looks a few times
a second at what it drives, takes a request left there (removing it first, so it is acted on once) and
acts as if the request had reached it. With the in-process store there is one replica and nothing to pass.

`StoreRelay` is the driving side's loop, shared by both flows: what a request looks like in the store, and
what taking it does, is each flow's (core/login_relay.py for logins; the run flow's cancels).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import structlog

from polydev.store.sessions import SessionStore

log = structlog.get_logger(__name__)

T = TypeVar("T")
SEND_POLL_S = 0.2  # how often a sender looks whether the driving replica has acted


class StoreRelay(Generic[T]):
    """While `live` names anything this process drives (id, and what `take` needs of it), call `take` on
    each every `poll_s` seconds; `take` reads the store and acts on a request it finds."""

    def __init__(self, store: SessionStore, *, name: str, id_key: str, poll_s: float) -> None:
        self.store = store
        self.name = name  # the watcher task's name, and the log event of a failure (`<name>_failed`)
        self.id_key = id_key  # how that log line names the id
        self.poll_s = poll_s
        self._watcher: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        """Whether other replicas see this store (only then can anything be driven elsewhere)."""
        return self.store.kind != "memory"

    def watch(self, live: Callable[[], Iterable[tuple[uuid.UUID, T]]],
              take: Callable[[uuid.UUID, T], Awaitable[object]]) -> None:
        """Start looking, unless the store is not shared or the loop runs already; the loop stops once
        `live` is empty, and the next call starts it again."""
        if not self.shared or (self._watcher is not None and not self._watcher.done()):
            return
        self._watcher = asyncio.get_running_loop().create_task(self._loop(live, take),
                                                               name=self.name.replace("_", "-"))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher

    async def _loop(self, live: Callable[[], Iterable[tuple[uuid.UUID, T]]],
                    take: Callable[[uuid.UUID, T], Awaitable[object]]) -> None:
        while items := list(live()):
            for item_id, item in items:
                try:
                    await take(item_id, item)
                except Exception:  # one item's trouble must not stop the others' requests
                    log.exception(f"{self.name}_failed", **{self.id_key: str(item_id)})
            await asyncio.sleep(self.poll_s)


async def wait_for(probe: Callable[[], Awaitable[T | None]], wait_s: float) -> T | None:
    """The sending side: what `probe` answers once it answers something (the driving replica has acted),
    looking every SEND_POLL_S; None after `wait_s` seconds (nobody drives it any more)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        await asyncio.sleep(SEND_POLL_S)
        found = await probe()
        if found is not None:
            return found
    return None
