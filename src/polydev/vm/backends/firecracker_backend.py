"""The engine's Firecracker backend: the process driver of firecracker.py behind the engine's `Backend`.

It behaves like QemuBackend. The first VM of a size boots the image cold in its network slot; that boot is
frozen into a Full snapshot (pause, PUT /snapshot/create) and the template process is dropped. Every VM of
that size is then a fresh Firecracker that loads the snapshot (PUT /snapshot/load) onto its own copy of the
snapshot's disk, and gets its own agent token through the agent's POST /token.

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
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from polydev import protocol as p
from polydev.vm import handover, network
from polydev.vm.backends import BackendUnavailable
from polydev.vm.backends.firecracker import (
    DEFAULT_BOOT_ARGS,
    FirecrackerAPIError,
    FirecrackerError,
    FirecrackerProcess,
    JailerConfig,
    SnapshotFiles,
    VMConfig,
    kernel_problem,
    kvm_problem,
    link_into_jail,
    process_gone,
    socket_alias,
    unavailable_reason,
)
from polydev.vm.disks import clone_disk
from polydev.vm.engine import Started, VMSpec
from polydev.vm.network import Slot

log = structlog.get_logger(__name__)

DISK_NAME = "rootfs.ext4"
READY_TIMEOUT_S = 120.0  # cold boot to the agent's READY line (a KVM boot takes about a second)
RESTORE_TIMEOUT_S = 30.0  # snapshot load to the agent taking its token
NEEDS_TAP = ("Firecracker has no user-mode networking: set NETWORK_MODE=tap (needs root; each VM gets a TAP "
             "in its own network slot)")


def boot_args(token: str) -> str:
    from polydev.vm.images import INIT_PATH

    return " ".join([DEFAULT_BOOT_ARGS, "quiet", f"init={INIT_PATH}",
                     f"{p.CMDLINE_ADDR}={network.GUEST_IP}/{network.GUEST_PREFIX}",
                     f"{p.CMDLINE_GATEWAY}={network.GATEWAY_IP}", f"{p.CMDLINE_TOKEN}={token}"])


def agent_url(slot: Slot) -> str:
    return f"http://{slot.ns_ip}:{p.AGENT_PORT}"


@dataclass(frozen=True)
class Snapshot:
    """A booted guest frozen with its agent running: VM state, memory, and the disk as it was then."""

    directory: Path

    @property
    def files(self) -> SnapshotFiles:
        return SnapshotFiles(self.directory / "vm.state", self.directory / "vm.mem")

    @property
    def disk(self) -> Path:
        return self.directory / "disk.ext4"

    @property
    def token(self) -> str:
        return (self.directory / "template.token").read_text().strip()


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
        self.snapshots_dir = snapshots_dir
        self.jailer = jailer
        self.kvm_device = kvm_device  # None: not checked (tests drive a fake binary)
        self.use_snapshots = snapshots
        self.ready_timeout = ready_timeout
        self.restore_timeout = restore_timeout
        self._vms: dict[Path, FirecrackerProcess] = {}
        self._snapshot_locks: dict[str, asyncio.Lock] = {}
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

    def console_log(self, workdir: Path) -> Path:
        return workdir / "console.log"

    # -- start ----------------------------------------------------------------------------------------

    async def start(self, spec: VMSpec) -> Started:
        if spec.slot is None:
            raise BackendUnavailable(NEEDS_TAP)
        if self.use_snapshots:
            snapshot = await self.ensure_snapshot(spec, spec.slot)
            proc = await self._restore(spec, spec.slot, snapshot)
        else:
            proc = await self._cold_boot(spec, spec.slot)
        self._vms[spec.workdir] = proc
        pid = proc.vmm_pid or proc.pid
        assert pid is not None
        return Started(pid=pid, agent_url=agent_url(spec.slot), socket_path=str(proc.socket_path))

    def _process(self, workdir: Path, vm_id: str, slot: Slot, redact: tuple[str, ...]) -> FirecrackerProcess:
        # The jailer, when used, inherits the slot's namespace from the prefix like Firecracker would.
        return FirecrackerProcess(workdir, binary=self.binary, vm_id=vm_id, jailer=self.jailer,
                                  kvm_device=self.kvm_device, command_prefix=slot.command_prefix(),
                                  redact=redact)

    def _config(self, disk: Path, vcpus: int, memory_mb: int, token: str) -> VMConfig:
        return VMConfig(kernel=self.kernel, rootfs=disk, vcpus=vcpus, mem_mib=memory_mb, boot_args=boot_args(token),
                        tap=network.TAP, guest_mac=network.GUEST_MAC)

    def _disk_for(self, proc: FirecrackerProcess, disk: Path) -> Path:
        """The VM's disk where Firecracker will open it: in the work directory, or linked into the jail."""
        if proc.chroot is None:
            return disk
        proc.chroot.mkdir(parents=True, exist_ok=True)
        inside = proc.chroot / DISK_NAME
        link_into_jail(disk, inside)
        if self.jailer is not None and os.geteuid() == 0:
            # The jailed VMM runs as uid:gid and writes its disk; a snapshot load opens it without asking us.
            os.chown(inside, self.jailer.uid, self.jailer.gid)
        return inside

    async def _cold_boot(self, spec: VMSpec, slot: Slot) -> FirecrackerProcess:
        disk = spec.workdir / DISK_NAME
        await asyncio.to_thread(clone_disk, self.rootfs, disk)
        proc = self._process(spec.workdir, spec.marker, slot, (spec.token,))
        try:
            await proc.boot(self._config(self._disk_for(proc, disk), spec.vcpus, spec.memory_mb, spec.token))
            await proc.wait_ready(self.ready_timeout)
        except BaseException:
            await proc.stop()
            raise
        return proc

    async def _restore(self, spec: VMSpec, slot: Slot, snapshot: Snapshot) -> FirecrackerProcess:
        disk = spec.workdir / DISK_NAME
        await asyncio.to_thread(clone_disk, snapshot.disk, disk)
        template_token = snapshot.token
        proc = self._process(spec.workdir, spec.marker, slot, (spec.token, template_token))
        try:
            self._disk_for(proc, disk)
            await proc.restore(snapshot.files, resume=True)
            await self._hand_over_token(slot, template_token, spec.token, proc)
        except BaseException as exc:
            tail = proc.console_tail()
            await proc.stop()
            if isinstance(exc, FirecrackerAPIError) and exc.path == "/snapshot/load":
                # Refused by this Firecracker (another host CPU, a damaged file): made afresh next time,
                # rather than failing every VM of this size from now on.
                log.warning("firecracker_snapshot_discarded", directory=str(snapshot.directory),
                            reason=exc.fault_message)
                shutil.rmtree(snapshot.directory, ignore_errors=True)
            if isinstance(exc, FirecrackerError) or not isinstance(exc, Exception):
                raise
            raise FirecrackerError(f"VM {spec.vm_id}: restore failed: {exc}\n" + "\n".join(tail)) from exc
        return proc

    async def _hand_over_token(self, slot: Slot, old: str, new: str, proc: FirecrackerProcess) -> None:
        """The restored agent still holds the template's token: replace it with this VM's own, through the
        slot, from the namespace that plays the host (see polydev.vm.handover)."""
        deadline = time.monotonic() + self.restore_timeout
        while True:
            try:
                await asyncio.to_thread(handover.rotate_token, slot.ns_ip, p.AGENT_PORT, old, new,
                                        netns=slot.host_netns,
                                        timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                return
            except OSError as exc:
                # The guest's path through the slot comes up a moment after the resume.
                if not proc.running or time.monotonic() > deadline:
                    raise FirecrackerError(f"the restored agent at {agent_url(slot)} did not answer "
                                           f"({type(exc).__name__})") from None
                await asyncio.sleep(0.01)
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

        key = json.dumps([identity(self.kernel), identity(self.rootfs), vcpus, memory_mb, self.version(),
                          self.jailer is not None, boot_args(""), network.GUEST_MAC, _cpu_model(),
                          os.uname().release])
        return self.snapshots_dir / hashlib.sha256(key.encode()).hexdigest()[:16]

    async def ensure_snapshot(self, spec: VMSpec, slot: Slot) -> Snapshot:
        """The snapshot for the size of `spec`, made once (one maker per process and, by a file lock, per
        machine) by a template booted in `slot`, the slot of the VM that asked first."""
        directory = await asyncio.to_thread(self.snapshot_dir, spec.vcpus, spec.memory_mb)
        if (directory / "meta.json").exists():
            return Snapshot(directory)
        async with self._snapshot_locks.setdefault(directory.name, asyncio.Lock()):
            if (directory / "meta.json").exists():
                return Snapshot(directory)
            self.snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Opening a local lock file is instant; only the wait for the lock goes to a thread.
            with open(self.snapshots_dir / f".lock-{directory.name}", "w") as lock:  # noqa: ASYNC230
                await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
                if (directory / "meta.json").exists():
                    return Snapshot(directory)
                return await self._make_snapshot(directory, spec, slot)

    async def _make_snapshot(self, directory: Path, spec: VMSpec, slot: Slot) -> Snapshot:
        vcpus, memory_mb = spec.vcpus, spec.memory_mb
        work = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        (work / "boot").mkdir(parents=True, mode=0o700)
        # The engine's marker with another id: a crash mid-snapshot leaves nothing that reconcile misses.
        template_id = spec.marker.rsplit("-", 5)[0] + "-" + str(uuid.uuid4())
        token = secrets.token_urlsafe(32)  # the template's own; every restored VM replaces it at once
        disk = work / "boot" / DISK_NAME
        started = time.monotonic()
        try:
            await asyncio.to_thread(clone_disk, self.rootfs, disk)
            proc = self._process(work / "boot", template_id, slot, (token,))
            frozen = False
            try:
                await proc.boot(self._config(self._disk_for(proc, disk), vcpus, memory_mb, token))
                await proc.wait_ready(self.ready_timeout)
                await proc.snapshot(Snapshot(work).files, resume=False)
                frozen = True
            finally:
                await proc.stop()
                if not frozen:  # the template's directory goes: its console goes where the engine keeps the VM's
                    self._keep_template_console(proc.console_log, spec.workdir)
            os.replace(disk, Snapshot(work).disk)
            os.chmod(Snapshot(work).disk, 0o400)  # frozen: every restored VM's disk is a copy of it
            fd = os.open(work / "template.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            (work / "meta.json").write_text(json.dumps({
                "vcpus": vcpus, "memory_mb": memory_mb, "firecracker": self.version(),
                "kernel": str(self.kernel), "rootfs": str(self.rootfs), "seconds": round(time.monotonic() - started, 2)}))
            shutil.rmtree(work / "boot", ignore_errors=True)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(work, directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("firecracker_snapshot_made", vcpus=vcpus, memory_mb=memory_mb, directory=str(directory),
                 seconds=round(time.monotonic() - started, 2))
        return Snapshot(directory)

    def _keep_template_console(self, console: Path, workdir: Path) -> None:
        with open(self.console_log(workdir), "ab") as out:
            out.write(b"=== snapshot template boot ===\n")
            with contextlib.suppress(OSError):
                out.write(console.read_bytes())

    # -- stop -----------------------------------------------------------------------------------------

    async def stop(self, pid: int | None, workdir: Path) -> None:
        proc = self._vms.pop(workdir, None)
        if proc is not None:
            await proc.stop()
        elif pid is not None:
            # A VM of an earlier engine process: no driver of ours, just the process (found by its marker,
            # which holds the VM id, the work directory's name).
            await asyncio.to_thread(kill_vm_process, pid, workdir.name)
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


def rootfs_for(settings: Any) -> Path | str:
    """FIRECRACKER_GOLDEN_ROOTFS, else the built image's root file system; a string says what is missing."""
    if settings.firecracker_golden_rootfs is not None:
        rootfs: Path = settings.firecracker_golden_rootfs
        return rootfs if rootfs.is_file() else f"FIRECRACKER_GOLDEN_ROOTFS {rootfs} does not exist"
    from polydev.vm import images

    image = images.find(settings.cache_dir, images.recipe_for(settings.vm_image_profile))
    if image is None:
        return (f"no {settings.vm_image_profile} image in {settings.cache_dir} (run `polydev image build "
                f"--profile {settings.vm_image_profile}` or set FIRECRACKER_GOLDEN_ROOTFS)")
    return image.rootfs


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


def kill_vm_process(pid: int, vm_key: str, wait_s: float = 10.0) -> None:
    """SIGKILL the process group of `pid` if its command line names `vm_key` (a stale pid, reused by some
    other process since, is left alone), and wait until it is gone."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if vm_key.encode() not in cmdline:
        return
    try:
        group = os.getpgid(pid)
        if group == os.getpgrp():  # never our own group; VM processes are started in a session of their own
            os.kill(pid, signal.SIGKILL)
        else:
            os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if process_gone(pid):
                return
        time.sleep(0.01)

