"""A guest's watches (long-polls of up to a minute, one per login waiting for its URL or credential files) do
not hold the event loop's default thread pool, which every other blocking call of the server shares (VM
creation, file puts): found by tests/reliability/test_load.py, where 20 waiting logins left the runs' VMs
queued for minutes."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from polydev.core.guest import Guest

WAITING = 40 + (os.cpu_count() or 1)  # more than the default pool's min(32, CPUs + 4) threads


class BlockingWatch:
    """An agent client whose watch blocks until released, as a long-poll does until its file appears."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def watch(self, paths: list[str], timeout: float) -> str | None:
        with self._lock:
            self.waiting += 1
        self.release.wait(120)  # (bounded, so a failing test ends)
        return paths[0]


async def test_many_waiting_watches_leave_the_default_pool_free() -> None:
    client = BlockingWatch()
    guest = Guest(client)  # type: ignore[arg-type]
    watches = [asyncio.create_task(guest.watch([f"/run/polydev/login/urls-{i}"], 60)) for i in range(WAITING)]
    for _ in range(6000):  # (a generous bound: with the watches in the default pool only a few ever start)
        if client.waiting == WAITING:
            break
        await asyncio.sleep(0.01)
    assert client.waiting == WAITING  # every watch is waiting in its blocking call at once

    def other_blocking_call() -> str:  # a VM creation, a file put: it runs, and here it ends the watches
        client.release.set()
        return "ran"

    done: Any = await asyncio.wait_for(asyncio.to_thread(other_blocking_call), 60)
    assert done == "ran"
    assert await asyncio.gather(*watches) == [f"/run/polydev/login/urls-{i}" for i in range(WAITING)]
