"""The engine's Firecracker backend: the process driver (process.py) behind the engine's `Backend`.

It behaves like QemuBackend. The first VM of a size boots the image cold in its network slot; that boot is
frozen into a Full snapshot (pause, PUT /snapshot/create) and the template process is dropped. Every VM of
that size is then a fresh Firecracker that loads the snapshot (PUT /snapshot/load) onto its own copy of the
snapshot's disk, and gets its own agent token through the agent's POST /token. The snapshot cache is the
one both backends keep (polydev.vm.snapshots).

Decisions, and why:
- Network: Firecracker has no user-mode networking, so this backend needs NETWORK_MODE=tap. Each VM's
  Firecracker runs in its slot's namespace (the slot's command prefix, `ip netns exec <slot>`; the jailer
  inherits it) and opens the slot's TAP. Every slot looks the same to a guest (its address and MAC, the
  gateway's address and MAC), which is what lets one snapshot restore in any slot.
- Token: on the kernel command line (`polydev.token`), which the guest's init already reads; Firecracker has
  no fw_cfg. It travels in an API request body, so it is not in the host's process list. The trade-off: a
  guest can read its command line at /proc/cmdline, but only processes already inside the VM the token
  guards. With snapshots (the default) the command line holds the *template's* token, replaced by POST /token
  in every restored VM before it is handed out, so no VM's own token is in a command line or a snapshot.
  MMDS would keep it off /proc/cmdline, but needs a guest-side fetcher before the agent starts and is not
  part of a snapshot (a restore would need the handover anyway). The console copy redacts the token in case a
  kernel prints its command line ("quiet" already keeps it from doing so).
- Disk paths: a snapshot records drive paths. Each VM's disk is `rootfs.ext4` relative to its work directory
  (Firecracker's cwd), or `/rootfs.ext4` in its jail, so the recorded name is every VM's own disk.
- Marker: Firecracker's `--id` (and the jailer's) is the engine's marker, so reconcile finds the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from polydev import protocol as p
from polydev.vm import handover, network, proc
from polydev.vm.backends import BackendUnavailable
from polydev.vm.backends.firecracker.api import socket_alias
from polydev.vm.backends.firecracker.checks import (
    NEEDS_TAP,
    kernel_problem,
    kvm_problem,
    rootfs_for,
    unavailable_reason,
)
from polydev.vm.backends.firecracker.config import (
    DEFAULT_BOOT_ARGS,
    SnapshotFiles,
    VMConfig,
)
from polydev.vm.backends.firecracker.errors import FirecrackerAPIError, FirecrackerError
from polydev.vm.backends.firecracker.jailer import JailerConfig, link_into_jail
from polydev.vm.backends.firecracker.process import FirecrackerProcess
from polydev.vm.disks import clone_disk
from polydev.vm.network import Slot
from polydev.vm.snapshots import (
    SnapshotCache,
    SnapshotDir,
    SnapshotFile,
    Template,
    Workspace,
)
from polydev.vm.types import BackendInfo, Started, VMSpec

log = structlog.get_logger(__name__)

DISK_NAME = "rootfs.ext4"
READY_TIMEOUT_S = 120.0  # cold boot to the agent's READY line (a KVM boot takes about a second)
RESTORE_TIMEOUT_S = 30.0  # snapshot load to the agent taking its token


def boot_args(token: str) -> str:
    from polydev.vm.images import INIT_PATH

    return " ".join([DEFAULT_BOOT_ARGS, "quiet", f"init={INIT_PATH}",
                     f"{p.CMDLINE_ADDR}={network.GUEST_IP}/{network.GUEST_PREFIX}",
                     f"{p.CMDLINE_GATEWAY}={network.GATEWAY_IP}", f"{p.CMDLINE_TOKEN}={token}"])


def agent_url(slot: Slot) -> str:
    return f"http://{slot.ns_ip}:{p.AGENT_PORT}"


@dataclass(frozen=True)
class Snapshot(SnapshotDir):
    """A booted guest frozen with its agent running: VM state, memory, and the disk as it was then."""

    disk = SnapshotFile("disk.ext4")

    @property
    def files(self) -> SnapshotFiles:
        return SnapshotFiles(self.directory / "vm.state", self.directory / "vm.mem")


class FirecrackerBackend:
    name = "firecracker"
    accel = "kvm"  # Firecracker has no software emulation

    def __init__(self, *, binary: Path, kernel: Path, rootfs: Path, snapshots_dir: Path,
                 jailer: JailerConfig | None = None, kvm_device: Path | None = Path("/dev/kvm"),
                 snapshots: bool = True, ready_timeout: float = READY_TIMEOUT_S,
                 restore_timeout: float = RESTORE_TIMEOUT_S) -> None:
        self.binary = binary
        self.kernel = kernel
        self.rootfs = rootfs
        self.snapshots = SnapshotCache(snapshots_dir)
        self.jailer = jailer
        self.kvm_device = kvm_device  # None: not checked (tests drive a fake binary)
        self.use_snapshots = snapshots
        self.ready_timeout = ready_timeout
        self.restore_timeout = restore_timeout
        self._vms: dict[Path, FirecrackerProcess] = {}
        self._version: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> FirecrackerBackend:
        """The backend the settings describe, or BackendUnavailable naming everything that is missing."""
        problems: list[str] = []
        if reason := unavailable_reason(settings.firecracker_binary, kvm_device=None):
            problems.append(reason)
        if reason := kvm_problem():
            problems.append(f"{reason} (Firecracker has no software emulation)")
        kernel: Path | None = settings.firecracker_golden_kernel
        if kernel is None:
            problems.append("FIRECRACKER_GOLDEN_KERNEL is not set (an uncompressed vmlinux built with "
                            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y; see the README)")
        elif reason := kernel_problem(kernel):
            problems.append(reason)
        rootfs = rootfs_for(settings)
        if isinstance(rootfs, str):
            problems.append(rootfs)
        if settings.network_mode != "tap":
            problems.append(NEEDS_TAP)
        jailer = _jailer(settings)
        if isinstance(jailer, str):
            problems.append(jailer)
        if problems:
            raise BackendUnavailable("firecracker: " + "; ".join(problems))
        assert kernel is not None and isinstance(rootfs, Path) and not isinstance(jailer, str)
        return cls(binary=settings.firecracker_binary, kernel=kernel, rootfs=rootfs,
                   snapshots_dir=settings.data_dir / "snapshots" / "firecracker", jailer=jailer)

    @property
    def snapshots_dir(self) -> Path:
        return self.snapshots.root

    def describe(self) -> BackendInfo:
        # A plain root file system, no image manifest: the guest's packages are not known here.
        return BackendInfo(accel=self.accel)

    def console_log(self, workdir: Path) -> Path:
        return workdir / "console.log"

    # -- start ----------------------------------------------------------------------------------------

    async def start(self, spec: VMSpec) -> Started:
        if spec.slot is None:
            raise BackendUnavailable(NEEDS_TAP)
        if self.use_snapshots:
            snapshot = await self.ensure_snapshot(spec, spec.slot)
            vm = await self._restore(spec, spec.slot, snapshot)
        else:
            vm = await self._cold_boot(spec, spec.slot)
        self._vms[spec.workdir] = vm
        pid = vm.vmm_pid or vm.pid
        assert pid is not None
        return Started(pid=pid, agent_url=agent_url(spec.slot), socket_path=str(vm.socket_path))

    def _process(self, workdir: Path, vm_id: str, slot: Slot, redact: tuple[str, ...],
                 deadline: Path | None = None) -> FirecrackerProcess:
        # The jailer, when used, inherits the slot's namespace from the prefix like Firecracker would.
        return FirecrackerProcess(workdir, binary=self.binary, vm_id=vm_id, jailer=self.jailer,
                                  kvm_device=self.kvm_device, command_prefix=slot.command_prefix(),
                                  redact=redact, deadline=deadline)

    def _config(self, disk: Path, vcpus: int, memory_mb: int, token: str) -> VMConfig:
        return VMConfig(kernel=self.kernel, rootfs=disk, vcpus=vcpus, mem_mib=memory_mb, boot_args=boot_args(token),
                        tap=network.TAP, guest_mac=network.GUEST_MAC)

    def _disk_for(self, vm: FirecrackerProcess, disk: Path) -> Path:
        """The VM's disk where Firecracker will open it: in the work directory, or linked into the jail."""
        if vm.chroot is None:
            return disk
        vm.chroot.mkdir(parents=True, exist_ok=True)
        inside = vm.chroot / DISK_NAME
        link_into_jail(disk, inside)
        if self.jailer is not None and os.geteuid() == 0:
            # The jailed VMM runs as uid:gid and writes its disk; a snapshot load opens it without asking us.
            os.chown(inside, self.jailer.uid, self.jailer.gid)
        return inside

    async def _cold_boot(self, spec: VMSpec, slot: Slot) -> FirecrackerProcess:
        disk = spec.workdir / DISK_NAME
        await asyncio.to_thread(clone_disk, self.rootfs, disk)
        vm = self._process(spec.workdir, spec.marker, slot, (spec.token,), spec.deadline)
        try:
            await vm.boot(self._config(self._disk_for(vm, disk), spec.vcpus, spec.memory_mb, spec.token))
            await vm.wait_ready(self.ready_timeout)
        except BaseException:
            await vm.stop()
            raise
        return vm

    async def _restore(self, spec: VMSpec, slot: Slot, snapshot: Snapshot) -> FirecrackerProcess:
        disk = spec.workdir / DISK_NAME
        await asyncio.to_thread(clone_disk, snapshot.disk, disk)
        template_token = snapshot.token
        vm = self._process(spec.workdir, spec.marker, slot, (spec.token, template_token), spec.deadline)
        try:
            self._disk_for(vm, disk)
            await vm.restore(snapshot.files, resume=True)
            await self._hand_over_token(slot, template_token, spec.token, vm)
        except BaseException as exc:
            tail = vm.console_tail()
            await vm.stop()
            if isinstance(exc, FirecrackerAPIError) and exc.path == "/snapshot/load":
                # Refused by this Firecracker (another host CPU, a damaged file): made afresh next time,
                # rather than failing every VM of this size from now on.
                log.warning("firecracker_snapshot_discarded", directory=str(snapshot.directory),
                            reason=exc.fault_message)
                self.snapshots.discard(snapshot.directory)
            if isinstance(exc, FirecrackerError) or not isinstance(exc, Exception):
                raise
            raise FirecrackerError(f"VM {spec.vm_id}: restore failed: {exc}\n" + "\n".join(tail)) from exc
        return vm

    async def _hand_over_token(self, slot: Slot, old: str, new: str, vm: FirecrackerProcess) -> None:
        """The restored agent still holds the template's token: replace it with this VM's own, through the
        slot, from the namespace that plays the host (see polydev.vm.handover)."""
        try:
            await handover.hand_over_async(slot.ns_ip, p.AGENT_PORT, old, new, netns=slot.host_netns,
                                           deadline=time.monotonic() + self.restore_timeout,
                                           alive=lambda: vm.running)
        except handover.HandoverTimeout as exc:
            raise FirecrackerError(f"the restored agent at {agent_url(slot)} {exc}") from None
        except handover.HandoverRefused as exc:
            raise FirecrackerError(f"the restored agent refused its new token ({exc})") from None

    # -- snapshots ------------------------------------------------------------------------------------

    def version(self) -> str:
        if self._version is None:
            out = subprocess.run([str(self.binary), "--version"], check=False, capture_output=True, text=True,
                                 timeout=30)
            self._version = (out.stdout.strip().splitlines() or ["unknown"])[0]
        return self._version

    def snapshot_dir(self, vcpus: int, memory_mb: int) -> Path:
        """Keyed by everything a snapshot depends on: kernel, image, size, Firecracker release, jailed or not
        (a jailed VM names its files from the jail's root), the guest's layout (its address, gateway and init
        are fixed at the template's boot), and the host's CPU and kernel (a snapshot only loads where the
        vCPU state it saved can be restored)."""
        def identity(path: Path) -> list[object]:
            st = path.stat()
            return [str(path.resolve()), st.st_size, st.st_mtime_ns]

        return self.snapshots.directory(identity(self.kernel), identity(self.rootfs), vcpus, memory_mb,
                                        self.version(), self.jailer is not None, boot_args(""), network.GUEST_MAC,
                                        _cpu_model(), os.uname().release)

    async def ensure_snapshot(self, spec: VMSpec, slot: Slot) -> Snapshot:
        """The snapshot for the size of `spec`, made once (see polydev.vm.snapshots) by a template booted in
        `slot`, the slot of the VM that asked first."""
        directory = await asyncio.to_thread(self.snapshot_dir, spec.vcpus, spec.memory_mb)

        async def make(space: Workspace) -> Template:
            return await self._make_snapshot(space, spec, slot)

        return Snapshot(await self.snapshots.ensure_async(directory, make))

    async def _make_snapshot(self, space: Workspace, spec: VMSpec, slot: Slot) -> Template:
        vcpus, memory_mb = spec.vcpus, spec.memory_mb
        space.scratch.mkdir(mode=0o700)
        token = secrets.token_urlsafe(32)  # the template's own; every restored VM replaces it at once
        disk = space.scratch / DISK_NAME
        await asyncio.to_thread(clone_disk, self.rootfs, disk)
        template = self._process(space.scratch, proc.template_marker(spec.marker), slot, (token,))
        frozen = False
        try:
            await template.boot(self._config(self._disk_for(template, disk), vcpus, memory_mb, token))
            await template.wait_ready(self.ready_timeout)
            await template.snapshot(Snapshot(space.work).files, resume=False)
            frozen = True
        finally:
            await template.stop()
            if not frozen:  # the template's directory goes: its console goes where the engine keeps the VM's
                self._keep_template_console(template.console_log, spec.workdir)
        made = Snapshot(space.work)
        os.replace(disk, made.disk)
        os.chmod(made.disk, 0o400)  # frozen: every restored VM's disk is a copy of it
        return Template(token, {"vcpus": vcpus, "memory_mb": memory_mb, "firecracker": self.version(),
                                "kernel": str(self.kernel), "rootfs": str(self.rootfs)})

    def _keep_template_console(self, console: Path, workdir: Path) -> None:
        with open(self.console_log(workdir), "ab") as out:
            out.write(b"=== snapshot template boot ===\n")
            with contextlib.suppress(OSError):
                out.write(console.read_bytes())

    # -- stop -----------------------------------------------------------------------------------------

    async def stop(self, pid: int | None, workdir: Path) -> None:
        vm = self._vms.pop(workdir, None)
        if vm is not None:
            await vm.stop()
        elif pid is not None:
            # A VM of an earlier engine process: its marker holds the VM id, the work directory's name.
            await asyncio.to_thread(proc.kill_vm_process, pid, workdir.name)
        # What a crash leaves that the engine does not know of (a driver removes its own on stop): the jail,
        # and the short alias of a socket too deep to be reached by its path.
        sockets = [workdir / FirecrackerProcess.SOCKET_NAME]
        if self.jailer is not None:
            for jail in (self.jailer.chroot_base_dir / self.binary.name).glob(f"*-{workdir.name}"):
                sockets.append(jail / "root" / FirecrackerProcess.SOCKET_NAME)
                shutil.rmtree(jail, ignore_errors=True)
        for socket in sockets:
            if (alias := socket_alias(socket)) is not None:
                alias.unlink(missing_ok=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def _jailer(settings: Any) -> JailerConfig | str | None:
    binary: Path | None = settings.firecracker_jailer
    if binary is None:
        return None
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"FIRECRACKER_JAILER {binary} is not an executable file"
    uid, gid = settings.firecracker_jailer_uid, settings.firecracker_jailer_gid
    if uid is None or gid is None:
        return "FIRECRACKER_JAILER needs FIRECRACKER_JAILER_UID and FIRECRACKER_JAILER_GID (not root)"
    # --new-pid-ns: the VMM cannot see or signal anything on the host but itself.
    return JailerConfig(binary=binary, uid=uid, gid=gid, chroot_base_dir=settings.firecracker_base, new_pid_ns=True)
