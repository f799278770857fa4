"""Whether this machine can run Firecracker: the binary, KVM, the kernel's format, the root file system and
the network mode, each problem said in one sentence. Firecracker needs /dev/kvm, an uncompressed ELF kernel
built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y, and tap networking."""

from __future__ import annotations

import fcntl
import os
import platform
from pathlib import Path
from typing import Any

from polydev.vm.backends.firecracker.errors import FirecrackerUnavailable

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00); the stable KVM API answers 12
KVM_API_VERSION = 12
NEEDS_TAP = ("Firecracker has no user-mode networking: set NETWORK_MODE=tap (needs root; each VM gets a TAP "
             "in its own network slot)")


def kvm_problem(device: Path = Path("/dev/kvm")) -> str | None:
    """Why KVM cannot be used through `device`, or None. Opens it and asks for the API version, which is what
    Firecracker does first; file permissions alone do not prove the module answers."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{device} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{device} speaks KVM API {version}, Firecracker needs {KVM_API_VERSION}"
    return None


def unavailable_reason(binary: Path, *, kvm_device: Path | None = Path("/dev/kvm")) -> str | None:
    """Why Firecracker cannot run here (missing or non-executable binary, unusable KVM), or None."""
    if not binary.is_file():
        return f"no firecracker binary at {binary} (set FIRECRACKER_BINARY)"
    if not os.access(binary, os.X_OK):
        return f"{binary} is not executable"
    if kvm_device is not None:
        return kvm_problem(kvm_device)
    return None


def check_available(binary: Path, *, kvm_device: Path | None = Path("/dev/kvm")) -> None:
    reason = unavailable_reason(binary, kvm_device=kvm_device)
    if reason:
        raise FirecrackerUnavailable(reason)


def kernel_problem(kernel: Path) -> str | None:
    """Why `kernel` cannot boot under Firecracker on x86_64, as far as a cheap look can tell, or None.

    Firecracker loads an uncompressed ELF vmlinux, not a bzImage; Debian's packaged kernels are bzImages
    (and lack CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), the mistake an operator is most likely to make.
    """
    try:
        with open(kernel, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"cannot read kernel {kernel}: {exc.strerror}"
    if platform.machine() in ("x86_64", "AMD64") and magic != b"\x7fELF":
        return f"{kernel} is not an uncompressed ELF vmlinux (a bzImage will not boot under Firecracker)"
    return None


def rootfs_for(settings: Any) -> Path | str:
    """FIRECRACKER_GOLDEN_ROOTFS, else the built image's root file system; a string says what is missing."""
    if settings.firecracker_golden_rootfs is not None:
        rootfs: Path = settings.firecracker_golden_rootfs
        return rootfs if rootfs.is_file() else f"FIRECRACKER_GOLDEN_ROOTFS {rootfs} does not exist"
    from polydev.vm import image_updates, images

    try:
        image = image_updates.in_use(settings.cache_dir, settings.vm_image_profile, settings.cli_versions)
    except images.VersionUnresolved as exc:
        return f"the image's CLI versions (POLYDEV_CLI_VERSIONS): {exc}"
    if image is None:
        return (f"no {settings.vm_image_profile} image in {settings.cache_dir} (run `polydev image build "
                f"--profile {settings.vm_image_profile}` or set FIRECRACKER_GOLDEN_ROOTFS)")
    return image.rootfs
