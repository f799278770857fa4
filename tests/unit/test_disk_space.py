"""The engine's watch over the data directory's space: VMs the hypervisor paused on a full disk are resumed
once space is back, not before, and only those."""

from __future__ import annotations

from pathlib import Path

from polydev.vm.disk_space import DiskSpace, DiskWatch


class Space(DiskSpace):
    free = 0

    def free_mb(self) -> int:
        return self.free


class Hypervisor:
    """Stands for the QEMU backend's two calls: which VMs are paused on a disk error, and resume."""

    def __init__(self, paused: set[Path]) -> None:
        self.paused, self.resumed = paused, []

    def io_paused(self, workdir: Path) -> bool:
        return workdir in self.paused

    def resume(self, workdir: Path) -> bool:
        self.paused.discard(workdir)
        self.resumed.append(workdir)
        return True


async def test_paused_vms_go_on_once_space_is_back_and_not_before(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    space, hv = Space(tmp_path, 32), Hypervisor({a})
    watch = DiskWatch(space, hv, lambda: [a, b])
    assert await watch.paused(a) and not await watch.paused(b)
    assert await watch.check() == 0 and hv.resumed == []  # still full: nothing resumed
    space.free = 100
    assert await watch.check() == 1 and hv.resumed == [a]  # only the paused one
    assert await watch.check() == 0 and hv.resumed == [a]  # once


async def test_space_that_never_ran_low_resumes_nothing_and_other_backends_are_left_alone(tmp_path: Path) -> None:
    space, hv = Space(tmp_path, 32), Hypervisor({tmp_path})
    space.free = 100
    assert await DiskWatch(space, hv, lambda: [tmp_path]).check() == 0 and hv.resumed == []
    space.free = 0
    watch = DiskWatch(space, object(), lambda: [tmp_path])  # a backend that does not pause on a full disk
    assert await watch.check() == 0 and not await watch.paused(tmp_path)
