"""Reconcile and the reaper: make the machine match the database, and keep it so.

`reconcile()` runs at start-up, before the engine creates anything: every VM process of this engine's tag
that the engine did not start in this process is killed (its token died with the previous process) and its
row marked failed — except the rows of the live servers it is told to `keep` (with several servers on one
database, their VMs live on their own machines); then address leases, network slots and disks that no live VM holds are reclaimed, in
that order. The reaper, in the background, destroys VMs past their expiry and retries the cleanups that
failed (`vm_cleanup_tasks`, which survive restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from polydev.vm import hibernation

if TYPE_CHECKING:
    from polydev.vm.engine import VMEngine

log = structlog.get_logger(__name__)


class Reaper:
    def __init__(self, engine: VMEngine) -> None:
        self.engine = engine
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the background reaper runs (start() was called, stop() not yet)."""
        return self._task is not None

    async def reconcile(self, keep: Collection[uuid.UUID] = ()) -> dict[str, int]:
        """Make the machine match the database, in a fixed order: processes, then network, then disks.
        `keep`: live servers whose VM rows are theirs, not this start's to judge. Returns what it found to
        undo, by kind."""
        engine = self.engine
        counts = {"processes": 0, "rows": 0, "slots": 0, "leases": 0, "disks": 0, "tasks": 0}
        counts["tasks"] = await engine.cleanup.requeue_interrupted(keep)
        mine = engine.running_here()
        # 1. processes
        for vm_id, pid in engine.processes().items():
            if vm_id in mine:
                continue
            await engine.backend.stop(pid, engine.workdir(vm_id))
            counts["processes"] += 1
        # rows that claim to live but have no process in this engine
        for row in await engine.vms.list():
            if row.vm_id in mine or (row.server_id is not None and row.server_id in keep):
                continue
            # A disk someone still needs (a workspace's files) is kept, to be booted cold when next used.
            if engine.keeps_disk is not None and await engine.keeps_disk(row.vm_id) \
                    and await hibernation.keep_disk(engine, row):
                counts["kept"] = counts.get("kept", 0) + 1
                continue
            kept = engine.keep_console(Path(row.workdir) if row.workdir else engine.workdir(row.vm_id), row.vm_id)
            reason = "lost when the control plane stopped" + (f" (console log: {kept})" if kept else "")
            await engine.vms.mark_failed(row.vm_id, reason)
            counts["rows"] += 1
        live_rows = {r.vm_id: r for r in await engine.vms.list()}
        # 2. network: slots and leases without a live VM
        held = await engine.leases.held()
        for vm_id in held.values():
            if vm_id not in live_rows:
                await engine.leases.release(vm_id)
                counts["leases"] += 1
        if engine.network is not None:
            live_slots = {r.slot_index for r in live_rows.values() if r.slot_index is not None}
            counts["slots"] = len(await asyncio.to_thread(engine.network.reclaim, live_slots))
        # 3. disks (a hibernated VM's are its state: kept, and the VM adopted by this server)
        counts["adopted"] = await hibernation.adopt(engine, set(keep))
        hibernated = {r.vm_id for r in await engine.vms.list(statuses=(hibernation.HIBERNATED,))}
        if engine.vms_dir.exists():
            for child in engine.vms_dir.iterdir():
                try:
                    vm_id = uuid.UUID(child.name)
                except ValueError:
                    continue
                if vm_id not in live_rows and vm_id not in hibernated:
                    shutil.rmtree(child, ignore_errors=True)
                    counts["disks"] += 1
        if any(counts.values()):
            log.warning("reconciled", **counts)
        return counts

    async def reap_once(self) -> int:
        """Destroy this server's expired VMs and run the due cleanup tasks of its VMs (another server's VM is
        on another machine: that server reaps it). Returns how many VMs it destroyed."""
        engine = self.engine
        done = 0
        await engine.disk.check()  # VMs paused on a full disk go on once space is back
        for row in await engine.vms.expired():
            if await engine.destroy(row.vm_id):
                done += 1
        for task in await engine.cleanup.claim_due(server_id=engine.vms.server_id):
            try:
                row = await engine.vms.get(task.vm_id)
                if row is not None:
                    await engine.teardown(row, failed=False)
                    await engine.vms.mark_destroyed(task.vm_id)
                await engine.cleanup.finish(task.id)
            except Exception as exc:
                await engine.cleanup.finish(task.id, error=str(exc))
        return done

    def start(self, interval: float = 5.0) -> None:
        """Reap every `interval` seconds in the background, until stop()."""
        async def loop() -> None:
            while True:
                try:
                    await self.reap_once()
                except Exception:
                    log.exception("reaper_failed")
                await asyncio.sleep(interval)

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
