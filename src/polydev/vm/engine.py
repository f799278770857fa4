"""The VM engine: the only way the rest of Polydev creates, finds and destroys VMs.

Every VM has a row in `vms` before anything is started, so a crash at any point leaves a record that
`reconcile()` can act on. Creation goes: row (creating) → work directory with the VM's deadline file →
network slot (tap mode) → backend start, which returns once the guest agent answers → row (running).
Destruction is one ordered cleanup that tolerates partial state: hypervisor process → network slot →
address lease → disk → row. Anything that fails is retried through `vm_cleanup_tasks`, which survive
restarts.

Each engine owns the VMs tagged with its `tag` (derived from the data directory), so two engines on one
machine — a server and a test run — never reclaim each other's VMs. Per-VM agent tokens live only in this
process's memory, so a VM is unusable once its engine process is gone (a crash, a restart).

No VM outlives its expiry, whether or not a server runs: every hypervisor runs beside a supervisor
(polydev.vm.supervisor) that kills it when its deadline (`<work directory>/deadline`, holding the expiry
the engine gives it and moves; polydev.vm.lifetime) passes or is withdrawn, when its work directory goes,
and when the process that started it is gone. `reconcile()` at the next start marks the rows of VMs lost
that way failed, with the reason, and reclaims whatever else is left. `close()` waits for the creations
under way before it destroys this process's VMs, so a server that stops leaves none running.

The warm pool is polydev.vm.pool (`engine.pool`), reconcile and the reaper polydev.vm.reaper
(`engine.reaper`); the types the engine and its backends share are polydev.vm.types, re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import uuid
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from polydev.store.leases import LeaseRepo, PoolExhausted
from polydev.store.models import VmRecord, utcnow
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import hibernation, lifetime
from polydev.vm.disk_space import OUT_OF_DISK, DiskSpace, DiskWatch
from polydev.vm.network import VNC_PORT, Slot, SlotNetwork
from polydev.vm.pool import WarmPool
from polydev.vm.proc import engine_tag, find_marked_processes, marker_for
from polydev.vm.reaper import Reaper
from polydev.vm.types import (
    VM,
    Backend,
    EgressHook,
    EngineInfo,
    PoolPrepare,
    Purpose,
    Started,
    VMCapacityError,
    VMCreateError,
    VMSpec,
)

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.images import Image

__all__ = ["VM", "Backend", "EngineInfo", "PoolPrepare", "Purpose", "Started", "VMCapacityError", "VMCreateError",
           "VMEngine", "VMSpec", "engine_tag", "find_marked_processes", "marker_for"]

log = structlog.get_logger(__name__)

RETRY_CLEANUP_AFTER = timedelta(seconds=30)
PREPARE_AGENT_TIMEOUT = 120.0  # s per agent call: a restored TCG guest's first requests are slow
CANCELLED = "cancelled before it started"  # the row's reason when its flow or the server stopped its start


def _first_line(exc: BaseException) -> str:
    """Why a VM did not come up, for its row: a cancel (its flow was cancelled, the server is stopping) in
    words, anything else by its first line."""
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class VMEngine:
    def __init__(self, *, backend: Backend, vms: VmRepo, cleanup: CleanupTaskRepo, leases: LeaseRepo,
                 data_dir: Path, network: SlotNetwork | None = None, vcpus: dict[str, int] | None = None,
                 memory_mb: dict[str, int] | None = None, keep_failed: bool = False, pool_size: int = 0,
                 pool_prepare: PoolPrepare | None = None, egress: EgressHook | None = None,
                 process_finder: Callable[[str], dict[uuid.UUID, int]] = find_marked_processes,
                 min_free_disk_mb: int = 0) -> None:
        self.backend = backend
        self.vms = vms
        self.cleanup = cleanup
        self.leases = leases
        self.network = network
        # Asked by the start-up reconcile of each VM lost with its server: whether its disk is still needed
        # (a workspace's files), to be kept and booted cold rather than removed. Set before reconcile.
        self.keeps_disk: Callable[[uuid.UUID], Awaitable[bool]] | None = None
        self.data_dir = data_dir
        self.vms_dir = data_dir / "vms"  # a work directory per VM (its disk, console, sockets)
        self.logs_dir = data_dir / "logs"  # console logs kept after their VM is gone
        self.tag = engine_tag(data_dir)
        self.vcpus = vcpus or {"cli": 1, "browser": 2}
        self.memory_mb = memory_mb or {"cli": 2048, "browser": 4096}
        self.keep_failed = keep_failed
        self.egress = egress  # the egress gateway, when VMs reach the outside through it
        self._find = process_finder
        # What this process knows of the VMs it started (and has not destroyed): lost with the process.
        self._tokens: dict[uuid.UUID, str] = {}
        self._urls: dict[uuid.UUID, str] = {}
        self._vnc: dict[uuid.UUID, tuple[str, int]] = {}
        # Creations under way (each event is set once its creation has ended), and whether close() has begun.
        self._creating: dict[uuid.UUID, asyncio.Event] = {}
        self._closing = False
        # Warm pool: running `cli` VMs owned by nobody, handed out by create() without waiting for a start.
        self.pool = WarmPool(vms=vms, size=pool_size, prepare=pool_prepare,
                             start=lambda: self._create(None, "cli", ttl=None), prepare_vm=self._prepare)
        self.reaper = Reaper(self)
        # VMs paused on a full data directory are resumed once space is back (on the reaper's beat).
        self.disk = DiskWatch(DiskSpace(data_dir, min_free_disk_mb), backend,
                              lambda: [self.workdir(vm_id) for vm_id in self._tokens])

    # -- paths --------------------------------------------------------------------------------------------
    def workdir(self, vm_id: uuid.UUID) -> Path:
        return self.vms_dir / str(vm_id)

    # -- description --------------------------------------------------------------------------------------
    def describe(self) -> EngineInfo:
        info = self.backend.describe()
        return EngineInfo(backend=self.backend.name, accel=info.accel,
                          network_mode="tap" if self.network is not None else "user",
                          image_packages=info.image_packages, image_clis=info.image_clis, image_hash=info.image_hash,
                          pool=self.pool.view())

    # -- create / destroy ---------------------------------------------------------------------------------
    async def create(self, user_id: uuid.UUID | None, purpose: Purpose = "cli",
                     ttl: timedelta = timedelta(minutes=30), on_row: Callable[[uuid.UUID], None] | None = None
                     ) -> VM:
        """`on_row`: called once the VM has its row (its user's and its host's use count it from then on)."""
        if purpose == "cli" and (pooled := self.pool.take(user_id, ttl)) is not None:
            self._extend(pooled.id, pooled.expires_at)
            if self.egress is not None:
                self.egress.update(pooled.id, user_id=user_id)
            if on_row is not None:
                on_row(pooled.id)
            return pooled
        return await self._create(user_id, purpose, ttl, on_row)

    async def assign(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, ttl: timedelta) -> VM:
        """Give a running VM that was started for nobody (a pooled one) to its user, with a new expiry."""
        expires = utcnow() + ttl
        row = await self.vms.update_returning(vm_id, user_id=user_id, expires_at=expires)
        if row is None:
            raise KeyError(vm_id)
        self._extend(vm_id, expires)
        if self.egress is not None:
            self.egress.update(vm_id, user_id=user_id)
        return VM.of(row, self._urls.get(vm_id))

    def _extend(self, vm_id: uuid.UUID, expires: datetime | None) -> None:
        """Move a VM's deadline to its new expiry: its supervisor ends it then, whether or not this process runs."""
        with contextlib.suppress(FileNotFoundError):  # its work directory is gone: it is being destroyed
            lifetime.set_deadline(lifetime.deadline_file(self.workdir(vm_id)), expires)

    def label(self, vm_id: uuid.UUID, *, purpose: str, provider: str | None = None, browser: bool = False) -> None:
        """Say what a VM is for (login, run, sandbox; which provider; whether it shows the login browser): the
        egress gateway lets its connections reach what that purpose needs. Unlabelled VMs reach nothing."""
        if self.egress is not None:
            self.egress.update(vm_id, purpose=purpose, provider=provider, browser=browser)

    def egress_refusal(self, vm_id: uuid.UUID, host: str | None = None) -> str | None:
        """Why the egress gateway last refused or failed a connection of this VM (to `host`), if it did."""
        return self.egress.last_refusal(vm_id, host) if self.egress is not None else None

    async def stall_reason(self, vm_id: uuid.UUID) -> str | None:
        """Why the hypervisor holds this VM paused, if it does: its disk could not grow (the data directory
        is full). A flow whose VM stopped answering asks before it says so."""
        if vm_id not in self._tokens or not await self.disk.paused(self.workdir(vm_id)):
            return None
        return OUT_OF_DISK

    async def fill_pool(self) -> int:
        """Start VMs until the pool holds its size; returns how many it started."""
        return await self.pool.fill()

    def start_pool(self, retry_after: float = 5.0) -> None:
        """Keep the pool full in the background (refilled after every hand-out)."""
        self.pool.start(retry_after)

    async def _prepare(self, vm: VM, hook: PoolPrepare) -> None:
        """Run the pool's hook on a VM not yet pooled; if it fails (or is cancelled), the VM is torn down and
        its row marked failed with the reason, as a failed start is."""
        try:
            with self.agent(vm.id, timeout=PREPARE_AGENT_TIMEOUT) as client:
                await hook(vm, client)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "cancelled while prepared for the pool" if cancelled else \
                "pool preparation failed: " + _first_line(exc)
            row = await self.vms.get(vm.id)
            kept = await self._fail(row, reason, keep_console=not cancelled) if row is not None else None
            log.warning("vm_prepare_failed", vm_id=str(vm.id), reason=reason)
            if isinstance(exc, Exception):
                raise VMCreateError(vm.id, reason, kept) from exc
            raise

    async def _create(self, user_id: uuid.UUID | None, purpose: Purpose, ttl: timedelta | None,
                      on_row: Callable[[uuid.UUID], None] | None = None) -> VM:
        vm_id = uuid.uuid4()
        if self._closing:
            raise VMCreateError(vm_id, "the VM engine is shutting down")
        ended = self._creating[vm_id] = asyncio.Event()
        try:
            return await self._make(vm_id, user_id, purpose, ttl, on_row)
        finally:
            del self._creating[vm_id]
            ended.set()

    async def _make(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, purpose: Purpose,
                    ttl: timedelta | None, on_row: Callable[[uuid.UUID], None] | None = None) -> VM:
        workdir = self.workdir(vm_id)
        expires = utcnow() + ttl if ttl is not None else None  # pooled VMs do not expire until handed out
        try:
            row = await self.vms.create(vm_id=vm_id, user_id=user_id, purpose=purpose, backend=self.backend.name,
                                        vcpu_count=self.vcpus[purpose], memory_mb=self.memory_mb[purpose],
                                        workdir=str(workdir), expires_at=expires)
        except asyncio.CancelledError:
            # The insert may have committed before the cancel (close() stopping the pool's filler) arrived:
            # leave no row that says "creating" for a VM nothing will start.
            with contextlib.suppress(Exception):
                await self.vms.mark_failed(vm_id, CANCELLED)
            raise
        if on_row is not None:
            on_row(vm_id)
        token = secrets.token_urlsafe(32)
        slot: Slot | None = None
        try:
            workdir.mkdir(parents=True, mode=0o700)
            deadline = lifetime.deadline_file(workdir)
            lifetime.set_deadline(deadline, expires)  # before anything starts: the hypervisor's supervisor reads it
            slot, egress_socket = await self.plug(vm_id, user_id)
            if self._closing:  # close() began while this waited: it must not start a VM it would not destroy
                raise VMCreateError(vm_id, "the VM engine is shutting down")
            spec = VMSpec(vm_id, purpose, self.vcpus[purpose], self.memory_mb[purpose], workdir, token,
                          marker_for(self.tag, vm_id), slot, egress_socket, deadline)
            started = await self.backend.start(spec)
        except BaseException as exc:
            reason = exc.reason if isinstance(exc, VMCreateError) else _first_line(exc)
            # A cancelled start's console shows nothing wrong: it is not kept.
            kept = await self._fail(row, reason, keep_console=not isinstance(exc, asyncio.CancelledError))
            log.warning("vm_create_failed", vm_id=str(vm_id), reason=reason, console_log=str(kept) if kept else None)
            if isinstance(exc, Exception):
                error = VMCapacityError if isinstance(exc, PoolExhausted) else VMCreateError
                raise error(vm_id, reason, kept) from exc
            raise
        return await self._running(row, token, slot, started)

    async def plug(self, vm_id: uuid.UUID, user_id: uuid.UUID) -> tuple[Slot | None, int | None]:
        """The VM's network: its slot (tap mode: a lease, a namespace and a TAP) and its link to the egress
        gateway (the socket QEMU forwards to, under user networking). Undone by `unplug` (and egress detach)."""
        slot: Slot | None = None
        if self.network is not None:
            index = await self.leases.acquire(vm_id, self.network.capacity,
                                              lambda i: self.network.address(i).host_ip)  # type: ignore[union-attr]
            await self.vms.update(vm_id, slot_index=index)
            slot = await asyncio.to_thread(self.network.create, index)
        egress_socket = None
        if self.egress is not None and self.network is None:  # user networking: QEMU forwards to it
            egress_socket = await self.egress.attach(vm_id, user_id)
        elif self.egress is not None and slot is not None and self.network.egress_port:  # type: ignore[union-attr]
            # tap: the slot DNATs the guest's proxy address to this listener at its host end
            listener = await asyncio.to_thread(self.network.listen, slot)  # type: ignore[union-attr]
            await self.egress.attach(vm_id, user_id, listener=listener, peer=slot.ns_ip)
        return slot, egress_socket

    async def unplug(self, vm_id: uuid.UUID, index: int | None) -> list[str]:
        """Its network slot and lease (tap mode) released; returns what failed."""
        errors: list[str] = []
        if self.network is not None:
            if index is None:
                index = next((i for i, v in (await self.leases.held()).items() if v == vm_id), None)
            if index is not None:
                try:
                    await asyncio.to_thread(self.network.destroy, index)
                except Exception as exc:
                    errors.append(f"network: {exc}")
        await self.leases.release(vm_id)
        return errors

    async def _running(self, row: VmRecord, token: str, slot: Slot | None, started: Started) -> VM:
        vm_id = row.vm_id
        self._tokens[vm_id] = token
        self._urls[vm_id] = started.agent_url
        vnc = started.vnc_address or ((slot.ns_ip, VNC_PORT) if slot is not None else None)
        if row.purpose == "browser" and vnc is not None:  # only login-browser VMs run a VNC server
            self._vnc[vm_id] = vnc
        await self.vms.update(vm_id, status="running", backend_pid=started.pid, agent_port=started.agent_port,
                              socket_path=started.socket_path,
                              ip_address=slot.ns_ip if slot else "127.0.0.1",
                              tap_device=slot.netns if slot else None, last_heartbeat=utcnow())
        log.info("vm_created", vm_id=str(vm_id), purpose=row.purpose, backend=self.backend.name,
                 slot=slot.index if slot else None)
        fresh = await self.vms.get(vm_id)
        assert fresh is not None
        return VM.of(fresh, started.agent_url)

    async def destroy(self, vm_id: uuid.UUID) -> bool:
        """Destroy a VM; False if there was no live VM by that id. Safe to call more than once."""
        row = await self.vms.get(vm_id)
        if row is None or row.status in ("destroyed", "failed") or not self.hosts(row):
            return False
        self.pool.discard(vm_id)
        await self.teardown(row, failed=False)
        await self.vms.mark_destroyed(vm_id)
        log.info("vm_destroyed", vm_id=str(vm_id))
        return True

    async def _fail(self, row: VmRecord, reason: str, *, keep_console: bool = True) -> Path | None:
        """Tear down a VM that did not make it and mark its row failed with the reason; returns the kept
        console log."""
        kept = await self.teardown(row, failed=keep_console)
        await self.vms.mark_failed(row.vm_id, reason + (f" (console log: {kept})" if kept else ""))
        return kept

    # -- the engine's own bookkeeping, for the reaper ------------------------------------------------------
    def hosts(self, row: VmRecord) -> bool:
        """Whether the VM is this server's: another server's VM lives on another machine, where its process
        id means nothing here (tearing it down here could kill an unrelated process)."""
        mine = self.vms.server_id
        return mine is None or row.server_id in (None, mine)

    def processes(self) -> dict[uuid.UUID, int]:
        """This engine's hypervisor processes on the machine (by their marker): VM id → pid."""
        return self._find(self.tag)

    def running_here(self) -> frozenset[uuid.UUID]:
        """The VMs this engine process started and has not destroyed: the only ones whose tokens it holds."""
        return frozenset(self._tokens)

    async def teardown(self, row: VmRecord, *, failed: bool) -> Path | None:
        """Ordered, tolerant cleanup: process, network slot, lease, disk. Returns the kept console log. The
        row's status is the caller's business; what fails here is retried by a cleanup task."""
        vm_id = row.vm_id
        self._tokens.pop(vm_id, None)
        self._urls.pop(vm_id, None)
        self._vnc.pop(vm_id, None)
        if self.egress is not None:
            with contextlib.suppress(Exception):
                await self.egress.detach(vm_id)  # its tunnels end, its socket goes
        workdir = Path(row.workdir) if row.workdir else self.workdir(vm_id)
        errors: list[str] = []
        pid = row.backend_pid or self.processes().get(vm_id)
        try:
            await self.backend.stop(pid, workdir)
        except Exception as exc:  # keep going: a stuck process must not keep its disk and address forever
            errors.append(f"stop: {exc}")
        errors += await self.unplug(vm_id, row.slot_index)
        kept = self.keep_console(workdir, vm_id) if (failed or self.keep_failed) else None
        shutil.rmtree(workdir, ignore_errors=True)
        if errors:
            await self.cleanup.schedule(vm_id, utcnow() + RETRY_CLEANUP_AFTER)
            log.error("vm_cleanup_incomplete", vm_id=str(vm_id), errors=errors)
        return kept

    def keep_console(self, workdir: Path, vm_id: uuid.UUID) -> Path | None:
        """Copy a VM's console log where it outlives the VM (the logs directory); None when it had none."""
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

    def runs_here(self, vm_id: uuid.UUID) -> bool:
        return vm_id in self._tokens

    def agent(self, vm_id: uuid.UUID, timeout: float = 60.0) -> AgentClient:
        from polydev.vm.agent_client import AgentClient

        url, token = self.agent_endpoint(vm_id)
        return AgentClient(url, token, timeout=timeout)

    # -- the guest image (polydev.vm.image_updates) ---------------------------------------------------------
    async def switch_image(self, image: Image) -> int:
        """New VMs from `image` from now on, the warm pool's too: its ready VMs (of the old image) are replaced.
        VMs in use run on; returns how many pooled VMs were replaced. ValueError when the backend cannot."""
        use = getattr(self.backend, "use_image", None)
        if use is None:
            raise ValueError(f"the {self.backend.name} backend cannot switch images while it runs")
        use(image)
        old = list(self.pool.ready)
        for vm_id in old:
            await self.destroy(vm_id)  # (the pool refills from the new image)
        log.info("image_switched", image=image.hash, pooled_replaced=len(old))
        return len(old)

    # -- hibernation (polydev.vm.hibernation) -------------------------------------------------------------
    async def hibernate(self, vm_id: uuid.UUID, memory: bool = True) -> str:
        """Save the running VM to its work directory (without `memory`: only its disk) and end its process;
        returns its agent's token, which `wake` needs (this engine forgets it). CannotHibernate says why not."""
        return await hibernation.hibernate(self, vm_id, memory)

    async def wake(self, vm_id: uuid.UUID, token: str, ttl: timedelta) -> VM:
        """Start a hibernated VM again as it was; VMCreateError when it fails (its files are kept)."""
        return await hibernation.wake(self, vm_id, token, ttl)

    # -- reconcile and reaping (polydev.vm.reaper) ---------------------------------------------------------
    async def reconcile(self, keep: Collection[uuid.UUID] = ()) -> dict[str, int]:
        """Make the machine match the database (at start-up), leaving the VM rows of the live servers in
        `keep` alone; see Reaper.reconcile."""
        return await self.reaper.reconcile(keep)

    async def reap_once(self) -> int:
        """Destroy expired VMs and run due cleanup tasks. Returns how many VMs it destroyed."""
        return await self.reaper.reap_once()

    def start_reaper(self, interval: float = 5.0) -> None:
        self.reaper.start(interval)

    async def close(self, destroy_all: bool = True) -> None:
        """Stop the reaper and the pool, wait for the creations under way (no new one starts), then destroy
        every VM this process runs (unless told not to)."""
        await self.reaper.stop()
        await self.pool.stop()
        self._closing = True
        # A creation still under way would start a VM after the ones below are destroyed, and nothing would
        # stop it: its backend's start is waited for (a cancelled one waits for it too), then it is in
        # `_tokens` or gone.
        await asyncio.gather(*(ended.wait() for ended in list(self._creating.values())))
        if destroy_all:
            for vm_id in list(self._tokens):
                await self.destroy(vm_id)
