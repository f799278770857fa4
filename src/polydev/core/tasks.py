"""The flows' background tasks: one per login or run, the one rule for ending them early, and the periodic
sweeps of the services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def every(interval: float, work: Callable[[], Awaitable[object]], name: str) -> asyncio.Task[None]:
    """`work` every `interval` seconds in the background (the first after one interval), until cancelled; a
    failure is logged and the next round goes on."""
    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except Exception:
                log.exception("periodic_task_failed", task=name)

    return asyncio.get_running_loop().create_task(loop(), name=name)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task still running, then wait for each to finish its own cleanup (VM destroyed, status
    written). A task's failure is its own business here: it has recorded it."""
    pending = [t for t in tasks if t is not None]
    for task in pending:
        if not task.done():
            task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@dataclass(eq=False, kw_only=True)
class LiveTask:
    """A login or a run being driven by this process, as the ways to stop it see it.

    A cancel stops the work, never the clean-up: once the task has been cancelled, or is `ending` (its
    `finally` has begun: the CLI killed, credentials written back, VM destroyed, final status written), a
    further cancel — the user's, one relayed from another replica, the server's shutdown — is not sent;
    the canceller waits for the end.
    """

    task: asyncio.Task[None] | None = None
    cancelled_by_user: bool = False  # (else a cancel means the server is shutting down)
    ending: asyncio.Event = field(default_factory=asyncio.Event)  # the task sets it first thing in `finally`

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def cancel(self, *, by_user: bool) -> bool:
        """Cancel the task unless it has ended, is ending or was cancelled already; whether it was."""
        if self.task is None or self.task.done() or self.ending.is_set() or self.task.cancelling():
            return False
        self.cancelled_by_user = self.cancelled_by_user or by_user
        self.task.cancel()
        return True

    async def cancel_and_wait(self, *, by_user: bool) -> None:
        """`cancel`, then wait until the task has ended (its clean-up included), whatever it raised. Being
        cancelled while waiting does not reach the task."""
        self.cancel(by_user=by_user)
        await wait_ended([self])


async def end_all(items: Iterable[LiveTask]) -> None:
    """Server shutdown: cancel each task that is not ending yet, then wait for all of them to end."""
    items = list(items)
    for item in items:
        item.cancel(by_user=False)
    await wait_ended(items)


async def wait_ended(items: Iterable[LiveTask]) -> None:
    tasks = [item.task for item in items if item.task is not None]
    if not tasks:
        return
    await asyncio.wait(tasks)
    for task in tasks:  # retrieved, so asyncio does not log it again: the task has recorded its failure
        if not task.cancelled():
            task.exception()
