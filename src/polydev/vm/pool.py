"""The engine's warm pool: running `cli` VMs owned by nobody, handed out by `VMEngine.create()` without
waiting for a start, and refilled in the background after every hand-out.

The pool starts its VMs through the engine (callbacks given at construction), so a pooled VM is an ordinary
VM of the engine's: it has its row (no user, no expiry until handed out) and is destroyed like any other.
Read it through `ready`, `size` or `view()`; the engine alone hands VMs out and takes them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from polydev.store.models import utcnow
from polydev.vm.types import VM, PoolPrepare, PoolView

if TYPE_CHECKING:
    from polydev.store.vms import VmRepo

log = structlog.get_logger(__name__)


class WarmPool:
    def __init__(self, *, vms: VmRepo, start: Callable[[], Awaitable[VM]],
                 prepare_vm: Callable[[VM, PoolPrepare], Awaitable[None]], size: int = 0,
                 prepare: PoolPrepare | None = None) -> None:
        self.size = size  # how many ready VMs to keep
        self.prepare = prepare  # the hook run on each VM before it counts as ready
        self._vms = vms
        self._start = start  # starts one cli VM for nobody
        self._prepare_vm = prepare_vm  # runs the hook on it; on failure the VM is gone and this raises
        self._ready: list[uuid.UUID] = []
        self._prepared: set[uuid.UUID] = set()  # pooled VMs the hook ran on
        self._pooled: dict[uuid.UUID, VM] = {}  # what a hand-out returns for them, without a read
        self._hand_outs: set[asyncio.Task[None]] = set()  # hand-out rows being written
        self._filler: asyncio.Task[None] | None = None
        self._wanted = asyncio.Event()

    # -- the public, read-only view -----------------------------------------------------------------------
    @property
    def ready(self) -> tuple[uuid.UUID, ...]:
        """The VMs ready to hand out, oldest (next out) first."""
        return tuple(self._ready)

    def view(self) -> PoolView:
        return PoolView(size=self.size, ready=tuple(self._ready), prepared=frozenset(self._prepared),
                        filling=self._filler is not None)

    async def settled(self) -> None:
        """Wait until the rows of VMs handed out so far say whose they are."""
        if self._hand_outs:
            await asyncio.gather(*self._hand_outs, return_exceptions=True)

    # -- used by the engine -------------------------------------------------------------------------------
    def take(self, user_id: uuid.UUID | None, ttl: timedelta) -> VM | None:
        """Hand the oldest ready VM to `user_id`, or None when none is ready."""
        if not self._ready:
            return None
        vm_id = self._ready.pop(0)
        prepared = vm_id in self._prepared
        self._prepared.discard(vm_id)
        expires = utcnow() + ttl
        vm = replace(self._pooled.pop(vm_id), user_id=user_id, expires_at=expires, prepared=prepared)
        # The VM is the caller's from here; its row follows without holding up the caller's first request to
        # the agent (~10 ms of database write under TCG load). Should the server stop before the row is
        # written, its next start destroys every VM this process ran anyway.
        task = asyncio.get_running_loop().create_task(self._record_hand_out(vm_id, user_id, expires))
        self._hand_outs.add(task)
        task.add_done_callback(self._hand_outs.discard)
        log.info("vm_from_pool", vm_id=str(vm_id), pooled=len(self._ready), prepared=prepared)
        return vm

    async def _record_hand_out(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, expires: datetime) -> None:
        try:
            await self._vms.update(vm_id, user_id=user_id, expires_at=expires)
        except Exception:
            log.exception("vm_hand_out_row_failed", vm_id=str(vm_id))
        finally:
            # Refill once the hand-out's row is written: the replacement's start (disk overlay, hypervisor
            # process, its rows) would otherwise compete with it for the event loop and the database.
            self._wanted.set()

    def discard(self, vm_id: uuid.UUID) -> None:
        """Forget a pooled VM that is being destroyed (a no-op for any other), and refill."""
        if vm_id in self._ready:
            self._ready.remove(vm_id)
            self._prepared.discard(vm_id)
            self._pooled.pop(vm_id, None)
            self._wanted.set()

    async def fill(self) -> int:
        """Start VMs until the pool holds `size`; returns how many it started."""
        started = 0
        while len(self._ready) < self.size:
            vm = await self._start()
            if self.prepare is not None:
                await self._prepare_vm(vm, self.prepare)
                self._prepared.add(vm.id)
            self._ready.append(vm.id)
            self._pooled[vm.id] = vm
            started += 1
        return started

    def start(self, retry_after: float = 5.0) -> None:
        """Keep the pool full in the background (refilled after every hand-out)."""
        async def loop() -> None:
            while True:
                self._wanted.clear()
                try:
                    await self.fill()
                except Exception:
                    log.exception("warm_pool_fill_failed")
                    await asyncio.sleep(retry_after)
                    continue
                await self._wanted.wait()

        if self.size > 0 and self._filler is None:
            self._filler = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        """Stop refilling and let hand-outs finish writing their rows. The pooled VMs stay: the engine
        destroys them with its others."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
            self._filler = None
        await self.settled()
