"""What a Firecracker VM boots from, and where a snapshot of it is: the specs `FirecrackerProcess` takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# reboot=k + panic=1: a guest reboot or panic ends the Firecracker process instead of hanging; pci=off because
# Firecracker has no PCI bus (devices are virtio-mmio, announced on the command line).
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


@dataclass(frozen=True)
class DriveSpec:
    drive_id: str
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class VMConfig:
    """What a VM boots from. Boot args are Firecracker's defaults plus whatever the engine appends."""

    kernel: Path
    rootfs: Path
    rootfs_read_only: bool = False
    vcpus: int = 1
    mem_mib: int = 512
    boot_args: str = DEFAULT_BOOT_ARGS
    initrd: Path | None = None
    extra_drives: tuple[DriveSpec, ...] = ()
    tap: str | None = None  # host TAP device; None means no network interface
    guest_mac: str | None = None
    track_dirty_pages: bool = False


@dataclass(frozen=True)
class SnapshotFiles:
    state: Path  # the microVM state (devices, vCPUs)
    memory: Path  # the guest memory image
