"""E2B-compatible sandboxes: the control plane's logic (create, list, get, kill, set the timeout, connect).

A sandbox is one of the user's VMs under an E2B-style id, with an envd access token that the SDK sends on every
runtime call (checked by `authorize`). The VM is made by the VM engine like any other (quotas, warm pool,
egress gateway, expiry), so it shows in /api/vms, the dashboard and /metrics as the user's VM; the sandbox row
(store/sandboxes.py) adds what E2B's API reports: template, metadata, end time, state.

The VM's expiry is the sandbox's end: the engine's supervisor and reaper end the VM then, and a sandbox whose
end has passed is marked killed when next read. Pause is not implemented yet (see docs/architecture.md).
Every lookup is by (user, id): another user's sandbox is "not found", exactly as a missing one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from polydev.core.sandbox_watch import Watchers
from polydev.core.tasks import cancel_and_wait, every
from polydev.core.vm_flow import Admit
from polydev.egress.policy import OFFLINE_PURPOSE
from polydev.store.models import Sandbox, utcnow
from polydev.store.sandboxes import LIVE_STATES, SandboxRepo
from polydev.store.vault import SealedRecord, Vault

if TYPE_CHECKING:
    from polydev.core.ports import VmPort
    from polydev.vm.agent_client import AgentClient

log = structlog.get_logger(__name__)

# Template → the VM purpose (size) it runs on. `base` is the golden image; the image profile the server boots
# (VM_IMAGE_PROFILE: `full` or `test`) is a template of the same name (Sandboxes' `profile`).
TEMPLATES: dict[str, str] = {"base": "cli"}
# The envd features we serve: stdin, close_stdin, default user, octet-stream uploads (envd/versions.py in the
# SDK gates each on this); not file metadata (0.6.2) nor watch entries (0.6.3).
ENVD_VERSION = "0.5.7"
DISK_SIZE_MB = 0  # overlays grow on demand; no fixed size to report
MIN_TIMEOUT_S = 1
MAX_TIMEOUT_S = 24 * 3600
# A sandbox made with autoPause: its VM lives this long past the sandbox's end, for the sweep (every SWEEP_S)
# to pause it in between.
AUTO_PAUSE_GRACE = timedelta(seconds=120)
SWEEP_S = 5.0
_ID_ALPHABET = string.ascii_lowercase + string.digits


class SandboxError(Exception):
    """What could not be done; the text is the message for whoever asked."""


class SandboxNotFound(SandboxError):
    pass


class TemplateNotFound(SandboxError):
    pass


class SandboxUnavailable(SandboxError):
    """No VM engine here, or none could be started (the reason says which)."""


class SandboxConflict(SandboxError):
    """The sandbox is not in a state that allows this."""


class SandboxLimit(SandboxError):
    """The user has as many sandboxes as they may (running and paused): E2B's rate-limit error."""


class SandboxNotImplemented(SandboxError):
    pass


@dataclass(frozen=True)
class SandboxView:
    """A sandbox as the APIs report it; never its access token (`Opened` carries that, for create and connect)."""

    id: str
    user_id: uuid.UUID
    vm_id: uuid.UUID | None
    template: str
    state: str
    metadata: dict[str, str]
    cpu_count: int
    memory_mb: int
    started_at: datetime
    end_at: datetime


@dataclass(frozen=True)
class Opened:
    """A created or connected sandbox and its envd access token, which the SDK gets only then."""

    sandbox: SandboxView
    access_token: str


@dataclass(frozen=True)
class CreateSpec:
    template: str = "base"
    timeout_s: int = 300
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = None
    auto_pause: bool = False
    auto_pause_memory: bool = True  # False: the timeout's pause keeps only the disk (mode "filesystem")
    internet: bool = True


def new_id() -> str:
    # Lower-case letters and digits only: the id is a DNS label in `49983-{id}.{domain}`.
    return "i" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sandboxes:
    def __init__(self, repo: SandboxRepo, vault: Vault, engine: Callable[[], tuple[VmPort | None, str | None]],
                 admit: Admit, sizes: Callable[[str], tuple[int, int]],
                 proxy: Callable[[], str | None] = lambda: None, limit: int = 20, profile: str | None = None,
                 default_user: str = "user") -> None:
        self._repo = repo
        self._vault = vault
        self._engine = engine  # () -> (engine, or None with the reason)
        self._admit = admit
        self._sizes = sizes  # purpose -> (vcpus, memory MiB)
        self._proxy = proxy  # () -> the guest's proxy URL (the egress gateway's address), if there is one
        self.templates = {**TEMPLATES, **({profile: "cli"} if profile else {})}
        self._limit = limit  # sandboxes running or paused per user (paused ones hold their disk and memory files)
        self.default_user = default_user  # the guest account envd calls run as when they name none
        self._sweeper: asyncio.Task[None] | None = None
        self.watchers = Watchers()  # envd's directory watchers of the sandboxes this server runs
        self.on_end: list[Callable[[str], None]] = []  # told each sandbox id that ends (its processes go)

    def _port(self) -> VmPort:
        engine, reason = self._engine()
        if engine is None:
            raise SandboxUnavailable(f"sandboxes are unavailable on this server: {reason or 'no VM engine'}")
        return engine

    # -- control plane ----------------------------------------------------------------------------------
    async def create(self, user_id: uuid.UUID, spec: CreateSpec) -> Opened:
        purpose = self.templates.get(spec.template)
        if purpose is None:
            raise TemplateNotFound(f"template '{spec.template}' not found; the templates are: "
                                   f"{', '.join(sorted(self.templates))}")
        engine = self._port()
        from polydev.vm.engine import VMCreateError

        if len(await self._repo.live(user_id=user_id)) >= self._limit:
            raise SandboxLimit(f"you have {self._limit} sandboxes running or paused, the most allowed; kill one "
                               "(or an admin can raise SANDBOX_LIMIT_PER_USER)")
        hold = await self._admit(user_id, "vm", purpose)  # QuotaExceeded / HostFull reach the API as 429 / 503
        ttl = timedelta(seconds=spec.timeout_s)
        try:
            vm = await engine.create(user_id, purpose, ttl=_vm_ttl(ttl, spec.auto_pause),  # type: ignore[arg-type]
                                     on_row=hold.at_row)
        except BaseException as exc:
            hold.release()  # (a VM that started stays held a moment past its row: Hold)
            if isinstance(exc, VMCreateError):
                raise SandboxUnavailable(f"the sandbox's VM failed to start: {exc.reason}") from None
            raise
        # The egress gateway's purpose: "sandbox" reaches what EGRESS_SANDBOX_OPEN and EGRESS_ALLOW allow;
        # without internet access, nothing (not even the operator's EGRESS_ALLOW hosts).
        engine.label(vm.id, purpose="sandbox" if spec.internet else OFFLINE_PURPOSE)
        sandbox_id = new_id()
        token = secrets.token_urlsafe(32)
        vcpus, memory = self._sizes(purpose)
        now = utcnow()
        row = Sandbox(id=sandbox_id, user_id=user_id, vm_id=vm.id, template=spec.template, state="running",
                      metadata_json=json.dumps(spec.metadata or {}), token_hash=hash_token(token),
                      sealed=self._seal(user_id, sandbox_id, token, spec.env_vars or {}), cpu_count=vcpus,
                      memory_mb=memory, auto_pause=spec.auto_pause,
                      auto_pause_memory=spec.auto_pause_memory, internet=spec.internet, started_at=now,
                      end_at=now + ttl)
        try:
            await self._repo.add(row)
        except BaseException:
            await engine.destroy(vm.id)
            raise
        log.info("sandbox_created", sandbox_id=sandbox_id, vm_id=str(vm.id), template=spec.template)
        return Opened(_view(row), token)

    async def list(self, user_id: uuid.UUID | None) -> list[SandboxView]:
        """A user's live sandboxes; everyone's with None (admins, through Polydev's own API)."""
        rows = await self._repo.live(user_id=user_id)
        return [_view(row) for row in rows if not await self._ended(row)]

    async def live_counts(self) -> dict[str, int]:
        """Live sandboxes by state, every live state present (for /metrics)."""
        counts = {state: 0 for state in LIVE_STATES}
        for row in await self._repo.live():
            counts[row.state] += 1
        return counts

    async def get(self, user_id: uuid.UUID, sandbox_id: str) -> SandboxView:
        return _view(await self._row(user_id, sandbox_id))

    async def kill(self, user_id: uuid.UUID, sandbox_id: str) -> None:
        row = await self._row(user_id, sandbox_id)
        await self._end(row)

    async def set_timeout(self, user_id: uuid.UUID, sandbox_id: str, timeout_s: int) -> None:
        """The sandbox ends `timeout_s` from now (E2B's semantics: the new timeout counts from the call)."""
        row = await self._row(user_id, sandbox_id)
        if row.vm_id is None:
            raise SandboxConflict("the sandbox has no running VM")
        engine = self._port()
        ttl = timedelta(seconds=timeout_s)
        await engine.assign(row.vm_id, user_id, _vm_ttl(ttl, row.auto_pause))
        await self._repo.update(row.id, end_at=utcnow() + ttl)

    async def connect(self, user_id: uuid.UUID, sandbox_id: str, timeout_s: int | None) -> Opened:
        """A running sandbox again, with its access token; a paused one is resumed first (its VM woken as it
        was: processes, files and memory), living `timeout_s` (default: the create's default) from now."""
        row = await self._row(user_id, sandbox_id)
        if row.state == "paused":
            await self._resume(row, timeout_s or CreateSpec.timeout_s)
            row = await self._row(user_id, sandbox_id)
        elif timeout_s is not None:
            await self.set_timeout(user_id, sandbox_id, timeout_s)
            row = await self._row(user_id, sandbox_id)
        return Opened(_view(row), self._open(row)[0])

    async def pause(self, user_id: uuid.UUID, sandbox_id: str, memory: bool = True, strict: bool = False) -> None:
        """Save the sandbox's VM (memory, devices, disk) and end its process: it holds no host capacity until
        `connect` resumes it, and survives a restart of the server. Without `memory` only its disk is kept
        (E2B's mode "filesystem"): the resume boots it cold, its files there and its processes gone. With
        `strict`, a sandbox whose agent does not answer is not paused (SandboxUnavailable) and runs on.
        SandboxConflict when already paused."""
        row = await self._row(user_id, sandbox_id)  # not found first, as E2B answers
        if row.state == "paused":
            raise SandboxConflict(f"sandbox '{sandbox_id}' is already paused")
        if strict and memory and not await self._agent_answers(row):
            raise SandboxUnavailable(f"sandbox '{sandbox_id}' is not paused: its agent does not answer")
        await self._pause(row, memory)

    async def _agent_answers(self, row: Sandbox) -> bool:
        def probe() -> bool:
            with self.agent(row, timeout=10.0) as agent:
                return agent.livez()
        try:
            return await asyncio.to_thread(probe)
        except Exception:  # noqa: BLE001 - unreachable, or not on this server: either way, no answer
            return False

    async def _pause(self, row: Sandbox, memory: bool = True) -> None:
        if row.vm_id is None:
            raise SandboxConflict("the sandbox has no running VM")
        from polydev.vm.hibernation import CannotHibernate

        try:
            agent_token = await self._port().hibernate(row.vm_id, memory)
        except CannotHibernate as exc:
            if not memory:  # the agent could not sync the disk: the sandbox runs on, unharmed
                raise SandboxUnavailable(f"the sandbox is not paused: {exc}") from None
            raise SandboxNotImplemented(f"this sandbox cannot be paused here: {exc}") from None
        token, envs = self._open(row)
        # The agent's token is the engine's to forget: kept sealed with the sandbox's own until it resumes.
        await self._repo.update(row.id, state="paused",
                                sealed=self._seal(row.user_id, row.id, token, envs, agent=agent_token))
        log.info("sandbox_paused", sandbox_id=row.id, vm_id=str(row.vm_id))

    async def _resume(self, row: Sandbox, timeout_s: int) -> None:
        from polydev.vm.engine import VMCreateError
        from polydev.vm.hibernation import CannotHibernate

        assert row.vm_id is not None
        engine = self._port()
        plain = self._unseal(row)
        try:
            vm = await engine.wake(row.vm_id, plain["agent"], _vm_ttl(timedelta(seconds=timeout_s), row.auto_pause))
        except CannotHibernate:
            raise SandboxNotFound(f"sandbox '{row.id}' not found") from None  # its files are not on this host
        except VMCreateError as exc:
            raise SandboxUnavailable(f"the sandbox could not be resumed: {exc.reason}") from None
        engine.label(vm.id, purpose="sandbox" if row.internet else OFFLINE_PURPOSE)
        await self._repo.update(row.id, state="running", end_at=utcnow() + timedelta(seconds=timeout_s),
                                sealed=self._seal(row.user_id, row.id, plain["token"], plain["envs"]))
        log.info("sandbox_resumed", sandbox_id=row.id, vm_id=str(vm.id))

    async def metrics(self, user_id: uuid.UUID, sandbox_id: str) -> list[dict[str, Any]]:
        """Its resource use now, sampled in its VM (core/sandbox_metrics.py); none while it is paused."""
        from polydev.core.sandbox_metrics import sample

        row = await self._row(user_id, sandbox_id)
        if row.state != "running" or row.vm_id is None:
            return []
        with self.agent(row) as agent:
            return [await asyncio.to_thread(sample, agent)]

    # -- envd ---------------------------------------------------------------------------------------------
    async def running(self, sandbox_id: str) -> Sandbox:
        """A running sandbox by id alone, for its ports (`get_host`: public, as on E2B); SandboxNotFound else."""
        row = await self._repo.get(sandbox_id) if len(sandbox_id) <= 32 else None
        if row is None or await self._ended(row) or row.state != "running" or row.vm_id is None:
            raise SandboxNotFound(f"The sandbox {sandbox_id} was not found")
        return row

    async def authorize(self, sandbox_id: str, token: str | None) -> tuple[Sandbox, dict[str, str]]:
        """The running sandbox that `token` opens, with its env vars; SandboxNotFound for a missing, ended or
        paused sandbox and for a wrong token alike, so an id alone tells a caller nothing."""
        row = await self.running(sandbox_id)
        if token is None or not hmac.compare_digest(row.token_hash, hash_token(token)):
            raise SandboxNotFound(f"The sandbox {sandbox_id} was not found")
        return row, {**self._proxy_env(row), **self._open(row)[1]}

    def _proxy_env(self, row: Sandbox) -> dict[str, str]:
        """A sandbox's way out is the egress gateway: its processes get the proxy settings tools read."""
        proxy = self._proxy() if row.internet else None
        if proxy is None:
            return {}
        local = "localhost,127.0.0.1,::1"
        return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
                "NO_PROXY": local, "no_proxy": local}

    def agent(self, row: Sandbox, timeout: float = 60.0) -> AgentClient:
        """A client of the sandbox VM's agent; SandboxNotFound when this server does not run that VM."""
        assert row.vm_id is not None
        try:
            return self._port().agent(row.vm_id, timeout=timeout)
        except (KeyError, SandboxUnavailable):
            raise SandboxNotFound(f"The sandbox {row.id} was not found") from None

    # -- rows ----------------------------------------------------------------------------------------------
    async def _row(self, user_id: uuid.UUID, sandbox_id: str) -> Sandbox:
        row = await self._repo.get(sandbox_id) if len(sandbox_id) <= 32 else None
        if row is None or row.user_id != user_id or await self._ended(row):
            raise SandboxNotFound(f"sandbox '{sandbox_id}' not found")
        return row

    async def sweep(self) -> int:
        """The sandboxes past their end: those created with autoPause are paused (their VMs outlive their end
        by AUTO_PAUSE_GRACE for this), the others killed. Returns how many it paused."""
        from polydev.vm.hibernation import CannotHibernate

        paused = 0
        for row in await self._repo.expired():
            if row.state != "running":
                continue
            if not row.auto_pause or row.end_at + AUTO_PAUSE_GRACE <= utcnow():  # (past the grace: its VM is gone)
                await self._ended(row)
                continue
            try:
                await self._pause(row, row.auto_pause_memory)
                paused += 1
            except (SandboxError, CannotHibernate) as exc:  # another server's VM (that server pauses it)
                log.debug("sandbox_auto_pause_skipped", sandbox_id=row.id, reason=str(exc))
        return paused

    def start_sweeper(self, interval: float = SWEEP_S) -> None:
        if self._sweeper is None:
            self._sweeper = every(interval, self.sweep, "sandbox-sweep")

    async def close(self) -> None:
        """Stop the sweep and the directory watchers (the server is stopping)."""
        sweeper, self._sweeper = self._sweeper, None
        await cancel_and_wait([sweeper])
        await self.watchers.close()

    async def _ended(self, row: Sandbox) -> bool:
        """Killed, past its end, or its VM gone (a server restart, a crash): then marked killed now. One made
        with autoPause is not ended at its end: the sweep pauses it (its VM lives AUTO_PAUSE_GRACE longer)."""
        if row.state == "killed":
            return True
        past = row.end_at <= utcnow() and not (row.auto_pause and row.end_at + AUTO_PAUSE_GRACE > utcnow())
        if row.state == "running" and (past or not await self._vm_alive(row)):
            await self._end(row)
            return True
        return False

    async def _vm_alive(self, row: Sandbox) -> bool:
        engine, _ = self._engine()
        if engine is None or row.vm_id is None:
            return engine is None  # no engine here: the VM's state is not this server's to judge
        vm = await engine.get(row.vm_id)
        return vm is not None and vm.status in ("creating", "running")

    async def _end(self, row: Sandbox) -> None:
        for listener in self.on_end:
            listener(row.id)
        if await self._repo.end(row.id) and row.vm_id is not None:
            engine, _ = self._engine()
            if engine is not None:
                await engine.destroy(row.vm_id)
            log.info("sandbox_ended", sandbox_id=row.id, vm_id=str(row.vm_id))

    def _seal(self, user_id: uuid.UUID, sandbox_id: str, token: str, envs: dict[str, str],
              agent: str | None = None) -> str:
        """The sandbox's secrets, sealed: its access token, its env vars and, while paused, its agent's token."""
        plain = {"token": token, "envs": envs, **({"agent": agent} if agent else {})}
        record = self._vault.seal(user_id, f"sandbox:{sandbox_id}", json.dumps(plain).encode())
        return json.dumps(record.__dict__)

    def _unseal(self, row: Sandbox) -> dict[str, Any]:
        return json.loads(self._vault.open(row.user_id, f"sandbox:{row.id}", SealedRecord(**json.loads(row.sealed))))

    def _open(self, row: Sandbox) -> tuple[str, dict[str, str]]:
        plain = self._unseal(row)
        return plain["token"], plain["envs"]


def _vm_ttl(ttl: timedelta, auto_pause: bool) -> timedelta:
    """A sandbox VM's lifetime: the sandbox's, and AUTO_PAUSE_GRACE more when it is to be paused at its end
    (past that its supervisor kills it, paused or not: nothing outlives its expiry)."""
    return ttl + AUTO_PAUSE_GRACE if auto_pause else ttl


def _view(row: Sandbox) -> SandboxView:
    return SandboxView(id=row.id, user_id=row.user_id, vm_id=row.vm_id, template=row.template, state=row.state,
                       metadata=json.loads(row.metadata_json), cpu_count=row.cpu_count, memory_mb=row.memory_mb,
                       started_at=row.started_at, end_at=row.end_at)
