"""What the engine and its backends say to each other and to the rest of Polydev: the VM description, the
backend contract (`Backend`, `VMSpec`, `Started`), the creation errors and the engine's public description.

A leaf of the vm package: backends, the warm pool and the reaper import it without importing the engine.
`polydev.vm.engine` re-exports these names; code outside the vm package imports them from there.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from polydev.store.models import VmRecord
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.network import Slot

Purpose = Literal["cli", "browser"]


class VMCreateError(Exception):
    """Creation failed; everything it had set up is gone. `console_log` is kept when there was one."""

    def __init__(self, vm_id: uuid.UUID, reason: str, console_log: Path | None = None) -> None:
        where = f" (console log: {console_log})" if console_log else ""
        super().__init__(f"VM {vm_id} failed to start: {reason}{where}")
        self.vm_id = vm_id
        self.reason = reason
        self.console_log = console_log


class VMCapacityError(VMCreateError):
    """No VM could be created because a shared resource (the network slot pool) is used up: try later."""


@dataclass(frozen=True)
class VMSpec:
    """What a backend needs to start one VM."""

    vm_id: uuid.UUID
    purpose: Purpose
    vcpus: int
    memory_mb: int
    workdir: Path
    token: str
    marker: str  # appears in the hypervisor's command line, so reconcile can find the process
    slot: Slot | None  # tap network mode; None means user-mode networking
    # The egress gateway's socket for this VM (user networking): the guest's proxy address is forwarded there.
    egress_socket: Path | None = None
    # The VM's deadline file (polydev.vm.lifetime), which the engine writes and moves with the VM's expiry:
    # the hypervisor's supervisor kills it when that passes. A backend whose start is cancelled withdraws it.
    # None: the backend's process has one of its own, without expiry (a backend driven without an engine).
    deadline: Path | None = None


@dataclass(frozen=True)
class Started:
    """What a backend reports once the agent answers."""

    pid: int
    agent_url: str
    agent_port: int | None = None
    socket_path: str | None = None
    # A `browser` VM's VNC server as the control plane reaches it (host, port); None: the backend has none
    # to report (the engine then uses the slot's address in tap mode).
    vnc_address: tuple[str, int] | None = None


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself, for /health, the start-up log and the login browser's choice."""

    # kvm, tcg (software emulation), "kvm (untested)" before QEMU's first boot; None: the backend does not say.
    accel: str | None = None
    # The Debian packages of the guest image (its manifest); empty when the backend has no image manifest.
    image_packages: frozenset[str] = frozenset()
    # The CLIs in the guest image, npm package → version (its manifest); empty when it has none.
    image_clis: Mapping[str, str] = field(default_factory=dict)
    image_hash: str | None = None  # the guest image's recipe hash, when it has one
    # Where its guests reach the egress gateway (IP:PORT) when it forwards them there; None: it does not.
    egress_guest_address: str | None = None


class Backend(Protocol):
    name: str

    async def start(self, spec: VMSpec) -> Started:
        """Start the VM and return once its agent answers. On failure: raise, with the process gone. Cancelled:
        return only once nothing it started runs."""
        ...

    async def stop(self, pid: int | None, workdir: Path) -> None:
        """Stop the hypervisor (gracefully if it can, else kill). Idempotent; `pid` may be stale."""
        ...

    def console_log(self, workdir: Path) -> Path:
        ...

    def describe(self) -> BackendInfo:
        ...


@dataclass(frozen=True)
class VM:
    id: uuid.UUID
    user_id: uuid.UUID | None
    purpose: str
    status: str
    backend: str
    agent_url: str | None
    created_at: datetime
    expires_at: datetime | None
    slot_index: int | None
    error: str | None
    # Handed out by the warm pool after the engine's `pool_prepare` hook ran on it: whoever gets it may skip
    # what that hook did.
    prepared: bool = False

    @classmethod
    def of(cls, row: VmRecord, agent_url: str | None) -> VM:
        return cls(row.vm_id, row.user_id, row.purpose, row.status, row.backend or "?", agent_url, row.created_at,
                   row.expires_at, row.slot_index, row.error_message)


# Called on each pooled VM after it starts and before it is counted as ready, with a client of its agent
# (closed by the engine afterwards). Raising keeps the VM out of the pool: it is destroyed.
PoolPrepare = Callable[[VM, "AgentClient"], Awaitable[None]]


@dataclass(frozen=True)
class PoolView:
    """The warm pool as it is at one moment (read-only: the pool changes as VMs are handed out)."""

    size: int  # how many ready VMs it keeps
    ready: tuple[uuid.UUID, ...]  # ready to hand out, oldest first
    prepared: frozenset[uuid.UUID] = frozenset()  # those of `ready` the pool's hook ran on
    filling: bool = False  # a background filler keeps it full


@dataclass(frozen=True)
class EngineInfo:
    """The engine as /health and the services describe it."""

    backend: str
    accel: str | None
    network_mode: Literal["user", "tap"]
    image_packages: frozenset[str] = frozenset()
    image_clis: Mapping[str, str] = field(default_factory=dict)  # npm package → version, from the manifest
    image_hash: str | None = None
    pool: PoolView = field(default_factory=lambda: PoolView(0, ()))

    @property
    def has_login_browser(self) -> bool:
        """Whether the guest image can run the in-VM login browser: its manifest lists Chromium. A backend
        without an image manifest (a stand-in, Firecracker's plain root file system) counts as without."""
        return "chromium" in self.image_packages


class EgressHook(Protocol):
    """The egress gateway as the engine sees it (polydev.egress wires one in): a VM's own socket before it
    starts, its owner and purpose as they change, nothing once it is gone."""

    async def attach(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, *, listener: socket.socket | None = None,
                     peer: str | None = None) -> Path | None:
        """User networking: the VM's own Unix socket (its path). Tap mode: serve `listener`, the socket at its
        slot's host end, for connections from `peer` (the slot's address) only; None."""
        ...

    def update(self, vm_id: uuid.UUID, **fields: Any) -> None: ...

    async def detach(self, vm_id: uuid.UUID) -> None: ...

    def last_refusal(self, vm_id: uuid.UUID, host: str | None = None) -> str | None: ...

