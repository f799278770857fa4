"""Can this machine run VMs as configured? The checks behind `polydev doctor`.

Each check looks, and changes nothing: no VM is booted, no namespace made. A check is `required` when the
configured setup cannot run VMs without it (the KVM check is not: QEMU falls back to TCG).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from polydev.config import Settings
from polydev.vm.backends import kvm_host

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _check(name: str, problem: str | None, ok_detail: str, *, required: bool = True) -> Check:
    if problem is None:
        return Check(name, "ok", ok_detail)
    return Check(name, "fail" if required else "warn", problem)


def backend_check(settings: Settings) -> Check:
    from polydev.vm.backends import BackendUnavailable, create_backend

    try:
        backend = create_backend(settings)
    except BackendUnavailable as exc:
        return Check("backend", "fail", f"{settings.vm_backend}: {exc}")
    except Exception as exc:  # a broken install is a finding too, not a crash of the doctor
        return Check("backend", "fail", f"{settings.vm_backend}: {type(exc).__name__}: {exc}")
    return Check("backend", "ok", f"{backend.name} can start VMs here")


def accel_check(settings: Settings) -> Check:
    from polydev.vm.backends.firecracker.checks import kvm_problem

    # Opening /dev/kvm and asking its API version proves more than file permissions do.
    problem = kvm_problem(Path("/dev/kvm"))
    if settings.vm_backend == "firecracker":
        return _check("kvm", problem, "/dev/kvm answers (Firecracker needs it)")
    if problem is None and kvm_host.pvm_only():
        return Check("kvm", "warn", f"{kvm_host.PVM_ONLY}: QEMU tries it and then uses TCG (software emulation, "
                                    "several times slower)")
    if problem is None:
        return Check("kvm", "ok", "/dev/kvm answers: VMs try KVM first and fall back to TCG if the guest "
                                  "kernel does not come up under it")
    return Check("kvm", "warn", f"{problem}: QEMU will use TCG (software emulation, several times slower)")


def image_checks(settings: Settings) -> list[Check]:
    if settings.vm_backend == "firecracker":
        from polydev.vm.backends.firecracker.checks import kernel_problem, rootfs_for

        kernel = settings.firecracker_golden_kernel
        rootfs = rootfs_for(settings)  # FIRECRACKER_GOLDEN_ROOTFS, else the built image, as the backend does
        checks = [_check("image", rootfs if isinstance(rootfs, str) else None, f"rootfs {rootfs}")]
        if kernel is None or not kernel.is_file():
            checks.append(Check("kernel", "fail", f"FIRECRACKER_GOLDEN_KERNEL is "
                                f"{'unset' if kernel is None else f'missing: {kernel}'}"))
        else:
            checks.append(_check("kernel", kernel_problem(kernel), f"kernel {kernel}"))
        return checks
    from polydev.vm import image_updates, images

    profile = settings.vm_image_profile
    try:
        found = image_updates.in_use(settings.cache_dir, profile, settings.cli_versions)
    except images.VersionUnresolved as exc:
        return [Check("image", "fail", f"the image's CLI versions (POLYDEV_CLI_VERSIONS): {exc}")]
    others = ", ".join(f"{i.profile} {i.hash}" for i in images.list_images(settings.cache_dir)) or "none"
    if found is None:
        return [Check("image", "fail", f"no {profile} image for the current recipe in {images.images_dir(settings.cache_dir)} "
                                       f"(present: {others}); run `polydev image build --profile {profile}`")]
    return [Check("image", "ok", f"{profile} image {found.hash} in {found.dir}")]


def network_checks(settings: Settings) -> list[Check]:
    mode = settings.network_mode
    if mode == "user" and settings.vm_backend == "firecracker":
        from polydev.vm.backends.firecracker.checks import NEEDS_TAP

        return [Check("network", "fail", NEEDS_TAP)]
    if mode == "user":
        return [Check("network", "ok", "user mode (QEMU user networking, agent on a 127.0.0.1 port): no privileges needed")]
    from polydev.vm.network import NetworkError, pool_pairs

    try:
        slots: str | None = f"{len(pool_pairs(settings.network_ip_pool_start, settings.network_ip_pool_end))} slots"
        pool_problem = None
    except (NetworkError, ValueError) as exc:
        slots, pool_problem = None, f"bad NETWORK_IP_POOL_START..END: {exc}"
    return [
        _check("network", pool_problem, f"tap mode, pool {settings.network_ip_pool_start}..{settings.network_ip_pool_end} "
                                        f"({slots})"),
        _check("root", None if os.geteuid() == 0 else "tap mode needs root (namespaces, TAPs, nftables)",
               "running as root"),
        _check("/dev/net/tun", None if os.path.exists("/dev/net/tun") else "missing: TAP devices cannot be made",
               "present"),
        *(_check(tool, None if shutil.which(tool) else f"`{tool}` is not installed (Debian: {package})",
                 shutil.which(tool) or "") for tool, package in (("nft", "nftables"), ("ip", "iproute2"))),
    ]


def firecracker_check(settings: Settings) -> Check:
    from polydev.vm.backends.firecracker.checks import unavailable_reason

    reason = unavailable_reason(settings.firecracker_binary)
    return _check("firecracker", reason, f"{settings.firecracker_binary} and /dev/kvm are usable",
                  required=settings.vm_backend == "firecracker")


def writable_problem(path: Path) -> str | None:
    """Why `path` (or, when it does not exist yet, the directory it would be made in) is not writable."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def directory_checks(settings: Settings) -> list[Check]:
    return [
        _check("data dir", writable_problem(settings.data_dir), f"{settings.data_dir} is writable"),
        # The cache is written by `polydev image build` only; running VMs just read the image.
        _check("cache dir", writable_problem(settings.cache_dir), f"{settings.cache_dir} is writable", required=False),
    ]


def egress_check(settings: Settings) -> Check:
    """The egress gateway: whether VMs will reach the outside through it, and with which address pool."""
    from polydev.vm.forwards import RELAY_MISSING, relay_path
    from polydev.vm.network import EGRESS_PORT, GATEWAY_IP

    pool = settings.egress_address_pool.describe() or "none (address mode unavailable)"
    if settings.egress_gateway == "off":
        return Check("egress", "warn", "EGRESS_GATEWAY=off: VMs reach only what GUEST_HTTPS_PROXY and "
                                       "VM_GUEST_FORWARDS give them")
    if settings.network_mode == "tap":
        # Each slot DNATs the guests' proxy address to a listener at its own host end: no relay needed.
        where = f"{GATEWAY_IP}:{EGRESS_PORT} (each slot's own listener)"
    elif relay_path() is None:
        return Check("egress", "fail", RELAY_MISSING)
    else:
        where = settings.egress_guest_address
    override = f"; GUEST_HTTPS_PROXY={settings.guest_https_proxy} overrides it" if settings.guest_https_proxy else ""
    return Check("egress", "ok", f"gateway on: guests reach it at {where}; address pool {pool}{override}")


def run_checks(settings: Settings) -> list[Check]:
    return [backend_check(settings), accel_check(settings), *image_checks(settings), *network_checks(settings),
            egress_check(settings), firecracker_check(settings), *directory_checks(settings)]


def can_run_vms(checks: list[Check]) -> bool:
    return all(c.status != "fail" for c in checks)
