"""Workspaces: a project the CLIs work on across turns, kept on the disk of a VM of its own.

A workspace is made empty, from an uploaded archive (tar, tar.gz or zip), or cloned from a git repository
(core/workspace_git.py: through the egress gateway, a private one with the user's token, sealed; a branch can
be pushed back); its files are under /workspace in its VM, always a git repository (an archive or an empty
one gets a first commit), so each turn's changes are a `git diff` away. A terminal (core/workspace_terminal.py)
is a login shell there. The VM runs while the workspace is used and is
hibernated (vm/hibernation.py: memory, devices and disk) once idle for `idle_pause_s`, or when this server
stops; whatever needs it next wakes it. A user may have `Limits.paused` workspaces sleeping with their memory
saved (each costs about its RAM on disk); past that one is paused with its disk only and boots cold. The agent's token, which the engine keeps in memory only, is sealed
in the row while the VM sleeps.

If the server dies without stopping (kill -9, power), the VM dies with it, but its disk is kept: the engine's
start-up reconcile asks `holds_vm` and turns such a VM into one hibernated without memory (vm/hibernation.py
`keep_disk`), which the next use boots cold with a new token. What the guest had not written to disk is lost;
each turn ends with a `sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import structlog

from polydev.core import workspace_git
from polydev.core.tasks import every
from polydev.core.vm_flow import Admit
from polydev.core.workspace_git import GitUrlError, Remote
from polydev.core.workspace_models import (
    GitAccess,
    Limits,
    Pushed,
    Source,
    WorkspaceBusy,
    WorkspaceError,
    WorkspaceInvalid,
    WorkspaceLimit,
    WorkspaceNotFound,
    WorkspaceUnavailable,
    WorkspaceView,
)
from polydev.core.workspace_terminal import Terminal, TerminalError
from polydev.core.workspace_vm import PREPARE_TIMEOUT_S, ROOT, InVm, size, stream_stdout
from polydev.egress.policy import WORKSPACE_PURPOSE
from polydev.store.models import Workspace, utcnow
from polydev.store.vault import SealedRecord, Vault
from polydev.store.workspaces import WorkspaceRepo

if TYPE_CHECKING:
    from polydev.core.ports import VmPort

log = structlog.get_logger(__name__)
T = TypeVar("T")

SWEEP_S = 10.0
# How long past its idle pause a workspace VM may live before its supervisor ends it: long enough that the
# sweep always pauses it first; each use pushes it out again.
VM_MARGIN = timedelta(hours=1)
TERMINAL_KEEPALIVE = timedelta(minutes=5)  # how often an open terminal marks its workspace used


class Workspaces:
    def __init__(self, repo: WorkspaceRepo, vault: Vault, engine: Callable[[], tuple[VmPort | None, str | None]],
                 admit: Admit, limits: Limits = Limits(), idle_pause_s: int = 600,
                 git: GitAccess = GitAccess()) -> None:
        self._repo = repo
        self._vault = vault
        self._engine = engine
        self._admit = admit
        self.limits = limits
        self.git = git
        self._vm = InVm(git, self._refusal)
        self.idle_pause = timedelta(seconds=idle_pause_s)
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._making: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._busy: set[uuid.UUID] = set()  # a turn runs on it: neither paused by the sweep nor deleted
        self._terminals: dict[uuid.UUID, int] = {}  # open terminals: not paused by the sweep meanwhile

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
        remote = self._remote(source)
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
        engine.label(vm.id, purpose=WORKSPACE_PURPOSE)
        row = Workspace(id=uuid.uuid4(), user_id=user_id, name=name, source=source.kind, state="creating",
                        vm_id=vm.id, size_bytes=incoming, repo_url=remote.url if remote else None,
                        branch=remote.branch if remote else None)
        if source.git_token:
            row.sealed_git_token = self._seal_git(row, source.git_token)
        try:
            await self._repo.add(row)
        except BaseException:
            await engine.destroy(vm.id)
            raise
        self._making[row.id] = asyncio.create_task(self._make(row, source, remote), name=f"workspace-{row.id}")
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

    async def pause(self, user_id: uuid.UUID, workspace_id: uuid.UUID, memory: bool = True) -> WorkspaceView:
        """Pause it now: with its memory (WorkspaceLimit past the user's paused limit), or its disk only."""
        row = await self._row(user_id, workspace_id)
        if workspace_id in self._busy:
            raise WorkspaceBusy("a turn is running on the workspace")
        async with self._lock(workspace_id):
            row = await self._row(user_id, workspace_id)
            if row.state == "ready":
                if memory and not await self._may_keep_memory(user_id):
                    raise WorkspaceLimit(f"you have {self.limits.paused} workspaces paused with their memory, the "
                                         "most allowed: pause with memory=false (its disk only; it boots cold "
                                         "when used), or use or delete one of them")
                await self._pause(row, memory=memory)
        return await self.get(user_id, workspace_id)

    async def push(self, user_id: uuid.UUID, workspace_id: uuid.UUID, branch: str) -> Pushed:
        """The workspace's HEAD (every turn is committed) pushed to `branch` on the repository it was cloned
        from, with the user's stored token; never forced."""
        row = await self._row(user_id, workspace_id)
        if row.source != "git" or not row.repo_url:
            raise WorkspaceBusy("only a workspace cloned from a git repository can be pushed")
        try:
            workspace_git.check_branch(branch)
        except GitUrlError as exc:
            raise WorkspaceInvalid(str(exc)) from None
        if workspace_id in self._busy:
            raise WorkspaceBusy("a turn is running on the workspace: push once it has ended")
        row = await self.ready(user_id, workspace_id)
        token = self._unseal_git(row)
        remote = Remote(url=row.repo_url or "", host=_host(row.repo_url or ""))
        commit = await asyncio.to_thread(self._in_vm, row.vm_id, self._vm.push, remote, branch, token)
        log.info("workspace_pushed", workspace_id=str(row.id), host=remote.host, branch=branch)
        return Pushed(branch=branch, commit=commit, remote=remote.url)

    async def terminal(self, user_id: uuid.UUID, workspace_id: uuid.UUID, rows: int, cols: int) -> Terminal:
        """A login shell in /workspace on the workspace's VM (woken if it slept), started; the workspace is
        not paused while the terminal is open (`close_terminal`)."""
        row = await self.ready(user_id, workspace_id)
        engine = self._port()
        vm_id = row.vm_id
        assert vm_id is not None
        env = {"TERM": "xterm-256color", "LANG": "C.UTF-8"}
        proxy = self.git.proxy()
        if proxy:  # git and curl in the shell go out through the gateway, as the workspace's VM may
            env.update({"https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "HTTP_PROXY": proxy})
        term = Terminal(lambda: engine.agent(vm_id, timeout=60), rows=rows, cols=cols, cwd=ROOT, env=env)
        self._terminals[workspace_id] = self._terminals.get(workspace_id, 0) + 1
        try:
            await term.start()
        except BaseException as exc:
            self._terminal_closed(workspace_id)
            if isinstance(exc, TerminalError):
                raise WorkspaceUnavailable(f"the terminal did not start: {exc}") from None
            raise
        return term

    async def close_terminal(self, workspace_id: uuid.UUID, term: Terminal) -> None:
        await term.close()
        self._terminal_closed(workspace_id)
        with contextlib.suppress(Exception):  # the workspace was deleted meanwhile
            await self._repo.update(workspace_id, used_at=utcnow())

    def _terminal_closed(self, workspace_id: uuid.UUID) -> None:
        left = self._terminals.get(workspace_id, 1) - 1
        if left > 0:
            self._terminals[workspace_id] = left
        else:
            self._terminals.pop(workspace_id, None)

    async def archive(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> AsyncIterator[bytes]:
        """/workspace as a tar.gz stream (its .git included), the VM woken first if it sleeps."""
        row = await self.ready(user_id, workspace_id)
        agent = self._port().agent(row.vm_id, timeout=PREPARE_TIMEOUT_S)  # type: ignore[arg-type]
        return stream_stdout(agent, ["tar", "-czf", "-", "-C", ROOT, "."])

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
                engine.label(row.vm_id, purpose=WORKSPACE_PURPOSE)

    async def holds_vm(self, vm_id: uuid.UUID) -> bool:
        """For the engine's start-up reconcile: whether a lost VM's disk is a workspace's, to be kept."""
        return any(row.vm_id == vm_id for row in await self._repo.live(states=("ready", "paused")))

    # -- idle pause and shutdown --------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Pause the workspaces idle for `idle_pause`; returns how many. A workspace with a terminal open is in
        use: its VM's lifetime is pushed out again, or its supervisor would end it under the user's shell."""
        for workspace_id in list(self._terminals):
            row = await self._repo.get(workspace_id)
            if row is not None and row.vm_id is not None and row.used_at < utcnow() - TERMINAL_KEEPALIVE:
                with contextlib.suppress(Exception):  # its VM went away: the terminal says so itself
                    await self._port().assign(row.vm_id, row.user_id, self._vm_ttl)
                    await self._repo.update(workspace_id, used_at=utcnow())
        paused = 0
        for row in await self._repo.idle(utcnow() - self.idle_pause):
            lock = self._lock(row.id)
            if lock.locked() or row.id in self._busy or row.id in self._terminals:
                continue  # in use right now
            if not await self._vm_running(row):
                continue  # its VM runs on another server (whose sweep pauses it), or is not running
            async with lock:
                current = await self._repo.get(row.id)
                if current is None or current.state != "ready" or current.used_at >= utcnow() - self.idle_pause:
                    continue
                try:
                    await self._pause(current, memory=await self._may_keep_memory(current.user_id))
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
                    await self._pause(row, memory=await self._may_keep_memory(row.user_id))
                except Exception as exc:  # noqa: BLE001 - its disk is still kept (holds_vm) for a cold boot
                    log.warning("workspace_pause_at_stop_failed", workspace_id=str(row.id), reason=str(exc))

    # -- the VM ---------------------------------------------------------------------------------------------
    async def _make(self, row: Workspace, source: Source, remote: Remote | None) -> None:
        try:
            measured = await asyncio.to_thread(self._in_vm, row.vm_id, self._vm.prepare, source, remote)
            await self._repo.update(row.id, state="ready", size_bytes=measured, used_at=utcnow())
            log.info("workspace_ready", workspace_id=str(row.id), size_bytes=measured)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, WorkspaceError) else f"preparing the workspace failed: {exc}"
            reason = workspace_git.redact(reason, source.git_token)
            engine, _ = self._engine()
            if engine is not None and row.vm_id is not None:
                await engine.destroy(row.vm_id)  # a failed workspace holds no VM; its row says why
            await self._repo.update(row.id, state="failed", error=reason[:1000], vm_id=None)
            log.warning("workspace_failed", workspace_id=str(row.id), reason=reason)
        finally:
            self._making.pop(row.id, None)

    def _in_vm(self, vm_id: uuid.UUID | None, call: Callable[..., T], *args: object) -> T:
        """In a thread: `call(agent, vm_id, *args)` with a client for the VM's agent."""
        assert vm_id is not None
        with self._port().agent(vm_id, timeout=PREPARE_TIMEOUT_S) as agent:
            return call(agent, vm_id, *args)

    def _refusal(self, vm_id: uuid.UUID, host: str) -> str | None:
        engine, _ = self._engine()
        return engine.egress_refusal(vm_id, host) if engine is not None else None

    def _remote(self, source: Source) -> Remote | None:
        if source.kind != "git":
            return None
        try:
            return workspace_git.parse_remote(source.repo_url or "", source.branch, self.git.hosts)
        except GitUrlError as exc:
            raise WorkspaceInvalid(str(exc)) from None

    async def _may_keep_memory(self, user_id: uuid.UUID) -> bool:
        return await self._repo.paused_with_memory(user_id) < self.limits.paused

    async def _vm_running(self, row: Workspace) -> bool:
        if row.vm_id is None:
            return False
        engine = self._port()
        vm = await engine.get(row.vm_id)
        return vm is not None and vm.status == "running" and engine.runs_here(row.vm_id)

    async def _pause(self, row: Workspace, memory: bool = True) -> None:
        """Caller holds the workspace's lock."""
        from polydev.vm.hibernation import CannotHibernate

        assert row.vm_id is not None
        engine = self._port()
        with contextlib.suppress(Exception):  # the size is a courtesy: a VM that cannot answer still pauses
            await self._repo.update(row.id, size_bytes=await asyncio.to_thread(self._measure, row.vm_id))
        try:
            token = await engine.hibernate(row.vm_id, memory=memory)
        except CannotHibernate as exc:
            raise WorkspaceUnavailable(f"the workspace could not be paused: {exc}") from None
        await self._repo.update(row.id, state="paused", sealed_agent=self._seal(row, token), paused_memory=memory)
        log.info("workspace_paused", workspace_id=str(row.id), vm_id=str(row.vm_id), memory=memory)

    def _measure(self, vm_id: uuid.UUID) -> int:
        with self._port().agent(vm_id, timeout=60) as agent:
            return size(agent)

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
        engine.label(vm.id, purpose=WORKSPACE_PURPOSE)
        await self._repo.update(row.id, state="ready", sealed_agent=None, paused_memory=False)
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

    def _seal_git(self, row: Workspace, token: str) -> str:
        return json.dumps(self._vault.seal(row.user_id, f"workspace-git:{row.id}", token.encode()).__dict__)

    def _unseal_git(self, row: Workspace) -> str | None:
        if not row.sealed_git_token:
            return None
        record = SealedRecord(**json.loads(row.sealed_git_token))
        return self._vault.open(row.user_id, f"workspace-git:{row.id}", record).decode()


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower()


def _view(row: Workspace) -> WorkspaceView:
    return WorkspaceView(id=row.id, user_id=row.user_id, name=row.name, source=row.source, repo_url=row.repo_url,
                         branch=row.branch,
                         state=row.state, size_bytes=row.size_bytes or 0, error=row.error, vm_id=row.vm_id,
                         created_at=row.created_at, used_at=row.used_at)

