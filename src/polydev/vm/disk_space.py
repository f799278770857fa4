"""The free space of the data directory, into which every VM's copy-on-write disk grows (and where the
embedded database, the snapshots and the console logs live).

A VM whose disk cannot grow is paused by QEMU (its default on ENOSPC), not failed: once space is freed it is
resumed and goes on where it stopped, so a full disk for a while loses nothing. Meanwhile no new VM is
admitted (HOST_MIN_FREE_DISK_MB), and a login or run whose VM stays paused past its time ends failed saying
that the host ran out of disk space.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import structlog

log = structlog.get_logger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    min_free_mb: int  # below this no new VM is admitted, and paused VMs are not resumed; 0: never low

    def _existing(self) -> Path:
        path = self.path
        while not path.exists() and path != path.parent:  # the data directory may not be made yet
            path = path.parent
        return path

    def free_mb(self) -> int:
        return shutil.disk_usage(self._existing()).free // MIB

    def total_mb(self) -> int:
        return shutil.disk_usage(self._existing()).total // MIB

    def low(self) -> bool:
        return self.min_free_mb > 0 and self.free_mb() < self.min_free_mb


# When admission does not check (HOST_MIN_FREE_DISK_MB=0), below this the watch still looks for paused VMs.
LOW_FLOOR_MB = 64
OUT_OF_DISK = ("the host ran out of disk space: the VM was paused when its disk could not grow, and space did "
               "not come back in time (an operator must free space in the data directory)")


@runtime_checkable
class PausesOnFullDisk(Protocol):
    """A backend whose hypervisor pauses a VM whose disk cannot grow (QEMU's default on ENOSPC) instead of
    failing its writes, and can resume it. Blocking calls."""

    def io_paused(self, workdir: Path) -> bool:
        """Whether the VM of this work directory is paused on a disk write error."""
        ...

    def resume(self, workdir: Path) -> bool:
        """Resume it; False when it could not be."""
        ...


class DiskWatch:
    """Watches the data directory for the engine: while its space is low, VMs may be paused on a full disk;
    once it is back, they are resumed (`check`, on the reaper's beat). `paused` tells a flow whose VM stopped
    answering whether that is why."""

    def __init__(self, space: DiskSpace, backend: object, workdirs: Callable[[], Iterable[Path]]) -> None:
        self.space = space
        self.backend = backend if isinstance(backend, PausesOnFullDisk) else None
        self.workdirs = workdirs
        self._was_low = False

    async def paused(self, workdir: Path) -> bool:
        if self.backend is None:
            return False
        return await asyncio.to_thread(self.backend.io_paused, workdir)

    async def check(self) -> int:
        """Note the space running low, or resume the VMs paused while it was once it is back. Returns how
        many it resumed."""
        if self.backend is None:
            return 0
        free = await asyncio.to_thread(self.space.free_mb)
        if free < (self.space.min_free_mb or LOW_FLOOR_MB):
            if not self._was_low:
                log.warning("data_dir_out_of_space", path=str(self.space.path), free_mb=free,
                            min_free_mb=self.space.min_free_mb)
            self._was_low = True
            return 0
        if not self._was_low:
            return 0
        self._was_low = False
        resumed = 0
        for workdir in list(self.workdirs()):
            if await self.paused(workdir) and await asyncio.to_thread(self.backend.resume, workdir):
                resumed += 1
        log.warning("data_dir_space_back", free_mb=free, vms_resumed=resumed)
        return resumed
