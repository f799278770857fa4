"""What `core` needs of the layer below it, as Protocols: the flows and services are typed against these,
not against the VM engine's class, so a test can hand them a stand-in and a reader sees the whole contract
in one place.

`VMEngine` (polydev.vm.engine) is the implementation; `VM` is its description of one machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from polydev.vm.agent_client import AgentClient
from polydev.vm.engine import VM, Purpose
from polydev.vm.images import Image
from polydev.vm.types import EngineInfo


class VmPort(Protocol):
    """The VM engine as the flows and the admin VM service use it."""

    async def create(self, user_id: uuid.UUID | None, purpose: Purpose = "cli",
                     ttl: timedelta = timedelta(minutes=30), on_row: Callable[[uuid.UUID], None] | None = None) -> VM:
        """A running VM whose agent answers (from the warm pool when one is ready); VMCreateError, or its
        subclass VMCapacityError, when none can be had. `on_row` is called with its id once the VM has its row."""
        ...

    async def assign(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, ttl: timedelta) -> VM:
        """Hand a VM started for nobody (a pre-started login's) to its user, with a new expiry."""
        ...

    async def destroy(self, vm_id: uuid.UUID) -> bool:
        """Stop the VM and free what it held; False when it was already gone. Idempotent."""
        ...

    async def get(self, vm_id: uuid.UUID) -> VM | None: ...

    async def list(self, *, user_id: uuid.UUID | None = None, live_only: bool = True) -> list[VM]: ...

    def agent(self, vm_id: uuid.UUID, timeout: float = 60.0) -> AgentClient:
        """A client of the VM's guest agent; KeyError when this engine runs no such VM."""
        ...

    def describe(self) -> EngineInfo:
        """The backend, its acceleration and network mode, and what its guest image holds."""
        ...

    async def switch_image(self, image: Image) -> int:
        """New VMs (the warm pool's too) from `image`; returns how many pooled VMs were replaced. ValueError
        when the backend cannot switch while it runs."""
        ...

    def runs_here(self, vm_id: uuid.UUID) -> bool:
        """Whether this engine runs the VM now (with several servers, another may)."""
        ...

    def vnc_endpoint(self, vm_id: uuid.UUID) -> tuple[str, int]:
        """(host, port) of a `browser` VM's VNC server as this process reaches it; KeyError when none."""
        ...

    def label(self, vm_id: uuid.UUID, *, purpose: str, provider: str | None = None, browser: bool = False) -> None:
        """What the VM is for (login, run, sandbox), so the egress gateway lets it reach what that needs."""
        ...

    def egress_refusal(self, vm_id: uuid.UUID, host: str | None = None) -> str | None:
        """Why the egress gateway last refused or failed one of the VM's connections (to `host`), if it did."""
        ...

    async def hibernate(self, vm_id: uuid.UUID, memory: bool = True) -> str:
        """Save the running VM (memory, devices, disk; only the disk without `memory`, and the wake boots it
        cold) and end its process; returns its agent's token, which `wake` needs. CannotHibernate
        (polydev.vm.hibernation) says why it cannot."""
        ...

    async def wake(self, vm_id: uuid.UUID, token: str, ttl: timedelta) -> VM:
        """Start a hibernated VM again as it was, living `ttl`; CannotHibernate when there is none here,
        VMCreateError when it fails (its files are kept)."""
        ...

    async def stall_reason(self, vm_id: uuid.UUID) -> str | None:
        """Why the hypervisor holds the VM paused (its disk could not grow: the host is out of space), if it does."""
        ...

