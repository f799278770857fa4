"""Workspaces: a project the CLIs work on across turns, kept on the disk of a VM of its own.

A workspace is made empty, from an uploaded archive (tar, tar.gz or zip), or (later) from a git repository;
its files are under /workspace in its VM, always a git repository (an archive or an empty one gets a first
commit), so each turn's changes are a `git diff` away. The VM runs while the workspace is used and is
hibernated (vm/hibernation.py: memory, devices and disk) once idle for `idle_pause_s`, or when this server
stops; whatever needs it next wakes it. The agent's token, which the engine keeps in memory only, is sealed
in the row while the VM sleeps.

If the server dies without stopping (kill -9, power), the VM dies with it, but its disk is kept: the engine's
start-up reconcile asks `holds_vm` and turns such a VM into one hibernated without memory (vm/hibernation.py
`keep_disk`), which the next use boots cold with a new token. What the guest had not written to disk is lost;
each turn ends with a `sync`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import secrets
import shlex
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from polydev.core.tasks import every
from polydev.core.vm_flow import Admit
from polydev.store.models import Workspace, utcnow
from polydev.store.vault import SealedRecord, Vault
from polydev.store.workspaces import WorkspaceRepo

if TYPE_CHECKING:
    from polydev.core.ports import VmPort
    from polydev.vm.agent_client import AgentClient

log = structlog.get_logger(__name__)

ROOT = "/workspace"
UPLOAD = "/tmp/polydev-workspace-upload"
ARCHIVE_KINDS = ("tar", "zip")  # tar: plain or compressed (tar finds out), zip
PREPARE_TIMEOUT_S = 600
SWEEP_S = 10.0
# How long past its idle pause a workspace VM may live before its supervisor ends it: long enough that the
# sweep always pauses it first; each use pushes it out again.
VM_MARGIN = timedelta(hours=1)
GIT_IDENTITY = ["-c", "user.name=Polydev", "-c", "user.email=polydev@localhost"]


class WorkspaceError(Exception):
    """Base: the text is the reason, as the API gives it."""


class WorkspaceNotFound(WorkspaceError):
    pass


class WorkspaceLimit(WorkspaceError):
    pass


class WorkspaceUnavailable(WorkspaceError):
    pass


class WorkspaceBusy(WorkspaceError):
    """Not ready for that now (still being made, or it failed); the text says which."""


@dataclass(frozen=True)
class Limits:
    workspaces: int = 10  # per user, whatever their state
    total_bytes: int = 5 * 1024**3  # of all the user's workspaces, as last measured
    upload_bytes: int = 100 * 1024**2  # one archive


@dataclass(frozen=True)
class WorkspaceView:
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    source: str
    repo_url: str | None
    state: str
    size_bytes: int
    error: str | None
    vm_id: uuid.UUID | None
    created_at: datetime
    used_at: datetime


@dataclass(frozen=True)
class Source:
    kind: str  # empty | archive (git comes with the egress rules for repository hosts)
    archive: bytes | None = None
    archive_kind: str | None = None  # ARCHIVE_KINDS


class Workspaces:
    def __init__(self, repo: WorkspaceRepo, vault: Vault, engine: Callable[[], tuple[VmPort | None, str | None]],
                 admit: Admit, limits: Limits = Limits(), idle_pause_s: int = 600) -> None:
        self._repo = repo
        self._vault = vault
        self._engine = engine
        self._admit = admit
        self.limits = limits
        self.idle_pause = timedelta(seconds=idle_pause_s)
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._making: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._busy: set[uuid.UUID] = set()  # a turn runs on it: neither paused by the sweep nor deleted

    def _port(self) -> VmPort:
        engine, reason = self._engine()
        if engine is None:
            raise WorkspaceUnavailable(f"workspaces are unavailable on this server: {reason or 'no VM engine'}")
        return engine

    def _lock(self, workspace_id: uuid.UUID) -> asyncio.Lock:
        return self._locks.setdefault(workspace_id, asyncio.Lock())

    @property
    def _vm_ttl(self) -> timedelta:
        return self.idle_pause + VM_MARGIN

    # -- API-facing ---------------------------------------------------------------------------------------
    async def create(self, user_id: uuid.UUID, name: str, source: Source) -> WorkspaceView:
        """Checks the limits, starts its VM and answers at once (`creating`); the files are put in the
        background, and the workspace becomes `ready`, or `failed` with the reason."""
        count, used = await self._repo.usage(user_id)
        if count >= self.limits.workspaces:
            raise WorkspaceLimit(f"you have {count} workspaces, the most allowed ({self.limits.workspaces}); delete "
                                 "one first")
        incoming = len(source.archive or b"")
        if used + incoming > self.limits.total_bytes:
            raise WorkspaceLimit(f"your workspaces hold {used} bytes; with this one they would pass the "
                                 f"{self.limits.total_bytes} bytes allowed")
        engine = self._port()
        hold = await self._admit(user_id, "vm", "cli")
        from polydev.vm.engine import VMCreateError

        try:
            vm = await engine.create(user_id, "cli", ttl=self._vm_ttl, on_row=hold.at_row)
        except BaseException as exc:
            hold.release()  # (a VM that started stays held a moment past its row: Hold)
            if isinstance(exc, VMCreateError):
                raise WorkspaceUnavailable(f"the workspace's VM failed to start: {exc.reason}") from None
            raise
        engine.label(vm.id, purpose="workspace")
        row = Workspace(user_id=user_id, name=name, source=source.kind, state="creating", vm_id=vm.id,
                        size_bytes=incoming)
        try:
            await self._repo.add(row)
        except BaseException:
            await engine.destroy(vm.id)
            raise
        self._making[row.id] = asyncio.create_task(self._make(row, source), name=f"workspace-{row.id}")
        log.info("workspace_created", workspace_id=str(row.id), vm_id=str(vm.id), source=source.kind)
        return _view(row)

    async def list(self, user_id: uuid.UUID | None) -> list[WorkspaceView]:
        return [_view(row) for row in await self._repo.live(user_id=user_id)]

    async def get(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> WorkspaceView:
        return _view(await self._row(user_id, workspace_id))

    async def delete(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
        """Its VM (running or asleep), disk, saved memory and row go."""
        row = await self._row(user_id, workspace_id)
        if workspace_id in self._busy:
            raise WorkspaceBusy("a turn is running on the workspace: cancel it first")
        making = self._making.pop(workspace_id, None)
        if making is not None:
            making.cancel()
            with contextlib.suppress(BaseException):
                await making
        async with self._lock(workspace_id):
            vm_id = row.vm_id
            if await self._repo.delete(workspace_id) and vm_id is not None:
                engine, _ = self._engine()
                if engine is not None:
                    await engine.destroy(vm_id)
        self._locks.pop(workspace_id, None)
        log.info("workspace_deleted", workspace_id=str(workspace_id))

    async def pause(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> WorkspaceView:
        row = await self._row(user_id, workspace_id)
        async with self._lock(workspace_id):
            row = await self._row(user_id, workspace_id)
            if row.state == "ready":
                await self._pause(row)
        return await self.get(user_id, workspace_id)

    async def archive(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> AsyncIterator[bytes]:
        """/workspace as a tar.gz stream (its .git included), the VM woken first if it sleeps."""
        row = await self.ready(user_id, workspace_id)
        agent = self._port().agent(row.vm_id, timeout=PREPARE_TIMEOUT_S)  # type: ignore[arg-type]
        return _stream_stdout(agent, ["tar", "-czf", "-", "-C", ROOT, "."])

    async def ready(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> Workspace:
        """The workspace with its VM running (woken if it slept), marked used now; WorkspaceBusy when it is
        not ready (being made, failed)."""
        async with self._lock(workspace_id):
            row = await self._row(user_id, workspace_id)
            if row.state == "creating":
                raise WorkspaceBusy("the workspace is still being made")
            if row.state == "failed":
                raise WorkspaceBusy(f"the workspace failed: {row.error}")
            if row.state == "paused" or not await self._vm_running(row):
                await self._wake(row)
            else:
                await self._port().assign(row.vm_id, row.user_id, self._vm_ttl)  # type: ignore[arg-type]
            await self._repo.update(row.id, used_at=utcnow())
            return await self._row(user_id, workspace_id)

    async def begin_turn(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> Workspace:
        """A turn starts: the workspace's VM running (woken if it slept), kept so until `end_turn`."""
        row = await self.ready(user_id, workspace_id)
        self._busy.add(workspace_id)
        return row

    async def end_turn(self, workspace_id: uuid.UUID) -> None:
        self._busy.discard(workspace_id)
        with contextlib.suppress(Exception):  # the workspace was deleted meanwhile, or the store is away
            await self._repo.update(workspace_id, used_at=utcnow())
        row = await self._repo.get(workspace_id)
        engine, _ = self._engine()
        if row is not None and row.vm_id is not None and engine is not None:
            with contextlib.suppress(KeyError):  # its VM is gone (it failed with the turn)
                engine.label(row.vm_id, purpose="workspace")

    async def holds_vm(self, vm_id: uuid.UUID) -> bool:
        """For the engine's start-up reconcile: whether a lost VM's disk is a workspace's, to be kept."""
        return any(row.vm_id == vm_id for row in await self._repo.live(states=("ready", "paused")))

    # -- idle pause and shutdown --------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Pause the workspaces idle for `idle_pause`; returns how many."""
        paused = 0
        for row in await self._repo.idle(utcnow() - self.idle_pause):
            lock = self._lock(row.id)
            if lock.locked() or row.id in self._busy:
                continue  # in use right now
            async with lock:
                current = await self._repo.get(row.id)
                if current is None or current.state != "ready" or current.used_at >= utcnow() - self.idle_pause:
                    continue
                try:
                    await self._pause(current)
                    paused += 1
                except WorkspaceError as exc:
                    log.debug("workspace_idle_pause_skipped", workspace_id=str(row.id), reason=str(exc))
        return paused

    def start_sweeper(self, interval: float = SWEEP_S) -> None:
        if self._sweeper is None:
            self._sweeper = every(interval, self.sweep, "workspace-sweep")

    async def close(self) -> None:
        """The server is stopping: every workspace VM running here is paused, so none is lost."""
        sweeper, self._sweeper = self._sweeper, None
        tasks = [t for t in [sweeper, *self._making.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        engine, _ = self._engine()
        if engine is None:
            return
        for row in await self._repo.live(states=("ready",)):
            if await self._vm_running(row):
                try:
                    await self._pause(row)
                except Exception as exc:  # noqa: BLE001 - its disk is still kept (holds_vm) for a cold boot
                    log.warning("workspace_pause_at_stop_failed", workspace_id=str(row.id), reason=str(exc))

    # -- the VM ---------------------------------------------------------------------------------------------
    async def _make(self, row: Workspace, source: Source) -> None:
        try:
            size = await asyncio.to_thread(self._prepare, row.vm_id, source)
            await self._repo.update(row.id, state="ready", size_bytes=size, used_at=utcnow())
            log.info("workspace_ready", workspace_id=str(row.id), size_bytes=size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, WorkspaceError) else f"preparing the workspace failed: {exc}"
            engine, _ = self._engine()
            if engine is not None and row.vm_id is not None:
                await engine.destroy(row.vm_id)  # a failed workspace holds no VM; its row says why
            await self._repo.update(row.id, state="failed", error=reason[:1000], vm_id=None)
            log.warning("workspace_failed", workspace_id=str(row.id), reason=reason)
        finally:
            self._making.pop(row.id, None)

    def _prepare(self, vm_id: uuid.UUID | None, source: Source) -> int:
        """In a thread: put the files under ROOT and make it a git repository with a first commit."""
        assert vm_id is not None
        with self._port().agent(vm_id, timeout=PREPARE_TIMEOUT_S) as agent:
            _run(agent, ["mkdir", "-p", ROOT], "making the workspace directory")
            if source.kind == "archive":
                assert source.archive is not None
                agent.put_file(UPLOAD, source.archive, 0o600)
                unpack = (["tar", "-xf", UPLOAD, "-C", ROOT, "--no-same-owner"] if source.archive_kind == "tar"
                          else ["python3", "-m", "zipfile", "-e", UPLOAD, ROOT])
                _run(agent, unpack, "unpacking the archive", user_error=True)
                agent.exec(["rm", "-f", UPLOAD])
            script = (f"cd {shlex.quote(ROOT)} && if [ ! -e .git ]; then git init -q -b main && git add -A && "
                      f"git {' '.join(GIT_IDENTITY)} commit -q --allow-empty -m 'workspace created'; fi && "
                      # The marker file every run puts in its working directory is Polydev's, not the project's.
                      "echo /.polydev >> .git/info/exclude && sync")
            _run(agent, ["sh", "-c", script], "making the workspace a git repository")
            return _size(agent)

    async def _vm_running(self, row: Workspace) -> bool:
        if row.vm_id is None:
            return False
        vm = await self._port().get(row.vm_id)
        return vm is not None and vm.status == "running"

    async def _pause(self, row: Workspace) -> None:
        """Caller holds the workspace's lock."""
        from polydev.vm.hibernation import CannotHibernate

        assert row.vm_id is not None
        engine = self._port()
        with contextlib.suppress(Exception):  # the size is a courtesy: a VM that cannot answer still pauses
            await self._repo.update(row.id, size_bytes=await asyncio.to_thread(self._measure, row.vm_id))
        try:
            token = await engine.hibernate(row.vm_id)
        except CannotHibernate as exc:
            raise WorkspaceUnavailable(f"the workspace could not be paused: {exc}") from None
        await self._repo.update(row.id, state="paused", sealed_agent=self._seal(row, token))
        log.info("workspace_paused", workspace_id=str(row.id), vm_id=str(row.vm_id))

    def _measure(self, vm_id: uuid.UUID) -> int:
        with self._port().agent(vm_id, timeout=60) as agent:
            return _size(agent)

    async def _wake(self, row: Workspace) -> None:
        """Caller holds the workspace's lock. A VM kept from a crash has no sealed token and no memory: it
        boots cold, and any token is its own."""
        from polydev.vm.engine import VMCreateError
        from polydev.vm.hibernation import CannotHibernate

        assert row.vm_id is not None
        engine = self._port()
        token = self._unseal(row) if row.sealed_agent else secrets.token_urlsafe(32)
        try:
            vm = await engine.wake(row.vm_id, token, self._vm_ttl)
        except CannotHibernate:
            raise WorkspaceUnavailable("the workspace's VM is not on this server") from None
        except VMCreateError as exc:
            raise WorkspaceUnavailable(f"the workspace could not be woken: {exc.reason}") from None
        engine.label(vm.id, purpose="workspace")
        await self._repo.update(row.id, state="ready", sealed_agent=None)
        log.info("workspace_woken", workspace_id=str(row.id), vm_id=str(vm.id))

    # -- rows and secrets ---------------------------------------------------------------------------------
    async def _row(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> Workspace:
        row = await self._repo.get(workspace_id)
        if row is None or row.user_id != user_id:
            raise WorkspaceNotFound("no such workspace")
        return row

    def _seal(self, row: Workspace, token: str) -> str:
        record = self._vault.seal(row.user_id, f"workspace:{row.id}", token.encode())
        return json.dumps(record.__dict__)

    def _unseal(self, row: Workspace) -> str:
        record = SealedRecord(**json.loads(row.sealed_agent or "{}"))
        return self._vault.open(row.user_id, f"workspace:{row.id}", record).decode()


def _run(agent: AgentClient, args: list[str], what: str, user_error: bool = False) -> None:
    result = agent.exec(args, timeout_s=PREPARE_TIMEOUT_S)
    if result.exit_code != 0:
        detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        reason = f"{what} failed: {' / '.join(detail) or f'exit status {result.exit_code}'}"
        raise (WorkspaceBusy if user_error else WorkspaceError)(reason[:500])


def _size(agent: AgentClient) -> int:
    result = agent.exec(["du", "-sb", ROOT], timeout_s=120)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


async def _stream_stdout(agent: AgentClient, args: list[str]) -> AsyncIterator[bytes]:
    """A command's stdout as it comes, read in a thread, at most a few chunks ahead of the reader (an archive
    may be large, its reader slow); when the reader stops, so does the thread, and the command is killed."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=16)
    loop = asyncio.get_running_loop()
    stopped = threading.Event()

    def put(item: bytes | BaseException | None) -> bool:
        while not stopped.is_set():
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                future.result(timeout=1.0)
                return True
            except concurrent.futures.TimeoutError:
                if not future.cancel():  # it went in just then
                    return True
        return False

    def pump() -> None:
        try:
            for event in agent.exec_stream(args, timeout_s=PREPARE_TIMEOUT_S):
                if event.type == "stdout" and not put(event.bytes()):
                    return  # leaving the stream closes its connection: the agent kills the command
                if event.type == "exit" and event.code != 0:
                    raise WorkspaceError(f"{args[0]} exited with status {event.code}")
            put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            put(exc)
        finally:
            agent.close()

    worker = asyncio.ensure_future(asyncio.to_thread(pump))
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        with contextlib.suppress(BaseException):
            await worker


def _view(row: Workspace) -> WorkspaceView:
    return WorkspaceView(id=row.id, user_id=row.user_id, name=row.name, source=row.source, repo_url=row.repo_url,
                         state=row.state, size_bytes=row.size_bytes or 0, error=row.error, vm_id=row.vm_id,
                         created_at=row.created_at, used_at=row.used_at)

