"""QEMU snapshots: what one holds, what it is keyed by, and how the template's boot is frozen into one.

The template's RAM is a shared file mapping (`memory-backend-file,share=on`) and is migrated with
`x-ignore-shared`, so the state file holds only device state (~0.6 MB instead of ~130 MB); a restore maps
that RAM file privately (copy-on-write) and loads nothing: pages come from the page cache as the guest
touches them, and every restored VM shares the unmodified ones. Where snapshots are kept, and that each is
made once, is the shared cache's business (polydev.vm.snapshots).
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from polydev.vm.backends.qemu import ram_cache
from polydev.vm.backends.qemu.command import GUEST_ADDR, GUEST_GATEWAY, TCG_CPU
from polydev.vm.backends.qemu.machine import QemuVM
from polydev.vm.forwards import GuestForward
from polydev.vm.images import Image
from polydev.vm.network import Slot
from polydev.vm.snapshots import SnapshotCache, SnapshotDir, SnapshotFile, Template, Workspace

# Bump when what a snapshot directory holds changes: older snapshots are then simply not found.
SNAPSHOT_FORMAT = "ram-file-1"


@dataclass(frozen=True)
class Snapshot(SnapshotDir):
    """A booted guest frozen with its agent running: memory state plus the disk as it was at that moment."""

    accel: str
    state = SnapshotFile("state.bin")
    disk = SnapshotFile("disk.qcow2")
    ram = SnapshotFile("ram.bin")
    empty_overlay = SnapshotFile("overlay.qcow2")  # an empty overlay on `disk`, copied for each restored VM

    @classmethod
    def load(cls, directory: Path) -> Snapshot:
        return cls(directory, SnapshotCache.meta(directory)["accel"])


def network_key(mode: str) -> list[str]:
    """What a restored guest keeps from the network it was snapshotted on: its address and its gateway."""
    if mode == "user":
        return ["user", GUEST_ADDR, GUEST_GATEWAY]
    from polydev.vm import network

    return ["tap", f"{network.GUEST_IP}/{network.GUEST_PREFIX}", network.GATEWAY_IP]


@functools.cache  # part of every snapshot key, so asked on every VM creation: one process (~50 ms) at most
def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


def snapshot_key(image: Image, vcpus: int, memory_mb: int, network: str) -> list[object]:
    """Everything a snapshot depends on. The network mode is in it because the guest's address and devices
    differ: user networking's 10.0.2.15, or the slot layout's address."""
    return [image.hash, vcpus, memory_mb, TCG_CPU, qemu_version(), network_key(network), SNAPSHOT_FORMAT]


def make(space: Workspace, image: Image, *, vcpus: int, memory_mb: int, accel: str, name: str,
         slot: Slot | None, guest_forwards: tuple[GuestForward, ...]) -> Template:
    """Boot a template in `space` (named `name`, in `slot` in tap mode) and freeze it into the snapshot's
    files: state.bin, ram.bin, disk.qcow2 and the empty overlay every restore copies."""
    work = space.work
    template = QemuVM(image, space.scratch, vcpus=vcpus, memory_mb=memory_mb, accel=accel, name=name,
                      keep_console=False, guest_forwards=guest_forwards, slot=slot, ram_file=(work / "ram.bin", True))
    try:
        template.start()
        # Stopped first, so the RAM file holds the guest's memory as the state describes it; its RAM, a
        # shared file mapping, is left out of the state (x-ignore-shared); QEMU ends with the files kept.
        template.hibernate(work / "state.bin")
        ram_cache.warm_in_background(work / "ram.bin")  # for the first pause of a VM restored from it
        booted_under = template.accel
        os.replace(template.overlay, work / "disk.qcow2")
        os.chmod(work / "disk.qcow2", 0o400)  # frozen: every restored VM's overlay builds on it
        # Restored VMs map ram.bin privately; it must never change under them (a new snapshot is a new
        # directory). Not read-only on disk: QEMU opens a memory-backend file for writing even when private.
        # The empty overlay names the disk at its final place (`-u`: it is not there yet).
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(space.directory / "disk.qcow2"),
                        "-F", "qcow2", str(work / "overlay.qcow2"), str(image.rootfs.stat().st_size)],
                       check=True, capture_output=True)
        return Template(template.token, {"accel": booted_under, "image": image.hash, "vcpus": vcpus,
                                         "memory_mb": memory_mb, "qemu": qemu_version(),
                                         "network": "tap" if slot else "user"})
    finally:
        template.stop()
