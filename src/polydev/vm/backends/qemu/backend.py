"""The engine's QEMU backend. The first VM of a size boots cold, and its boot is frozen into a snapshot
(QEMU migration to a file, taken with the agent running); every later VM of that size is a restore of that
snapshot onto a fresh overlay over the snapshot's disk, with its own token handed over after the restore.
Snapshots are kept per network mode: in tap mode every slot gives the guest the same address (and gateway),
so a template booted in the first VM's slot restores into any slot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from polydev.vm import lifetime, proc
from polydev.vm.backends.qemu import snapshot
from polydev.vm.backends.qemu.machine import QemuVM, free_port, kvm_available, kvm_usable
from polydev.vm.backends.qemu.errors import VMError
from polydev.vm.backends.qemu.snapshot import Snapshot
from polydev.vm.forwards import RELAY_MISSING, GuestForward, relay_path
from polydev.vm.images import Image
from polydev.vm.network import Slot
from polydev.vm.snapshots import SnapshotCache, Template, Workspace
from polydev.vm.types import BackendInfo, Started, VMSpec

log = logging.getLogger(__name__)
# A hibernated VM's files beside its overlay: its memory and device state, and what it was started with.
HIBERNATED_STATE, HIBERNATED_META = "hibernated.state", "hibernated.json"
# What a VM's disk is made of (its overlay's backing file) and its size, written at every start: a VM lost with
# its server can be kept as a disk to boot cold (`keep_disk`).
DISK_META = "disk.json"


class QemuBackend:
    name = "qemu"

    def __init__(self, image: Image, snapshots_dir: Path, *, accel: str = "auto", snapshots: bool = True,
                 guest_forwards: tuple[GuestForward, ...] = (), egress_guest_address: str | None = None) -> None:
        self.image = image
        # Where a guest reaches the egress gateway (IP:PORT), for VMs the engine gives a gateway socket.
        self.egress_guest_address = egress_guest_address
        # Given to every VM, template included: a forward is on QEMU's command line, not in the snapshot, so
        # restores get the forwards configured now whatever the template had.
        self.guest_forwards = guest_forwards
        self.snapshots = SnapshotCache(snapshots_dir)
        self.accel_wanted = accel
        self.use_snapshots = snapshots
        self._vms: dict[Path, QemuVM] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> QemuBackend:
        from polydev.vm import image_updates, images
        from polydev.vm.backends import BackendUnavailable

        if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
            raise BackendUnavailable("QEMU is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)")
        try:
            image = image_updates.in_use(settings.cache_dir, settings.vm_image_profile, settings.cli_versions)
        except images.VersionUnresolved as exc:
            raise BackendUnavailable(f"the image's CLI versions (POLYDEV_CLI_VERSIONS): {exc}") from None
        if image is None:
            raise BackendUnavailable(f"no {settings.vm_image_profile} image in {settings.cache_dir}: run "
                                     f"`polydev image build --profile {settings.vm_image_profile}`")
        forwards = tuple(settings.vm_guest_forwards)
        egress = settings.egress_gateway == "on" and settings.network_mode == "user"
        if (forwards or egress) and relay_path() is None:
            raise BackendUnavailable(RELAY_MISSING)
        if forwards and settings.network_mode != "user":
            log.warning("VM_GUEST_FORWARDS applies to user networking only; NETWORK_MODE=%s ignores it",
                        settings.network_mode)
        return cls(image, settings.data_dir / "snapshots", guest_forwards=forwards,
                   egress_guest_address=settings.egress_guest_address if egress else None)

    @property
    def snapshots_dir(self) -> Path:
        return self.snapshots.root

    @property
    def accel(self) -> str:
        """kvm or tcg once a VM has booted here; until then what will be tried first."""
        usable = kvm_usable()
        if usable is False or not kvm_available():
            return "tcg"
        return "kvm" if usable else "kvm (untested)"

    def use_image(self, image: Image) -> None:
        """New VMs start from `image` (its own snapshot, made by the next VM of a size); running and
        hibernated VMs keep theirs (their disks' base and their wake, from their metadata)."""
        self.image = image

    def describe(self) -> BackendInfo:
        packages = self.image.manifest.get("debian_packages", {})
        clis = self.image.manifest.get("clis", {})
        return BackendInfo(accel=self.accel, image_packages=frozenset(packages if isinstance(packages, dict) else ()),
                           image_clis={str(k): str(v) for k, v in clis.items()} if isinstance(clis, dict) else {},
                           image_hash=self.image.hash,
                           egress_guest_address=self.egress_guest_address)

    def console_log(self, workdir: Path) -> Path:
        return workdir / "console.log"

    async def start(self, spec: VMSpec) -> Started:
        work = asyncio.ensure_future(asyncio.to_thread(self._start, spec))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped: left alone, it would go on to start a VM nobody will ever stop. So
            # the VM's deadline is withdrawn (its supervisor then kills QEMU, or refuses to start it), the
            # thread is waited for, and whatever it still managed to start is stopped before the cancel goes on.
            if spec.deadline is not None:
                lifetime.withdraw(spec.deadline)
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({work})
            if not work.cancelled() and work.exception() is None:
                await self.stop(work.result().pid, spec.workdir)
            raise

    def _start(self, spec: VMSpec) -> Started:
        # Only login-browser VMs run a VNC server; on the command line, not in the snapshot, so restores get it.
        vnc_port = free_port() if spec.purpose == "browser" and spec.slot is None else 0
        egress = ((self.egress_guest_address, spec.egress_socket)
                  if self.egress_guest_address and spec.egress_socket is not None else None)
        made = (self.ensure_snapshot(spec.vcpus, spec.memory_mb, spec.marker, spec.slot)
                if self.use_snapshots else None)
        if made is None:
            vm = QemuVM(self.image, spec.workdir, token=spec.token, vcpus=spec.vcpus, memory_mb=spec.memory_mb,
                        accel=self.accel_wanted, name=spec.marker, slot=spec.slot,
                        guest_forwards=self.guest_forwards, egress=egress, deadline=spec.deadline)
            vm.vnc_port = vnc_port
            vm.start()
        else:
            vm = QemuVM(self.image, spec.workdir, token=made.token, vcpus=spec.vcpus,
                        memory_mb=spec.memory_mb, accel=made.accel, name=spec.marker, slot=spec.slot,
                        backing=(made.disk, "qcow2"), guest_forwards=self.guest_forwards, egress=egress,
                        ram_file=(made.ram, False), overlay_from=made.empty_overlay, deadline=spec.deadline)
            vm.vnc_port = vnc_port
            vm.restore(made.state, made.accel, spec.token)
        assert vm.pid is not None
        _write_disk_meta(vm)
        with self._lock:
            self._vms[spec.workdir] = vm
        return Started(pid=vm.pid, agent_url=vm.agent_url, agent_port=vm.port,
                       socket_path=str(vm.qmp_socket), vnc_address=("127.0.0.1", vnc_port) if vnc_port else None)

    def snapshot_dir(self, vcpus: int, memory_mb: int, network: str = "user") -> Path:
        """Where the snapshot of this size and network mode lives."""
        return self.snapshots.directory(*snapshot.snapshot_key(self.image, vcpus, memory_mb, network))

    def ensure_snapshot(self, vcpus: int, memory_mb: int, marker: str, slot: Slot | None = None) -> Snapshot:
        """The snapshot for this size and network mode, made once (see polydev.vm.snapshots) by a cold boot if
        it does not exist. In tap mode the template boots in `slot` (the slot of the VM being created, which
        waits for it anyway): every slot looks the same to a guest. Blocking."""
        def make(space: Workspace) -> Template:
            return snapshot.make(space, self.image, vcpus=vcpus, memory_mb=memory_mb, accel=self.accel_wanted,
                                 name=proc.template_marker(marker), slot=slot, guest_forwards=self.guest_forwards)

        directory = self.snapshot_dir(vcpus, memory_mb, "tap" if slot else "user")
        return Snapshot.load(self.snapshots.ensure(directory, make))

    def _vm(self, workdir: Path) -> QemuVM | None:
        with self._lock:
            vm = self._vms.get(workdir)
        return vm if vm is not None and vm.alive() else None

    def io_paused(self, workdir: Path) -> bool:
        """Whether QEMU paused this VM on a disk error (ENOSPC: its overlay could not grow)."""
        vm = self._vm(workdir)
        try:
            return vm is not None and vm.qmp("query-status")["status"] == "io-error"
        except Exception:  # noqa: BLE001 - QEMU gone or its QMP socket busy: not known to be paused
            return False

    def resume(self, workdir: Path) -> bool:
        """Let a VM paused on a disk error go on (its failed write is retried)."""
        vm = self._vm(workdir)
        try:
            return vm is not None and vm.qmp("cont") == {}
        except Exception:  # noqa: BLE001
            log.warning("could not resume the VM in %s", workdir, exc_info=True)
            return False

    # -- hibernation (polydev.vm.hibernation) -------------------------------------------------------------
    def hibernate(self, workdir: Path, memory: bool = True) -> None:
        """Save the running VM of `workdir` to files there (its memory and device state, and what it was
        started with) and end its process; its overlay stays. Without `memory` only the disk is kept (the
        caller has had the guest sync it): QEMU quits, flushing the overlay, and `wake` boots it cold.
        Blocking."""
        vm = self._vm(workdir)
        if vm is None:
            raise VMError(f"no running VM in {workdir}")
        if memory:
            vm.hibernate(workdir / HIBERNATED_STATE)
        else:
            vm.power_off()
        meta = {**_disk_meta(vm), "memory": memory, "ram_file": str(vm.ram_file[0]) if vm.ram_file else None}
        (workdir / HIBERNATED_META).write_text(json.dumps(meta))
        with self._lock:
            self._vms.pop(workdir, None)

    def keep_disk(self, workdir: Path) -> bool:
        """A VM whose process is gone (its server died), kept as hibernated without memory: its overlay is
        booted cold by the next `wake`. False when there is no disk to keep."""
        try:
            disk = json.loads((workdir / DISK_META).read_text())
        except (OSError, ValueError):
            return False
        if not (workdir / "disk.qcow2").exists():
            return False
        (workdir / HIBERNATED_STATE).unlink(missing_ok=True)
        (workdir / HIBERNATED_META).write_text(json.dumps({**disk, "memory": False, "ram_file": None}))
        return True

    def hibernated(self, workdir: Path) -> bool:
        try:
            meta = json.loads((workdir / HIBERNATED_META).read_text())
        except (OSError, ValueError):
            return False
        return not meta.get("memory", True) or (workdir / HIBERNATED_STATE).exists()

    async def wake(self, spec: VMSpec) -> Started:
        """Start the VM hibernated in `spec.workdir` again, as it was; its agent keeps its token (spec.token)."""
        return await asyncio.to_thread(self._wake, spec)

    def _wake(self, spec: VMSpec) -> Started:
        meta = json.loads((spec.workdir / HIBERNATED_META).read_text())
        egress = ((self.egress_guest_address, spec.egress_socket)
                  if self.egress_guest_address and spec.egress_socket is not None else None)
        backing = (Path(meta["backing"][0]), meta["backing"][1]) if meta["backing"] else None
        # It wakes on the image it was started from (its kernel, its disk's base), even after the server
        # switched to a newer one (vm/image_updates.py); that one only if its own is gone.
        image = (Image.load(Path(meta["image"])) if meta.get("image") else None) or self.image
        vm = QemuVM(image, spec.workdir, token=spec.token, vcpus=meta["vcpus"], memory_mb=meta["memory_mb"],
                    accel=meta["accel"], name=spec.marker, slot=spec.slot, backing=backing,
                    guest_forwards=self.guest_forwards, egress=egress, deadline=spec.deadline,
                    ram_file=(Path(meta["ram_file"]), False) if meta["ram_file"] else None)
        vm.vnc_port = free_port() if meta["vnc"] and spec.slot is None else 0
        if meta.get("memory", True):
            vm.resume_from(spec.workdir / HIBERNATED_STATE, meta["accel"])
        else:
            vm.boot_from_disk(meta["accel"])
        (spec.workdir / HIBERNATED_STATE).unlink(missing_ok=True)  # (RAM-sized: not kept once running)
        (spec.workdir / HIBERNATED_META).unlink(missing_ok=True)
        assert vm.pid is not None
        _write_disk_meta(vm)
        with self._lock:
            self._vms[spec.workdir] = vm
        return Started(pid=vm.pid, agent_url=vm.agent_url, agent_port=vm.port, socket_path=str(vm.qmp_socket),
                       vnc_address=("127.0.0.1", vm.vnc_port) if vm.vnc_port else None)

    async def stop(self, pid: int | None, workdir: Path) -> None:
        await asyncio.to_thread(self._stop, pid, workdir)

    def _stop(self, pid: int | None, workdir: Path) -> None:
        with self._lock:
            vm = self._vms.pop(workdir, None)
        if vm is not None:
            vm.stop()
        elif pid is not None:
            # A VM of an earlier engine process: no QMP session or console reader of ours, just the process,
            # whose marker holds the VM id (the work directory's name).
            proc.kill_vm_process(pid, workdir.name)


def _disk_meta(vm: QemuVM) -> dict[str, Any]:
    """What a VM's disk is and the machine it ran in: enough to start it again from the overlay."""
    return {"vcpus": vm.vcpus, "memory_mb": vm.memory_mb, "accel": vm.accel, "vnc": bool(vm.vnc_port),
            "backing": [str(vm.backing[0]), vm.backing[1]] if vm.backing else None, "image": str(vm.image.dir)}


def _write_disk_meta(vm: QemuVM) -> None:
    (vm.workdir / DISK_META).write_text(json.dumps(_disk_meta(vm)))
