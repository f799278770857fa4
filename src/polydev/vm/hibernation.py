"""Hibernation: a running VM saved to its work directory (memory and device state beside its overlay) with no
process left, and woken later, by this server or by the next start of a server on the same data directory,
as it was: its processes still running, its files and memory intact, its agent holding the same token.

The engine keeps agent tokens in memory only, so `hibernate` hands the token to the caller (which keeps it
sealed, e.g. in the sandbox's row) and `wake` takes it back. A hibernated VM's row says `hibernated`: it holds
no process, slot or host capacity, it does not expire, reconcile keeps its files, and a server started on the
same data directory adopts it (`adopt`). In tap mode its network slot is freed while it sleeps and the wake takes
whichever is free.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog

from polydev.store.models import utcnow
from polydev.vm import lifetime
from polydev.vm.proc import marker_for
from polydev.vm.types import VM, Started, VMCreateError, VMSpec

if TYPE_CHECKING:
    from polydev.store.models import VmRecord
    from polydev.vm.engine import VMEngine

log = structlog.get_logger(__name__)

HIBERNATED = "hibernated"
SYNC_TIMEOUT_S = 60.0


@runtime_checkable
class Hibernates(Protocol):
    """A backend that can save a running VM to its work directory and start it again from there."""

    def hibernate(self, workdir: Path, memory: bool = True) -> None: ...

    def hibernated(self, workdir: Path) -> bool: ...

    def keep_disk(self, workdir: Path) -> bool: ...

    async def wake(self, spec: VMSpec) -> Started: ...


class CannotHibernate(Exception):
    """The VM cannot be hibernated or woken (the reason in words)."""


def _backend(engine: VMEngine) -> Hibernates:
    if not isinstance(engine.backend, Hibernates):
        raise CannotHibernate(f"the {engine.backend.name} backend cannot hibernate VMs")
    return engine.backend


async def hibernate(engine: VMEngine, vm_id: uuid.UUID, memory: bool = True) -> str:
    """Save the running VM and end its process; returns its agent's token (for `wake`). Without `memory`
    only its disk is kept, synced by its agent first (CannotHibernate when the agent does not answer), and
    `wake` boots it cold: its files are there, its processes are not."""
    backend = _backend(engine)
    row = await engine.vms.get(vm_id)
    token = engine._tokens.get(vm_id)
    if row is None or row.status != "running" or token is None:
        raise CannotHibernate("the VM is not running on this server")
    workdir = engine.workdir(vm_id)
    if not memory:
        await _sync_disk(engine, vm_id)
    await asyncio.to_thread(backend.hibernate, workdir, memory)
    for known in (engine._tokens, engine._urls, engine._vnc):
        known.pop(vm_id, None)
    if engine.egress is not None:
        await engine.egress.detach(vm_id)
    # Its slot is freed for other VMs: every slot looks the same to a guest (address, gateway, MACs), so the
    # wake may take any.
    errors = await engine.unplug(vm_id, row.slot_index)
    if errors:
        log.warning("vm_hibernated_slot_not_freed", vm_id=str(vm_id), errors=errors)
    await engine.vms.update(vm_id, status=HIBERNATED, backend_pid=None, agent_port=None, expires_at=None,
                            slot_index=None)
    log.info("vm_hibernated", vm_id=str(vm_id))
    return token


async def _sync_disk(engine: VMEngine, vm_id: uuid.UUID) -> None:
    """The guest writes what its page cache holds: a power-off loses nothing written before this."""
    from polydev.vm.agent_client import AgentError

    def sync() -> int:
        with engine.agent(vm_id, timeout=SYNC_TIMEOUT_S) as agent:
            return agent.exec(["sync"], timeout_s=SYNC_TIMEOUT_S).exit_code
    try:
        code = await asyncio.to_thread(sync)
    except (AgentError, OSError) as exc:
        raise CannotHibernate(f"the VM's agent does not answer, so its disk cannot be synced: {exc}") from None
    if code != 0:
        raise CannotHibernate(f"sync in the VM exited with {code}")


async def wake(engine: VMEngine, vm_id: uuid.UUID, token: str, ttl: timedelta) -> VM:
    """Start a hibernated VM again, as it was, living `ttl` from now. CannotHibernate when there is none here."""
    backend = _backend(engine)
    row = await engine.vms.get(vm_id)
    workdir = engine.workdir(vm_id)
    if row is None or row.status != HIBERNATED or not engine.hosts(row) or not backend.hibernated(workdir):
        raise CannotHibernate("no hibernated VM by that id on this server")
    expires = utcnow() + ttl
    lifetime.set_deadline(lifetime.deadline_file(workdir), expires)
    await engine.vms.update(vm_id, status="creating", expires_at=expires)
    try:
        slot, egress_socket = await engine.plug(vm_id, row.user_id)
        spec = VMSpec(vm_id, row.purpose, row.vcpu_count or 1, row.memory_mb or 0, workdir, token,  # type: ignore[arg-type]
                      marker_for(engine.tag, vm_id), slot, egress_socket, lifetime.deadline_file(workdir))
        started = await backend.wake(spec)
    except Exception as exc:
        # Its files stay: a later wake may succeed (the cause may be passing: memory, a free slot).
        if engine.egress is not None:
            await engine.egress.detach(vm_id)
        await engine.unplug(vm_id, None)
        await engine.vms.update(vm_id, status=HIBERNATED, expires_at=None, slot_index=None)
        raise VMCreateError(vm_id, f"waking the VM failed: {str(exc).splitlines()[0]}") from exc
    log.info("vm_woken", vm_id=str(vm_id))
    return await engine._running(row, token, slot, started)


async def keep_disk(engine: VMEngine, row: VmRecord) -> bool:
    """At start-up, for a VM lost with its server whose disk the engine was told to keep (a workspace's):
    hibernated without memory, adopted by this server; the next `wake` boots it cold. False when it cannot."""
    if not isinstance(engine.backend, Hibernates) or engine.vms.server_id is None:
        return False
    workdir = Path(row.workdir) if row.workdir else engine.workdir(row.vm_id)
    if not await asyncio.to_thread(engine.backend.keep_disk, workdir):
        return False
    await engine.vms.update(row.vm_id, status=HIBERNATED, backend_pid=None, agent_port=None, expires_at=None,
                            slot_index=None, server_id=engine.vms.server_id)
    log.info("vm_disk_kept", vm_id=str(row.vm_id))
    return True


async def adopt(engine: VMEngine, keep: frozenset[uuid.UUID] | set[uuid.UUID]) -> int:
    """At start-up: the hibernated VMs whose files are in this data directory and whose server is not a live
    peer become this server's (a restart gives a server a new id). Returns how many."""
    if not isinstance(engine.backend, Hibernates) or engine.vms.server_id is None:
        return 0
    adopted = 0
    for row in await engine.vms.list(statuses=(HIBERNATED,)):
        if row.server_id is not None and row.server_id in keep:
            continue
        if engine.backend.hibernated(engine.workdir(row.vm_id)) and row.server_id != engine.vms.server_id:
            await engine.vms.update(row.vm_id, server_id=engine.vms.server_id)
            adopted += 1
    return adopted

