"""Firecracker's REST API on its Unix socket: request and response bodies, and an async client.

- Request bodies: small pydantic models with `extra="forbid"`, shaped after the published Swagger 2.0
  specification (tests validate every request against the v1.13.2 and v1.16.1 files in shared/firecracker).
  Only fields present in BOTH versions are offered, so one client drives either release.
- `FirecrackerClient`: one typed method per API call; any non-2xx answer raises `FirecrackerAPIError`
  carrying Firecracker's own `fault_message`, because that text is the only useful diagnosis it gives.
- The socket itself: `socket_alias`, the short name by which a socket too deep for a Unix socket address is
  reached, and `accepts`, whether anything listens on it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from polydev.vm.backends.firecracker.errors import FirecrackerAPIError, FirecrackerError

# Firecracker accepts device ids made of ASCII letters, digits and underscores (at most 64); we enforce the
# same before the id becomes part of a URL path, so an id can never smuggle in another path.
DEVICE_ID = r"^[A-Za-z0-9_]{1,64}$"
MAC = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


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

B = TypeVar("B", bound=_Body)


class _Send(Generic[B]):
    """A client method that only sends its one argument, a request body, to a fixed path:
    `put_logger = _Send[Logger]("PUT", "/logger")` makes `await client.put_logger(Logger(...))`."""

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path

    def __get__(self, client: FirecrackerClient, owner: object = None) -> Callable[[B], Awaitable[None]]:
        async def send(body: B) -> None:
            await client._call(self.method, self.path, body)

        return send


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

    put_machine_config = _Send[MachineConfig]("PUT", "/machine-config")
    # The published spec gives PATCH the same body schema as PUT, with vcpu_count and mem_size_mib
    # required, so a strictly conforming partial update still names both.
    patch_machine_config = _Send[MachineConfig]("PATCH", "/machine-config")
    put_boot_source = _Send[BootSource]("PUT", "/boot-source")
    put_logger = _Send[Logger]("PUT", "/logger")
    put_metrics = _Send[Metrics]("PUT", "/metrics")
    put_vsock = _Send[Vsock]("PUT", "/vsock")

    # Devices, each at a path named by its id
    async def put_drive(self, drive: Drive) -> None:
        await self._call("PUT", f"/drives/{drive.drive_id}", drive)

    async def patch_drive(self, update: DriveUpdate) -> None:
        await self._call("PATCH", f"/drives/{update.drive_id}", update)

    async def put_network_interface(self, iface: NetworkInterface) -> None:
        await self._call("PUT", f"/network-interfaces/{iface.iface_id}", iface)

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


# -- the API socket -------------------------------------------------------------------------------------


def socket_alias(api_socket: Path) -> Path | None:
    """The short symlink by which a socket too deep for a Unix socket address is reached, or None."""
    if len(os.fsencode(api_socket)) <= UNIX_PATH_MAX:
        return None
    digest = hashlib.sha256(str(api_socket.absolute()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "polydev-fc" / f"{digest}.socket"


async def accepts(path: Path) -> bool:
    """True when a server listens on the Unix socket `path` (the file exists between bind() and listen())."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
