"""`FirecrackerProcess`: one Firecracker process and the VM inside it.

Spawns `firecracker` (optionally under the `jailer`) with argument lists only, waits for the API socket with
a bounded poll that also watches for the process dying, configures and starts a VM or restores a snapshot,
and on any failure kills the process group and removes the socket and jail. Its stdout (the guest's serial
console) is copied to a file, with secrets redacted, and watched for the agent's READY line (console.py).
What it boots and where snapshots go are the specs in config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from polydev import protocol as p
from polydev.vm import lifetime, proc
from polydev.vm.backends.firecracker.api import (
    BootSource,
    Drive,
    FirecrackerClient,
    Logger,
    LogLevel,
    MachineConfig,
    MemoryBackend,
    NetworkInterface,
    NetworkOverride,
    SnapshotCreate,
    SnapshotLoad,
    accepts,
    socket_alias,
)
from polydev.vm.backends.firecracker.checks import check_available, kernel_problem
from polydev.vm.backends.firecracker.config import DriveSpec, SnapshotFiles, VMConfig
from polydev.vm.backends.firecracker.console import Console
from polydev.vm.backends.firecracker.errors import (
    FirecrackerAPIError,
    FirecrackerError,
    FirecrackerProcessError,
    FirecrackerUnavailable,
)
from polydev.vm.backends.firecracker.jailer import JailerConfig, link_into_jail


class FirecrackerProcess:
    """One Firecracker process and the VM inside it. Use `boot()` or `restore()`, then `stop()` (or use it
    as an async context manager). Any failure while coming up leaves nothing behind."""

    SOCKET_NAME = "firecracker.socket"

    def __init__(self, workdir: Path, *, binary: Path, vm_id: str | None = None,
                 jailer: JailerConfig | None = None, kvm_device: Path | None = Path("/dev/kvm"),
                 socket_timeout: float = 10.0, api_timeout: float = 10.0,
                 ready_marker: str | None = p.READY_MARKER, log_level: LogLevel | None = "Warning",
                 command_prefix: Sequence[str] = (), redact: Sequence[str] = (), deadline: Path | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.vm_id = vm_id or str(uuid.uuid4())
        self.jailer = jailer
        self.kvm_device = kvm_device  # None: do not check KVM (tests drive a fake binary)
        self.socket_timeout = socket_timeout
        self.api_timeout = api_timeout
        # Keep it at Warning or above in production: at Info and below Firecracker may log request bodies.
        self.log_level = log_level  # None: Firecracker logs to stdout, i.e. into the console log
        # Runs before Firecracker, e.g. `ip netns exec <slot>` so it opens the TAP in the VM's network slot.
        self.command_prefix = list(command_prefix)
        # The deadline file its supervisor watches (polydev.vm.lifetime): the engine's; None: one of its own,
        # without expiry.
        self.deadline = deadline
        self._console = Console(workdir / "console.log", ready_marker,
                                 tuple(s.encode() for s in redact if s))
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._client: FirecrackerClient | None = None
        self._exposed: dict[Path, str] = {}
        self._killed = False

    # -- paths ------------------------------------------------------------------------------------------

    @property
    def chroot(self) -> Path | None:
        return self.jailer.chroot_dir(self.binary, self.vm_id) if self.jailer else None

    @property
    def api_socket(self) -> Path:
        """Where Firecracker creates its API socket: in its cwd (the work directory) or, jailed, at "/<name>" in
        its chroot. It is given that short name, so it can bind however deep the directory is."""
        return (self.chroot or self.workdir) / self.SOCKET_NAME

    @property
    def socket_path(self) -> Path:
        """Where we connect: the socket itself, or a short symlink to it when its full path is longer than a
        Unix socket address may be (a deep data directory, or a jail id as long as the engine's markers)."""
        return socket_alias(self.api_socket) or self.api_socket

    @property
    def console_log(self) -> Path:
        return self._console.path

    @property
    def vmm_log(self) -> Path:
        return self.workdir / "firecracker.log"

    @property
    def client(self) -> FirecrackerClient:
        if self._client is None:
            raise FirecrackerError("Firecracker is not running")
        return self._client

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def vmm_pid(self) -> int | None:
        """The Firecracker process itself: our child, or with the jailer's --new-pid-ns the pid it recorded."""
        if self._proc is None or not (self.jailer and self.jailer.new_pid_ns and self.chroot):
            return self.pid
        try:
            return int((self.chroot / f"{self.binary.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        if self._proc is None or self._killed:
            return False
        if self._proc.returncode is None:
            return True
        # The jailer may have handed off to its --new-pid-ns child, which stays in our process group.
        try:
            os.killpg(self._proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return self._jailer_handed_off()

    def argv(self) -> list[str]:
        if self.jailer:
            argv = self.jailer.argv(self.vm_id, self.binary, ["--api-sock", "/" + self.SOCKET_NAME])
        else:
            argv = [str(self.binary), "--id", self.vm_id, "--api-sock", self.SOCKET_NAME]  # in its cwd
        return [*self.command_prefix, *argv]

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def boot(self, config: VMConfig) -> None:
        """Spawn Firecracker, configure the VM and start it. Returns once Firecracker accepted InstanceStart;
        `wait_ready()` then waits for the guest."""
        self._check_unused()
        if (problem := kernel_problem(config.kernel)) is not None:
            raise FirecrackerUnavailable(problem)
        await self._guarded(self._boot(config))

    async def restore(self, snapshot: SnapshotFiles, *, resume: bool = True,
                      network_overrides: Mapping[str, str] | None = None, track_dirty_pages: bool = False) -> None:
        """Spawn a fresh Firecracker and load `snapshot` into it. `network_overrides` maps iface_id to the
        TAP this VM uses now (the snapshot remembers the TAP it was taken with)."""
        self._check_unused()
        await self._guarded(self._restore(snapshot, resume, network_overrides or {}, track_dirty_pages))

    async def snapshot(self, dest: SnapshotFiles, *, diff: bool = False, resume: bool = True) -> SnapshotFiles:
        """Pause, write a snapshot to `dest`, and resume (unless told not to). The VM stays usable on failure."""
        client = self.client
        await client.pause()
        try:
            target = self._snapshot_target(dest)
            await client.create_snapshot(SnapshotCreate(snapshot_path=str(target.state),
                                                        mem_file_path=str(target.memory),
                                                        snapshot_type="Diff" if diff else "Full"))
            self._collect_snapshot(dest)
        except BaseException:
            with contextlib.suppress(FirecrackerError):
                await client.resume()  # best effort: the error that matters is the one being raised
            raise
        if resume:
            await client.resume()
        return dest

    async def pause(self) -> None:
        await self.client.pause()

    async def resume(self) -> None:
        await self.client.resume()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the ready marker appears on the console; raise if Firecracker exits or time runs out."""
        if self._console.marker is None:
            raise FirecrackerError("this driver was created without a ready_marker to wait for")
        ready = asyncio.ensure_future(self._console.ready.wait())
        closed = asyncio.ensure_future(self._console.closed.wait())
        try:
            await asyncio.wait({ready, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()
        if self._console.ready.is_set():
            return
        reason = "Firecracker exited" if self._console.closed.is_set() else f"not ready after {timeout:g} s"
        raise FirecrackerProcessError(f"VM {self.vm_id}: {reason}", self.console_tail())

    def console_tail(self) -> list[str]:
        return list(self._console.tail)

    async def stop(self) -> None:
        """Kill Firecracker (its whole process group), close the client, remove the socket and the jail.
        Safe to call more than once and on a half-started process. The console log is kept."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        handed_off: int | None = None
        if self._proc is not None and not self._killed:
            # Once only: after the group is gone its number may be reused by someone else's group.
            self._killed = True
            vmm = self.vmm_pid
            handed_off = vmm if vmm != self._proc.pid else None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # the group: the jailer's --new-pid-ns child too
            await self._proc.wait()
        if self._pump is not None:
            # EOF comes once every holder of the pipe is dead; bounded in case something left the group.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pump, timeout=5.0)
            self._pump = None
        if handed_off is not None:
            # Not our child, so not reaped by the wait above: its pipe closes a moment before it is gone.
            await proc.wait_gone(handed_off, timeout=5.0)
        self.socket_path.unlink(missing_ok=True)
        self.api_socket.unlink(missing_ok=True)
        if self.chroot is not None:
            shutil.rmtree(self.chroot.parent, ignore_errors=True)  # <base>/firecracker/<id>

    # -- internals ----------------------------------------------------------------------------------------

    def _check_unused(self) -> None:
        # Checked before _guarded: a second boot() must not tear down the VM the first one started.
        if self._proc is not None:
            raise FirecrackerError(f"VM {self.vm_id}: this driver already started a Firecracker; use a new one")

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except BaseException as exc:
            tail = self.console_tail()
            await self.stop()
            if isinstance(exc, FirecrackerAPIError) and tail:
                exc.add_note("--- firecracker output (last lines) ---\n" + "\n".join(tail))
            raise

    async def _boot(self, config: VMConfig) -> None:
        await self._spawn()
        client = self.client
        await client.put_machine_config(MachineConfig(vcpu_count=config.vcpus, mem_size_mib=config.mem_mib,
                                                      track_dirty_pages=config.track_dirty_pages or None))
        await client.put_boot_source(BootSource(
            kernel_image_path=self._expose(config.kernel), boot_args=config.boot_args,
            initrd_path=self._expose(config.initrd) if config.initrd else None))
        drives = [DriveSpec("rootfs", config.rootfs, config.rootfs_read_only), *config.extra_drives]
        for index, spec in enumerate(drives):
            await client.put_drive(Drive(drive_id=spec.drive_id, path_on_host=self._expose(spec.path,
                                         writable=not spec.read_only),
                                         is_root_device=index == 0, is_read_only=spec.read_only))
        if config.tap:
            await client.put_network_interface(NetworkInterface(iface_id="eth0", host_dev_name=config.tap,
                                                                guest_mac=config.guest_mac))
        await client.instance_start()

    async def _restore(self, snapshot: SnapshotFiles, resume: bool, overrides: Mapping[str, str],
                       track_dirty_pages: bool) -> None:
        await self._spawn()
        await self.client.load_snapshot(SnapshotLoad(
            snapshot_path=self._expose(snapshot.state),
            mem_backend=MemoryBackend(backend_type="File", backend_path=self._expose(snapshot.memory)),
            track_dirty_pages=track_dirty_pages or None, resume_vm=resume,
            network_overrides=[NetworkOverride(iface_id=i, host_dev_name=t) for i, t in overrides.items()] or None))

    async def _spawn(self) -> None:
        check_available(self.binary, kvm_device=self.kvm_device)
        if self.jailer:
            check_available(self.jailer.binary, kvm_device=None)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.chroot is not None:
            # Built before the jailer runs (it keeps an existing directory) so files can be linked in early.
            self.chroot.mkdir(parents=True, exist_ok=True)
        self.api_socket.unlink(missing_ok=True)  # a stale socket makes Firecracker fail with EADDRINUSE
        if self.socket_path != self.api_socket:
            self.socket_path.parent.mkdir(mode=0o700, exist_ok=True)
            self.socket_path.unlink(missing_ok=True)
            self.socket_path.symlink_to(self.api_socket.absolute())  # dangles until Firecracker binds
        # Under its supervisor, which execs it (the pid, stdio and marker are Firecracker's all the same).
        argv, env = lifetime.supervised(self.argv(), self.workdir, self.deadline or lifetime.hold(self.workdir))
        # start_new_session: one process group to kill, so nothing outlives stop() even if the jailer forks.
        self._proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        assert self._proc.stdout is not None
        self._pump = asyncio.create_task(self._console.pump(self._proc.stdout))
        self._exited = asyncio.create_task(self._proc.wait())
        await self._wait_for_socket()
        self._client = FirecrackerClient(self.socket_path, timeout=self.api_timeout)
        if self.log_level is not None:
            # The VMM's own log goes to a file so the console log holds what the guest printed.
            self.vmm_log.touch()  # Firecracker opens the log without creating it
            await self._client.put_logger(Logger(log_path=self._expose(self.vmm_log, writable=True),
                                                 level=self.log_level))

    async def _wait_for_socket(self) -> None:
        """Bounded poll for the API socket to accept connections; ends early if the process exits."""
        assert self._exited is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.socket_timeout
        delay = 0.001
        while True:
            if self._exited.done() and not self._jailer_handed_off():
                await self._drain_console()
                raise FirecrackerProcessError(
                    f"VM {self.vm_id}: {self.argv()[0]} exited with code {self._exited.result()} before its API "
                    f"socket {self.socket_path} appeared", self.console_tail())
            if self.socket_path.exists() and await accepts(self.socket_path):
                return
            if loop.time() >= deadline:
                raise FirecrackerProcessError(
                    f"VM {self.vm_id}: API socket {self.socket_path} did not appear within {self.socket_timeout:g} s",
                    self.console_tail())
            pause = min(delay, max(0.0, deadline - loop.time()))
            if self._exited.done():  # a jailer that handed off: nothing left to watch but the socket
                await asyncio.sleep(pause)
            else:  # waiting on the exit task rather than sleeping, so a crash is noticed at once
                await asyncio.wait({self._exited}, timeout=pause)
            delay = min(delay * 2, 0.05)

    def _jailer_handed_off(self) -> bool:
        # With --new-pid-ns the jailer clones Firecracker and exits 0; the VMM lives on in our process group.
        return bool(self.jailer and self.jailer.new_pid_ns and self._proc and self._proc.returncode == 0)

    async def _drain_console(self) -> None:
        # The process is gone; its last words may still sit in the pipe and are what explains the failure.
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), timeout=1.0)

    def _expose(self, host_path: Path, *, writable: bool = False) -> str:
        """The path Firecracker must be given for `host_path`. Unjailed: relative to the work directory (its
        cwd) for files in it, else absolute. Jailed: the file is hard-linked into the chroot (a copy would cost
        what the overlays exist to avoid) and named from "/". Either way a VM's own files (its disk) get the
        same name in every VM, which is what lets a snapshot, which records the names, load onto another
        VM's disk."""
        host_path = host_path.resolve()
        if self.chroot is None or self.jailer is None:
            workdir = self.workdir.resolve()
            return str(host_path.relative_to(workdir)) if host_path.is_relative_to(workdir) else str(host_path)
        if host_path in self._exposed:
            return self._exposed[host_path]
        chroot = self.chroot.resolve()
        inside = host_path
        if not host_path.is_relative_to(chroot):
            inside = chroot / f"{len(self._exposed)}-{host_path.name}"  # the index keeps equal names apart
            link_into_jail(host_path, inside)
        if writable and os.geteuid() == 0:
            # The jailed VMM runs as uid:gid and must write here. A hard link shares the inode, so this changes
            # the owner of the original too, which is why only per-VM files (overlays, logs) are writable.
            os.chown(inside, self.jailer.uid, self.jailer.gid)
        self._exposed[host_path] = "/" + str(inside.relative_to(chroot))
        return self._exposed[host_path]

    def _snapshot_target(self, dest: SnapshotFiles) -> SnapshotFiles:
        if self.chroot is None:
            dest.state.parent.mkdir(parents=True, exist_ok=True)
            dest.memory.parent.mkdir(parents=True, exist_ok=True)
            return SnapshotFiles(dest.state.resolve(), dest.memory.resolve())
        # A jailed Firecracker can only write inside its chroot; the files are moved out afterwards.
        return SnapshotFiles(Path("/snapshot.state"), Path("/snapshot.mem"))

    def _collect_snapshot(self, dest: SnapshotFiles) -> None:
        if self.chroot is None:
            return
        for name, final in (("snapshot.state", dest.state), ("snapshot.mem", dest.memory)):
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.chroot / name, final)

