"""The VM engine: the only way the rest of Polydev creates, finds and destroys VMs.

Every VM has a row in `vms` before anything is started, so a crash at any point leaves a record that
`reconcile()` can act on. Creation goes: row (creating) → network slot (tap mode) → backend start, which
returns once the guest agent answers → row (running). Destruction is one ordered cleanup that tolerates
partial state: hypervisor process → network slot → address lease → disk → row. Anything that fails is
retried through `vm_cleanup_tasks`, which survive restarts.

Each engine owns the VMs tagged with its `tag` (derived from the data directory), so two engines on one
machine — a server and a test run — never reclaim each other's VMs. Per-VM agent tokens live only in this
process's memory: VMs that outlive their engine (a crash, a restart) are unusable and are destroyed by
`reconcile()` at the next start, their rows marked failed with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from polydev.store.leases import LeaseRepo, PoolExhausted
from polydev.store.models import Vm, utcnow
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.network import VNC_PORT, Slot, SlotNetwork

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient

log = structlog.get_logger(__name__)

Purpose = Literal["cli", "browser"]
RETRY_CLEANUP_AFTER = timedelta(seconds=30)


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


class Backend(Protocol):
    name: str

    async def start(self, spec: VMSpec) -> Started:
        """Start the VM and return once its agent answers. On failure: raise, with the process gone."""
        ...

    async def stop(self, pid: int | None, workdir: Path) -> None:
        """Stop the hypervisor (gracefully if it can, else kill). Idempotent; `pid` may be stale."""
        ...

    def console_log(self, workdir: Path) -> Path:
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
    def of(cls, row: Vm, agent_url: str | None) -> VM:
        return cls(row.vm_id, row.user_id, row.type, row.status, row.backend or "?", agent_url, row.created_at,
                   row.expires_at, row.slot_index, row.error_message)


# Called on each pooled VM after it starts and before it is counted as ready, with a client of its agent
# (closed by the engine afterwards). Raising keeps the VM out of the pool: it is destroyed.
PoolPrepare = Callable[[VM, "AgentClient"], Awaitable[None]]
PREPARE_AGENT_TIMEOUT = 120.0  # s per agent call: a restored TCG guest's first requests are slow


def engine_tag(data_dir: Path) -> str:
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]


def marker_for(tag: str, vm_id: uuid.UUID) -> str:
    return f"polydev-{tag}-{vm_id}"


def find_marked_processes(tag: str, proc_root: Path = Path("/proc")) -> dict[uuid.UUID, int]:
    """Hypervisor processes of this engine on the machine, found by the marker in their command line."""
    prefix = f"polydev-{tag}-".encode()
    found: dict[uuid.UUID, int] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        for arg in args:
            pos = arg.find(prefix)
            if pos < 0:
                continue
            text = arg[pos + len(prefix):pos + len(prefix) + 36].decode(errors="replace")
            with contextlib.suppress(ValueError):
                found[uuid.UUID(text)] = int(entry.name)
            break
    return found


class VMEngine:
    def __init__(self, *, backend: Backend, vms: VmRepo, cleanup: CleanupTaskRepo, leases: LeaseRepo,
                 data_dir: Path, network: SlotNetwork | None = None, vcpus: dict[str, int] | None = None,
                 memory_mb: dict[str, int] | None = None, keep_failed: bool = False, pool_size: int = 0,
                 pool_prepare: PoolPrepare | None = None,
                 process_finder: Callable[[str], dict[uuid.UUID, int]] = find_marked_processes) -> None:
        self.backend = backend
        self.vms = vms
        self.cleanup = cleanup
        self.leases = leases
        self.network = network
        self.data_dir = data_dir
        self.tag = engine_tag(data_dir)
        self.vcpus = vcpus or {"cli": 1, "browser": 2}
        self.memory_mb = memory_mb or {"cli": 2048, "browser": 4096}
        self.keep_failed = keep_failed
        self._find = process_finder
        self._tokens: dict[uuid.UUID, str] = {}
        self._urls: dict[uuid.UUID, str] = {}
        self._vnc: dict[uuid.UUID, tuple[str, int]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Warm pool: running `cli` VMs owned by nobody, handed out by create() without waiting for a start.
        self.pool_size = pool_size
        self.pool_prepare = pool_prepare
        self._pool: list[uuid.UUID] = []
        self._prepared: set[uuid.UUID] = set()  # pooled VMs the hook ran on
        self._pooled_vms: dict[uuid.UUID, VM] = {}  # what create() returns for them, without a read
        self._hand_outs: set[asyncio.Task[None]] = set()  # hand-out rows being written
        self._pool_filler: asyncio.Task[None] | None = None
        self._pool_wanted = asyncio.Event()

    # -- paths --------------------------------------------------------------------------------------------
    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def workdir(self, vm_id: uuid.UUID) -> Path:
        return self.vms_dir / str(vm_id)

    # -- create / destroy ---------------------------------------------------------------------------------
    async def create(self, user_id: uuid.UUID | None, purpose: Purpose = "cli",
                     ttl: timedelta = timedelta(minutes=30)) -> VM:
        if purpose == "cli" and self._pool:
            return await self._take_from_pool(user_id, ttl)
        return await self._create(user_id, purpose, ttl)

    async def _take_from_pool(self, user_id: uuid.UUID | None, ttl: timedelta) -> VM:
        vm_id = self._pool.pop(0)
        prepared = vm_id in self._prepared
        self._prepared.discard(vm_id)
        expires = utcnow() + ttl
        vm = replace(self._pooled_vms.pop(vm_id), user_id=user_id, expires_at=expires, prepared=prepared)
        # The VM is the caller's from here; its row follows without holding up the caller's first request to
        # the agent (~10 ms of database write under TCG load). Should the server stop before the row is
        # written, its next start destroys every VM this process ran anyway.
        task = asyncio.get_running_loop().create_task(self._record_hand_out(vm_id, user_id, expires))
        self._hand_outs.add(task)
        task.add_done_callback(self._hand_outs.discard)
        log.info("vm_from_pool", vm_id=str(vm_id), pooled=len(self._pool), prepared=prepared)
        return vm

    async def _record_hand_out(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, expires: datetime) -> None:
        try:
            await self.vms.update(vm_id, user_id=user_id, expires_at=expires)
        except Exception:
            log.exception("vm_hand_out_row_failed", vm_id=str(vm_id))
        finally:
            # Refill once the hand-out's row is written: the replacement's start (disk overlay, hypervisor
            # process, its rows) would otherwise compete with it for the event loop and the database.
            self._pool_wanted.set()

    async def assign(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, ttl: timedelta) -> VM:
        """Give a running VM that was started for nobody (a pooled one) to its user, with a new expiry."""
        row = await self.vms.update_returning(vm_id, user_id=user_id, expires_at=utcnow() + ttl)
        if row is None:
            raise KeyError(vm_id)
        return VM.of(row, self._urls.get(vm_id))

    async def fill_pool(self) -> int:
        """Start VMs until the pool holds `pool_size`; returns how many it started."""
        started = 0
        while len(self._pool) < self.pool_size:
            vm = await self._create(None, "cli", ttl=None)
            if self.pool_prepare is not None:
                await self._prepare(vm, self.pool_prepare)
                self._prepared.add(vm.id)
            self._pool.append(vm.id)
            self._pooled_vms[vm.id] = vm
            started += 1
        return started

    async def _prepare(self, vm: VM, hook: PoolPrepare) -> None:
        """Run the pool's hook on a VM not yet pooled; if it fails (or is cancelled), the VM is torn down and
        its row marked failed with the reason, as a failed start is."""
        try:
            with self.agent(vm.id, timeout=PREPARE_AGENT_TIMEOUT) as client:
                await hook(vm, client)
        except BaseException as exc:
            reason = "pool preparation failed: " + (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            row = await self.vms.get(vm.id)
            kept = await self._teardown(row, failed=True) if row is not None else None
            await self.vms.mark_failed(vm.id, reason + (f" (console log: {kept})" if kept else ""))
            log.warning("vm_prepare_failed", vm_id=str(vm.id), reason=reason)
            if isinstance(exc, Exception):
                raise VMCreateError(vm.id, reason, kept) from exc
            raise

    def start_pool(self, retry_after: float = 5.0) -> None:
        """Keep the pool full in the background (refilled after every hand-out)."""
        async def loop() -> None:
            while True:
                self._pool_wanted.clear()
                try:
                    await self.fill_pool()
                except Exception:
                    log.exception("warm_pool_fill_failed")
                    await asyncio.sleep(retry_after)
                    continue
                await self._pool_wanted.wait()

        if self.pool_size > 0 and self._pool_filler is None:
            self._pool_filler = asyncio.get_running_loop().create_task(loop())

    async def _create(self, user_id: uuid.UUID | None, purpose: Purpose, ttl: timedelta | None) -> VM:
        vm_id = uuid.uuid4()
        workdir = self.workdir(vm_id)
        try:
            row = await self.vms.create(vm_id=vm_id, user_id=user_id, type=purpose, vm_type=purpose,
                                        backend=self.backend.name, vcpu_count=self.vcpus[purpose],
                                        memory_mb=self.memory_mb[purpose], workdir=str(workdir),
                                        # pooled VMs do not expire until handed out
                                        expires_at=utcnow() + ttl if ttl is not None else None)
        except asyncio.CancelledError:
            # The insert may have committed before the cancel (close() stopping the pool's filler) arrived:
            # leave no row that says "creating" for a VM nothing will start.
            with contextlib.suppress(Exception):
                await self.vms.mark_failed(vm_id, "cancelled before it started")
            raise
        token = secrets.token_urlsafe(32)
        slot: Slot | None = None
        try:
            workdir.mkdir(parents=True, mode=0o700)
            if self.network is not None:
                index = await self.leases.acquire(vm_id, self.network.capacity,
                                                  lambda i: self.network.address(i).host_ip)  # type: ignore[union-attr]
                await self.vms.update(vm_id, slot_index=index)
                slot = await asyncio.to_thread(self.network.create, index)
            spec = VMSpec(vm_id, purpose, self.vcpus[purpose], self.memory_mb[purpose], workdir, token,
                          marker_for(self.tag, vm_id), slot)
            started = await self.backend.start(spec)
        except BaseException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            kept = await self._teardown(row, failed=True)
            await self.vms.mark_failed(vm_id, reason + (f" (console log: {kept})" if kept else ""))
            log.warning("vm_create_failed", vm_id=str(vm_id), reason=reason, console_log=str(kept) if kept else None)
            if isinstance(exc, Exception):
                error = VMCapacityError if isinstance(exc, PoolExhausted) else VMCreateError
                raise error(vm_id, reason, kept) from exc
            raise
        self._tokens[vm_id] = token
        self._urls[vm_id] = started.agent_url
        vnc = started.vnc_address or ((slot.ns_ip, VNC_PORT) if slot is not None else None)
        if purpose == "browser" and vnc is not None:  # only login-browser VMs run a VNC server
            self._vnc[vm_id] = vnc
        await self.vms.update(vm_id, status="running", backend_pid=started.pid, agent_port=started.agent_port,
                              socket_path=started.socket_path,
                              ip_address=slot.ns_ip if slot else "127.0.0.1",
                              tap_device=slot.netns if slot else None, last_heartbeat=utcnow())
        log.info("vm_created", vm_id=str(vm_id), purpose=purpose, backend=self.backend.name,
                 slot=slot.index if slot else None)
        fresh = await self.vms.get(vm_id)
        assert fresh is not None
        return VM.of(fresh, started.agent_url)

    async def destroy(self, vm_id: uuid.UUID) -> bool:
        """Destroy a VM; False if there was no live VM by that id. Safe to call more than once."""
        row = await self.vms.get(vm_id)
        if row is None or row.status in ("destroyed", "failed"):
            return False
        if vm_id in self._pool:
            self._pool.remove(vm_id)
            self._prepared.discard(vm_id)
            self._pooled_vms.pop(vm_id, None)
            self._pool_wanted.set()
        await self._teardown(row, failed=False)
        await self.vms.mark_destroyed(vm_id)
        log.info("vm_destroyed", vm_id=str(vm_id))
        return True

    async def _teardown(self, row: Vm, *, failed: bool) -> Path | None:
        """Ordered, tolerant cleanup: process, network slot, lease, disk. Returns the kept console log."""
        vm_id = row.vm_id
        self._tokens.pop(vm_id, None)
        self._urls.pop(vm_id, None)
        self._vnc.pop(vm_id, None)
        workdir = Path(row.workdir) if row.workdir else self.workdir(vm_id)
        errors: list[str] = []
        pid = row.backend_pid or self._find(self.tag).get(vm_id)
        try:
            await self.backend.stop(pid, workdir)
        except Exception as exc:  # keep going: a stuck process must not keep its disk and address forever
            errors.append(f"stop: {exc}")
        if self.network is not None:
            index = row.slot_index
            if index is None:
                index = next((i for i, v in (await self.leases.held()).items() if v == vm_id), None)
            if index is not None:
                try:
                    await asyncio.to_thread(self.network.destroy, index)
                except Exception as exc:
                    errors.append(f"network: {exc}")
        await self.leases.release(vm_id)
        kept = self._keep_console(workdir, vm_id) if (failed or self.keep_failed) else None
        shutil.rmtree(workdir, ignore_errors=True)
        if errors:
            await self.cleanup.schedule(vm_id, utcnow() + RETRY_CLEANUP_AFTER)
            log.error("vm_cleanup_incomplete", vm_id=str(vm_id), errors=errors)
        return kept

    def _keep_console(self, workdir: Path, vm_id: uuid.UUID) -> Path | None:
        source = self.backend.console_log(workdir)
        if not source.exists():
            return None
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        target = self.logs_dir / f"{vm_id}.console.log"
        shutil.copyfile(source, target)
        return target

    # -- queries ------------------------------------------------------------------------------------------
    async def get(self, vm_id: uuid.UUID) -> VM | None:
        row = await self.vms.get(vm_id)
        return VM.of(row, self._urls.get(vm_id)) if row else None

    async def list(self, *, user_id: uuid.UUID | None = None, live_only: bool = True) -> list[VM]:
        return [VM.of(r, self._urls.get(r.vm_id)) for r in await self.vms.list(live_only=live_only, user_id=user_id)]

    def agent_endpoint(self, vm_id: uuid.UUID) -> tuple[str, str]:
        """(agent URL, token) for a VM this engine runs; KeyError when it runs no such VM."""
        return self._urls[vm_id], self._tokens[vm_id]

    def vnc_endpoint(self, vm_id: uuid.UUID) -> tuple[str, int]:
        """(host, port) of a running `browser` VM's VNC server as this process reaches it: a 127.0.0.1 port
        forwarded by QEMU (user networking) or the slot's address (tap mode, opened by the slot firewall to
        the host end alone). KeyError when this engine runs no such VM."""
        return self._vnc[vm_id]

    def agent(self, vm_id: uuid.UUID, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        from polydev.vm.agent_client import AgentClient

        url, token = self.agent_endpoint(vm_id)
        return AgentClient(url, token, timeout=timeout)

    # -- reconcile and reaping ----------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, int]:
        """Make the machine match the database, in a fixed order: processes, then network, then disks.

        Run at start-up: every VM process of ours that this engine did not start in this process is
        killed (its token died with the previous process), and its row marked failed."""
        counts = {"processes": 0, "rows": 0, "slots": 0, "leases": 0, "disks": 0, "tasks": 0}
        counts["tasks"] = await self.cleanup.requeue_interrupted()
        mine = set(self._tokens)
        # 1. processes
        for vm_id, pid in self._find(self.tag).items():
            if vm_id in mine:
                continue
            await self.backend.stop(pid, self.workdir(vm_id))
            counts["processes"] += 1
        # rows that claim to live but have no process in this engine
        for row in await self.vms.list():
            if row.vm_id in mine:
                continue
            kept = self._keep_console(Path(row.workdir) if row.workdir else self.workdir(row.vm_id), row.vm_id)
            reason = "lost when the control plane stopped" + (f" (console log: {kept})" if kept else "")
            await self.vms.mark_failed(row.vm_id, reason)
            counts["rows"] += 1
        live_rows = {r.vm_id: r for r in await self.vms.list()}
        # 2. network: slots and leases without a live VM
        held = await self.leases.held()
        for vm_id in held.values():
            if vm_id not in live_rows:
                await self.leases.release(vm_id)
                counts["leases"] += 1
        if self.network is not None:
            live_slots = {r.slot_index for r in live_rows.values() if r.slot_index is not None}
            counts["slots"] = len(await asyncio.to_thread(self.network.reclaim, live_slots))
        # 3. disks
        if self.vms_dir.exists():
            for child in self.vms_dir.iterdir():
                try:
                    vm_id = uuid.UUID(child.name)
                except ValueError:
                    continue
                if vm_id not in live_rows:
                    shutil.rmtree(child, ignore_errors=True)
                    counts["disks"] += 1
        if any(counts.values()):
            log.warning("reconciled", **counts)
        return counts

    async def reap_once(self) -> int:
        """Destroy expired VMs and run due cleanup tasks. Returns how many VMs it destroyed."""
        done = 0
        for row in await self.vms.expired():
            if await self.destroy(row.vm_id):
                done += 1
        for task in await self.cleanup.claim_due():
            try:
                row = await self.vms.get(task.vm_id)
                if row is not None:
                    await self._teardown(row, failed=False)
                    await self.vms.mark_destroyed(task.vm_id)
                await self.cleanup.finish(task.id)
            except Exception as exc:
                await self.cleanup.finish(task.id, error=str(exc))
        return done

    def start_reaper(self, interval: float = 5.0) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.reap_once()
                except Exception:
                    log.exception("reaper_failed")
                await asyncio.sleep(interval)

        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(loop())

    async def close(self, destroy_all: bool = True) -> None:
        for attr in ("_reaper", "_pool_filler"):
            task = getattr(self, attr)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                setattr(self, attr, None)
        if self._hand_outs:
            await asyncio.gather(*self._hand_outs, return_exceptions=True)
        if destroy_all:
            for vm_id in list(self._tokens):
                await self.destroy(vm_id)

