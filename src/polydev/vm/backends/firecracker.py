"""Firecracker backend: an async client of Firecracker's REST API on its Unix socket, and a process driver.

Three layers, each usable alone:
- request bodies: small pydantic models with `extra="forbid"`, shaped after the published Swagger 2.0
  specification (tests validate every request against the v1.13.2 and v1.16.1 files in shared/firecracker).
  Only fields present in BOTH versions are offered, so one client drives either release.
- `FirecrackerClient`: one typed method per API call; any non-2xx answer raises `FirecrackerAPIError`
  carrying Firecracker's own `fault_message`, because that text is the only useful diagnosis it gives.
- `FirecrackerProcess`: spawns `firecracker` (optionally under the `jailer`) with argument lists only, waits
  for the API socket with a bounded poll that also watches for the process dying, configures and starts a VM
  or restores a snapshot, and on any failure kills the process group and removes the socket and jail.

Firecracker needs /dev/kvm and an uncompressed ELF kernel built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y;
`unavailable_reason()` says in one sentence why a machine cannot run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import platform
import re
import shutil
import signal
import tempfile
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field

from polydev import protocol as p

log = logging.getLogger(__name__)

# Firecracker accepts device ids made of ASCII letters, digits and underscores (at most 64); we enforce the
# same before the id becomes part of a URL path, so an id can never smuggle in another path.
DEVICE_ID = r"^[A-Za-z0-9_]{1,64}$"
# The jailer's --id: letters, digits and hyphens, at most 64 characters (docs/jailer.md).
JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
MAC = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
# reboot=k + panic=1: a guest reboot or panic ends the Firecracker process instead of hanging; pci=off because
# Firecracker has no PCI bus (devices are virtio-mmio, announced on the command line).
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00); the stable KVM API answers 12
KVM_API_VERSION = 12
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


# -- errors ----------------------------------------------------------------------------------------------


class FirecrackerError(RuntimeError):
    """Base class: anything that went wrong running Firecracker."""


class FirecrackerUnavailable(FirecrackerError):
    """This machine cannot run Firecracker; `reason` says why in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Firecracker is unavailable: {reason}")
        self.reason = reason


class FirecrackerAPIError(FirecrackerError):
    """Firecracker answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"Firecracker {method} {path} failed ({status}): {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class FirecrackerProcessError(FirecrackerError):
    """The Firecracker process failed to come up or died; carries the last console/log lines."""

    def __init__(self, message: str, console_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(console_tail)
        super().__init__(f"{message}\n--- firecracker output (last lines) ---\n{tail}" if tail else message)
        self.console_tail = list(console_tail)


# -- request and response bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    # Firecracker rejects unknown fields (serde deny_unknown_fields); failing here first gives a clearer error.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def payload(self) -> dict[str, Any]:
        # Unset optional fields are left out rather than sent as null: the spec has no nullable fields.
        return self.model_dump(mode="json", exclude_none=True)


class MachineConfig(_Body):
    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=1)
    smt: bool | None = None
    track_dirty_pages: bool | None = None  # needed for Diff snapshots
    huge_pages: Literal["None", "2M"] | None = None


class BootSource(_Body):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(_Body):
    drive_id: str = Field(pattern=DEVICE_ID)
    path_on_host: str
    is_root_device: bool
    is_read_only: bool
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    partuuid: str | None = None


class DriveUpdate(_Body):
    """PATCH /drives/{id} after boot or restore: point a drive at another backing file."""

    drive_id: str = Field(pattern=DEVICE_ID)
    path_on_host: str


class NetworkInterface(_Body):
    iface_id: str = Field(pattern=DEVICE_ID)
    host_dev_name: str = Field(min_length=1, max_length=15)  # a Linux interface name (IFNAMSIZ - 1)
    guest_mac: str | None = Field(default=None, pattern=MAC)


LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


class Logger(_Body):
    log_path: str
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None


class Metrics(_Body):
    metrics_path: str


class Vsock(_Body):
    guest_cid: int = Field(ge=3)  # 0-2 are reserved (hypervisor, local, host)
    uds_path: str


class SnapshotCreate(_Body):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(_Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(_Body):
    iface_id: str = Field(pattern=DEVICE_ID)
    host_dev_name: str = Field(min_length=1, max_length=15)


class SnapshotLoad(_Body):
    # mem_backend rather than the deprecated mem_file_path: both releases accept it, newer ones drop the other.
    snapshot_path: str
    mem_backend: MemoryBackend
    track_dirty_pages: bool | None = None
    resume_vm: bool | None = None
    network_overrides: list[NetworkOverride] | None = None


class _Action(_Body):
    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class _VmState(_Body):
    state: Literal["Paused", "Resumed"]


class InstanceInfo(BaseModel):
    """GET / answer. Extra fields are ignored so a newer Firecracker does not break an older Polydev."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str
    app_name: str


class MachineConfigInfo(BaseModel):
    """GET /machine-config answer; lenient for the same reason as InstanceInfo."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    vcpu_count: int
    mem_size_mib: int
    smt: bool = False
    track_dirty_pages: bool = False
    huge_pages: str | None = None


# -- the API client --------------------------------------------------------------------------------------


class FirecrackerClient:
    """One Firecracker process's API. Every method is one request; errors raise FirecrackerAPIError."""

    def __init__(self, socket_path: Path | str, *, timeout: float = 10.0, snapshot_timeout: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.socket_path = Path(socket_path)
        # Snapshot calls write or map the whole guest memory: seconds per GiB on slow disks.
        self._snapshot_timeout = snapshot_timeout
        self._http = httpx.AsyncClient(transport=transport or httpx.AsyncHTTPTransport(uds=str(socket_path)),
                                       base_url="http://localhost", timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: _Body | None = None,
                    timeout: float | None = None) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body.payload()
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise FirecrackerError(f"Firecracker API at {self.socket_path} did not answer {method} {path}: "
                                   f"{exc!r}") from exc
        if response.is_success:
            return response
        raise FirecrackerAPIError(method, path, response.status_code, _fault_message(response))

    async def _get_json(self, path: str) -> dict[str, Any]:
        response = await self._call("GET", path)
        data = response.json()
        if not isinstance(data, dict):
            raise FirecrackerError(f"Firecracker GET {path} answered {data!r}, not a JSON object")
        return data

    # Instance information
    async def describe_instance(self) -> InstanceInfo:
        return InstanceInfo.model_validate(await self._get_json("/"))

    async def version(self) -> str:
        return str((await self._get_json("/version"))["firecracker_version"])

    # Pre-boot configuration
    async def get_machine_config(self) -> MachineConfigInfo:
        return MachineConfigInfo.model_validate(await self._get_json("/machine-config"))

    async def put_machine_config(self, config: MachineConfig) -> None:
        await self._call("PUT", "/machine-config", config)

    async def patch_machine_config(self, config: MachineConfig) -> None:
        # The published spec gives PATCH the same body schema as PUT, with vcpu_count and mem_size_mib
        # required, so a strictly conforming partial update still names both.
        await self._call("PATCH", "/machine-config", config)

    async def put_boot_source(self, boot: BootSource) -> None:
        await self._call("PUT", "/boot-source", boot)

    async def put_drive(self, drive: Drive) -> None:
        await self._call("PUT", f"/drives/{drive.drive_id}", drive)

    async def patch_drive(self, update: DriveUpdate) -> None:
        await self._call("PATCH", f"/drives/{update.drive_id}", update)

    async def put_network_interface(self, iface: NetworkInterface) -> None:
        await self._call("PUT", f"/network-interfaces/{iface.iface_id}", iface)

    async def put_logger(self, logger: Logger) -> None:
        await self._call("PUT", "/logger", logger)

    async def put_metrics(self, metrics: Metrics) -> None:
        await self._call("PUT", "/metrics", metrics)

    async def put_vsock(self, vsock: Vsock) -> None:
        await self._call("PUT", "/vsock", vsock)

    # Actions and run state
    async def instance_start(self) -> None:
        await self._call("PUT", "/actions", _Action(action_type="InstanceStart"))

    async def send_ctrl_alt_del(self) -> None:
        await self._call("PUT", "/actions", _Action(action_type="SendCtrlAltDel"))

    async def flush_metrics(self) -> None:
        await self._call("PUT", "/actions", _Action(action_type="FlushMetrics"))

    async def pause(self) -> None:
        await self._call("PATCH", "/vm", _VmState(state="Paused"))

    async def resume(self) -> None:
        await self._call("PATCH", "/vm", _VmState(state="Resumed"))

    # Snapshots
    async def create_snapshot(self, params: SnapshotCreate) -> None:
        await self._call("PUT", "/snapshot/create", params, timeout=self._snapshot_timeout)

    async def load_snapshot(self, params: SnapshotLoad) -> None:
        await self._call("PUT", "/snapshot/load", params, timeout=self._snapshot_timeout)


def _fault_message(response: httpx.Response) -> str:
    """Firecracker's error bodies are {"fault_message": "..."}; fall back to the raw text for anything else."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return data["fault_message"]
    return response.text.strip() or response.reason_phrase


# -- availability ----------------------------------------------------------------------------------------


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


# -- the jailer ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JailerConfig:
    """How to run Firecracker under the jailer (flags as in Firecracker's docs/jailer.md).

    --daemonize is deliberately not offered: the driver must keep the process as its child to watch and kill
    it, and the jailer refuses to daemonize as a process-group leader, which our children are.
    """

    binary: Path
    uid: int
    gid: int
    chroot_base_dir: Path = Path("/srv/jailer")
    netns: Path | None = None  # e.g. /var/run/netns/<slot>: the VM's network slot
    cgroup_version: Literal[1, 2] | None = None
    cgroups: tuple[str, ...] = ()  # "<file>=<value>", e.g. "cpuset.cpus=0-3"
    parent_cgroup: str | None = None
    resource_limits: tuple[str, ...] = ()  # "<resource>=<value>", e.g. "no-file=1024"
    new_pid_ns: bool = False

    def chroot_dir(self, firecracker_binary: Path, vm_id: str) -> Path:
        """The jail's root, as the jailer builds it: <base>/<exec file name>/<id>/root."""
        return self.chroot_base_dir / firecracker_binary.name / vm_id / "root"

    def argv(self, vm_id: str, firecracker_binary: Path, firecracker_args: Sequence[str]) -> list[str]:
        if not JAIL_ID.match(vm_id):
            raise ValueError(f"jailer id {vm_id!r}: letters, digits and hyphens only, at most 64")
        if "firecracker" not in firecracker_binary.name:
            # The jailer itself refuses other names; say so before spawning anything.
            raise ValueError(f"jailer --exec-file must be named *firecracker*, got {firecracker_binary.name!r}")
        argv = [str(self.binary), "--id", vm_id, "--exec-file", str(firecracker_binary),
                "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", str(self.chroot_base_dir)]
        if self.netns is not None:
            argv += ["--netns", str(self.netns)]
        if self.cgroup_version is not None:
            argv += ["--cgroup-version", str(self.cgroup_version)]
        for cgroup in self.cgroups:
            argv += ["--cgroup", cgroup]
        if self.parent_cgroup is not None:
            argv += ["--parent-cgroup", self.parent_cgroup]
        for limit in self.resource_limits:
            argv += ["--resource-limit", limit]
        if self.new_pid_ns:
            argv.append("--new-pid-ns")
        # Everything after "--" goes to Firecracker; the jailer already passes --id itself.
        return [*argv, "--", *firecracker_args]


# -- the process driver ----------------------------------------------------------------------------------


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


@dataclass
class _Console:
    """Firecracker's stdout (guest serial console and, unless configured otherwise, its own log): copied to a
    file kept for post-mortems, the tail kept in memory for error messages, the READY marker watched."""

    path: Path
    marker: str | None
    # Secrets the guest may echo (a kernel prints its command line, which can carry the agent token):
    # replaced before a line reaches the file or the tail, since both outlive the VM and end up in errors.
    redact: tuple[bytes, ...] = ()
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self, stream: asyncio.StreamReader) -> None:
        try:
            # Plain file writes: a line to a local file costs microseconds, less than a thread hop would.
            with open(self.path, "ab") as out:  # noqa: ASYNC230
                while raw := await stream.readline():
                    for secret in self.redact:
                        raw = raw.replace(secret, b"[redacted]")
                    out.write(raw)
                    out.flush()
                    line = raw.decode("utf-8", "replace").rstrip()
                    self.tail.append(line)
                    if self.marker and self.marker in line:
                        self.ready.set()
        finally:
            self.closed.set()


class FirecrackerProcess:
    """One Firecracker process and the VM inside it. Use `boot()` or `restore()`, then `stop()` (or use it
    as an async context manager). Any failure while coming up leaves nothing behind."""

    SOCKET_NAME = "firecracker.socket"

    def __init__(self, workdir: Path, *, binary: Path, vm_id: str | None = None,
                 jailer: JailerConfig | None = None, kvm_device: Path | None = Path("/dev/kvm"),
                 socket_timeout: float = 10.0, api_timeout: float = 10.0,
                 ready_marker: str | None = p.READY_MARKER, log_level: LogLevel | None = "Warning",
                 command_prefix: Sequence[str] = (), redact: Sequence[str] = ()) -> None:
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
        self._console = _Console(workdir / "console.log", ready_marker,
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
            await _gone(handed_off, timeout=5.0)
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
        # start_new_session: one process group to kill, so nothing outlives stop() even if the jailer forks.
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
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
            if self.socket_path.exists() and await _accepts(self.socket_path):
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


def socket_alias(api_socket: Path) -> Path | None:
    """The short symlink by which a socket too deep for a Unix socket address is reached, or None."""
    if len(os.fsencode(api_socket)) <= UNIX_PATH_MAX:
        return None
    digest = hashlib.sha256(str(api_socket.absolute()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "polydev-fc" / f"{digest}.socket"


def link_into_jail(host_path: Path, inside: Path) -> None:
    """Hard-link a file into a jail: a copy would cost what the per-VM disks exist to avoid."""
    try:
        os.link(host_path, inside)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise FirecrackerError(f"{host_path} is on another file system than the jail {inside.parent}: put "
                                   "the jailer's chroot base (FIRECRACKER_BASE) beside the VM files") from exc
        raise


def process_gone(pid: int) -> bool:
    """True when `pid` has exited: no such process, or a zombie its parent has yet to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


async def _gone(pid: int, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not process_gone(pid) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


async def _accepts(path: Path) -> bool:
    """True when a server listens on the Unix socket `path` (the file exists between bind() and listen())."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
