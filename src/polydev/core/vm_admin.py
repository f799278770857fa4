"""VMs for admins: list, create, inspect and destroy them, and run a command in one.

Everything goes through the VM engine (`VmPort`). When this process has none, every call raises
`VmUnavailable` with the reason (no image, no QEMU, tap mode without root, ...). Failures come out as the
`VmAdminError`s below, each with the message to show; the API maps them to status codes. Agent tokens never
leave the engine: a `VM` carries the agent's URL, never its token.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from polydev.core.vm_flow import Admit, admit_all
from polydev.protocol import ProtocolError
from polydev.store.vms import LIVE
from polydev.vm.agent_client import AgentError, AgentUnreachable

if TYPE_CHECKING:  # the engine module pulls in the network code: loaded only where VMs run
    from polydev.core.ports import VmPort
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.engine import VM, Purpose

log = structlog.get_logger(__name__)

# Output beyond this is dropped (and flagged), so one chatty command cannot balloon an answer; the command
# itself keeps running to completion either way.
MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_EXEC_TIMEOUT_S = 60.0


class VmAdminError(Exception):
    """What the service could not do; the text is the message for whoever asked."""

    vm_id: uuid.UUID | None = None  # the VM it concerns, when one was made


class VmUnavailable(VmAdminError):
    """This process runs no VM engine."""


class VmNoCapacity(VmAdminError):
    """Every network slot is in use: try again later."""

    def __init__(self, message: str, vm_id: uuid.UUID) -> None:
        super().__init__(message)
        self.vm_id = vm_id


class VmCreateFailed(VmAdminError):
    """The hypervisor failed to start the VM; its row stays, marked failed with the reason."""

    def __init__(self, message: str, vm_id: uuid.UUID) -> None:
        super().__init__(message)
        self.vm_id = vm_id


class VmNotFound(VmAdminError):
    pass


class VmNotRunning(VmAdminError):
    """Not running, or not run by this process's engine."""


class ExecRejected(VmAdminError):
    """The agent refused the command (a bad request, or a program that cannot start): the caller's to fix."""


class VmAgentUnreachable(VmAdminError):
    pass


class VmAgentFailed(VmAdminError):
    """The agent answered an error, or something that is not the protocol."""


@dataclass
class ExecCommand:
    args: list[str]  # program and arguments (no shell)
    env: dict[str, str] = field(default_factory=dict)  # merged over the guest's environment
    cwd: str | None = None
    timeout_s: float = DEFAULT_EXEC_TIMEOUT_S  # the command is killed after this
    stdin: bytes | None = None  # written to the command's standard input, then closed


@dataclass
class ExecOutcome:
    exit_code: int  # or -N when killed by signal N
    stdout: str  # UTF-8 (undecodable bytes replaced), at most MAX_OUTPUT_BYTES
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_s: float


class VmAdmin:
    def __init__(self, engine: Callable[[], tuple[VmPort | None, str | None]], default_ttl: timedelta,
                 admit: Admit = admit_all) -> None:
        self._engine = engine  # () -> (engine, or None with the reason)
        self.default_ttl = default_ttl
        self.admit = admit  # quotas and the host's capacity, checked before a VM is made

    def _port(self) -> VmPort:
        engine, reason = self._engine()
        if engine is None:
            raise VmUnavailable(f"VMs are unavailable on this server: {reason or 'this server runs no VM engine'}")
        return engine

    async def vms(self, *, include_ended: bool = False) -> list[VM]:
        return await self._port().list(live_only=not include_ended)

    async def live_counts(self) -> dict[str, int]:
        """Live VMs by status, every live status present (0 when none)."""
        counts = Counter(vm.status for vm in await self._port().list(live_only=True))
        return {status: counts[status] for status in LIVE}

    async def create(self, user_id: uuid.UUID, purpose: Purpose, ttl_seconds: int | None = None) -> VM:
        """A running VM whose agent answers, living `ttl_seconds` (default: the configured VM TTL)."""
        engine = self._port()
        from polydev.vm.engine import VMCapacityError, VMCreateError

        ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else self.default_ttl
        hold = await self.admit(user_id, "vm", purpose)
        try:
            return await engine.create(user_id, purpose, ttl=ttl, on_row=hold.at_row)
        except BaseException as exc:
            hold.release()  # (a VM that started stays held a moment past its row: Hold)
            if isinstance(exc, VMCapacityError):
                raise VmNoCapacity(f"no capacity for another VM right now: {exc.reason}", exc.vm_id) from None
            if isinstance(exc, VMCreateError):
                raise VmCreateFailed(str(exc), exc.vm_id) from None
            raise

    async def get(self, vm_id: uuid.UUID) -> VM:
        return await self._get(self._port(), vm_id)

    @staticmethod
    async def _get(engine: VmPort, vm_id: uuid.UUID) -> VM:
        vm = await engine.get(vm_id)
        if vm is None:
            raise VmNotFound("no such VM")
        return vm

    async def destroy(self, vm_id: uuid.UUID) -> None:
        if not await self._port().destroy(vm_id):
            raise VmNotFound("no live VM by that id")

    async def exec(self, vm_id: uuid.UUID, command: ExecCommand) -> ExecOutcome:
        """Run `command` in the VM to its end and answer its exit and (capped) output."""
        engine = self._port()
        vm = await self._get(engine, vm_id)
        if vm.status != "running":
            raise VmNotRunning(f"the VM is {vm.status}")
        try:
            agent = engine.agent(vm_id)
        except KeyError:  # a row says running, but this process holds no token for it (it outlived its engine)
            raise VmNotRunning("this VM is not run by this server's engine") from None
        # The agent client is synchronous (httpx); a thread keeps the event loop serving meanwhile.
        return await asyncio.to_thread(_exec, agent, vm_id, command)


def _exec(agent: AgentClient, vm_id: uuid.UUID, command: ExecCommand) -> ExecOutcome:
    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    last = None
    try:
        with agent:
            events = agent.exec_stream(command.args, env=command.env, cwd=command.cwd, timeout_s=command.timeout_s,
                                       stdin=command.stdin)
            for event in events:
                if event.type in out:
                    # Keep reading past the cap: leaving the stream early would kill the command.
                    buf, data = out[event.type], event.bytes()
                    room = MAX_OUTPUT_BYTES - len(buf)
                    if len(data) > room:
                        truncated[event.type] = True
                        data = data[:max(room, 0)]
                    buf += data
                elif event.type == "exit":
                    last = event
    except AgentUnreachable as exc:  # an AgentError too: caught first
        if exc.transport:
            raise VmAgentUnreachable(f"cannot reach the VM's agent: {type(exc.cause).__name__}") from None
        raise VmAgentFailed(f"bad answer from the VM's agent: {exc.cause}") from None
    except AgentError as exc:
        if exc.status in (400, 422):  # a bad request or a program that cannot start
            raise ExecRejected(f"the VM's agent refused the command: {exc.reason}") from None
        raise VmAgentFailed(f"the VM's agent answered {exc.status}: {exc.reason}") from None
    except ProtocolError as exc:
        raise VmAgentFailed(f"bad answer from the VM's agent: {exc}") from None
    if last is None:
        raise VmAgentFailed("the agent's stream ended without the command's exit")
    log.info("vm_exec", vm_id=str(vm_id), program=command.args[0], exit_code=last.code, timed_out=last.timed_out)
    return ExecOutcome(exit_code=last.code if last.code is not None else -1,
                       stdout=bytes(out["stdout"]).decode("utf-8", "replace"),
                       stderr=bytes(out["stderr"]).decode("utf-8", "replace"),
                       stdout_truncated=truncated["stdout"], stderr_truncated=truncated["stderr"],
                       timed_out=last.timed_out, duration_s=last.duration_s or 0.0)
