"""VMs, for admins: list, create, inspect, destroy, and run a command in one.

Everything goes through the VM engine (services.engine). When this server has none, every route answers
503 `vm_unavailable` with the reason (no image, no QEMU, tap mode without root, ...). Agent tokens never
leave the engine: responses carry neither them nor the agent's URL.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Literal

import httpx
import structlog
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from polydev.api.deps import AdminUser, ServicesDep
from polydev.api.errors import ApiError
from polydev.services import Services

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.engine import VM, VMEngine

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/vms", tags=["vms"])

# Output beyond this is dropped (and flagged), so one chatty command cannot balloon a JSON response; the
# command itself keeps running to completion either way.
MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_EXEC_TIMEOUT_S = 60.0
MAX_EXEC_TIMEOUT_S = 3600.0
MAX_TTL_SECONDS = 7 * 24 * 3600

_UNAVAILABLE = {"description": "this server cannot run VMs (`vm_unavailable`, with the reason)"}
_NOT_FOUND = {"description": "no such VM (`not_found`)"}


class VmOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID | None
    purpose: str
    status: str = Field(description="creating, running, destroyed or failed")
    backend: str
    created_at: datetime
    expires_at: datetime | None
    slot_index: int | None = Field(description="the network slot (tap mode); null in user mode")
    error: str | None = Field(description="why it failed, with the kept console log's path")

    @classmethod
    def of(cls, vm: VM) -> VmOut:
        return cls(id=vm.id, user_id=vm.user_id, purpose=vm.purpose, status=vm.status, backend=vm.backend,
                   created_at=vm.created_at, expires_at=vm.expires_at, slot_index=vm.slot_index, error=vm.error)


class VmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    purpose: Literal["cli", "browser"] = Field("cli", description="cli, or browser (the login VM's size)")
    ttl_seconds: int | None = Field(None, ge=10, le=MAX_TTL_SECONDS,
                                    description="lifetime before the reaper destroys it; default VM_TTL_SECONDS")


# The agent refuses NUL anywhere and '=' in a name; refusing them here makes that a 422, not an agent error.
_Arg = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=65536)]
_EnvName = Annotated[str, StringConstraints(pattern=r"^[^=\x00]+$", max_length=256)]
_EnvValue = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=65536)]


class ExecIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    args: list[_Arg] = Field(min_length=1, max_length=4096, description="program and arguments (no shell)")
    env: dict[_EnvName, _EnvValue] = Field(default_factory=dict, description="merged over the guest's environment")
    cwd: str | None = Field(None, pattern=r"^/[^\x00]*$", max_length=4096, description="absolute path in the guest")
    timeout_s: float = Field(DEFAULT_EXEC_TIMEOUT_S, gt=0, le=MAX_EXEC_TIMEOUT_S,
                             description="the command is killed after this many seconds")
    stdin: str | None = Field(None, description="text written to the command's standard input, then closed")


class ExecOut(BaseModel):
    exit_code: int = Field(description="the exit status, or -N when killed by signal N")
    stdout: str = Field(description=f"UTF-8 text (undecodable bytes replaced), at most {MAX_OUTPUT_BYTES} bytes")
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_s: float


def engine_of(services: Services) -> VMEngine:
    if services.engine is None:
        reason = services.engine_unavailable or "this server runs no VM engine"
        raise ApiError(503, "vm_unavailable", f"VMs are unavailable on this server: {reason}")
    return services.engine


@router.get("", response_model=list[VmOut], responses={503: _UNAVAILABLE})
async def list_vms(_: AdminUser, services: ServicesDep,
                   include_ended: bool = Query(False, alias="all",
                                               description="include destroyed and failed VMs")) -> list[VmOut]:
    return [VmOut.of(vm) for vm in await engine_of(services).list(live_only=not include_ended)]


@router.post("", response_model=VmOut, status_code=201, responses={
    502: {"description": "the VM failed to start (`vm_create_failed`, with the reason and the VM's id)"},
    503: {"description": "VMs are unavailable here (`vm_unavailable`) or every network slot is in use "
                         "(`vm_capacity`, try again later)"}})
async def create_vm(body: VmIn, admin: AdminUser, services: ServicesDep, request: Request) -> VmOut:
    from polydev.vm.engine import VMCapacityError, VMCreateError

    created = request.app.state.metrics.vm_creations
    try:
        engine = engine_of(services)
    except ApiError:
        created.labels("unavailable").inc()
        raise
    ttl = timedelta(seconds=body.ttl_seconds or services.settings.vm_ttl_seconds)
    try:
        vm = await engine.create(admin.id, body.purpose, ttl=ttl)
    except VMCapacityError as exc:
        created.labels("failed").inc()
        raise ApiError(503, "vm_capacity", f"no capacity for another VM right now: {exc.reason}",
                       vm_id=str(exc.vm_id)) from None
    except VMCreateError as exc:
        created.labels("failed").inc()
        # 502: the hypervisor, not the request, is what failed; the row stays, marked failed with the reason.
        raise ApiError(502, "vm_create_failed", str(exc), vm_id=str(exc.vm_id)) from None
    created.labels("created").inc()
    return VmOut.of(vm)


async def _get(engine: VMEngine, vm_id: uuid.UUID) -> VM:
    vm = await engine.get(vm_id)
    if vm is None:
        raise ApiError(404, "not_found", "no such VM")
    return vm


@router.get("/{vm_id}", response_model=VmOut, responses={404: _NOT_FOUND, 503: _UNAVAILABLE})
async def get_vm(vm_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> VmOut:
    return VmOut.of(await _get(engine_of(services), vm_id))


@router.delete("/{vm_id}", status_code=204, responses={
    404: {"description": "no live VM by that id (never existed, or already destroyed)"}, 503: _UNAVAILABLE})
async def delete_vm(vm_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> Response:
    if not await engine_of(services).destroy(vm_id):
        raise ApiError(404, "not_found", "no live VM by that id")
    return Response(status_code=204)


@router.post("/{vm_id}/exec", response_model=ExecOut, responses={
    404: _NOT_FOUND,
    409: {"description": "the VM is not running here (`vm_not_running`)"},
    422: {"description": "invalid request, or the agent refused it (`exec_rejected`)"},
    502: {"description": "the VM's agent could not be reached or failed (`agent_unreachable`, `agent_error`)"},
    503: _UNAVAILABLE})
async def exec_in_vm(vm_id: uuid.UUID, body: ExecIn, _: AdminUser, services: ServicesDep) -> ExecOut:
    engine = engine_of(services)
    vm = await _get(engine, vm_id)
    if vm.status != "running":
        raise ApiError(409, "vm_not_running", f"the VM is {vm.status}")
    try:
        agent = engine.agent(vm_id)
    except KeyError:  # a row says running, but this process holds no token for it (it outlived its engine)
        raise ApiError(409, "vm_not_running", "this VM is not run by this server's engine") from None
    # The agent client is synchronous (httpx); a thread keeps the event loop serving meanwhile.
    return await asyncio.to_thread(_exec, agent, vm_id, body)


def _exec(agent: AgentClient, vm_id: uuid.UUID, body: ExecIn) -> ExecOut:
    from polydev.protocol import ProtocolError
    from polydev.vm.agent_client import AgentError, AgentUnreachable

    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    last = None
    try:
        with agent:
            events = agent.exec_stream(list(body.args), env=dict(body.env), cwd=body.cwd, timeout_s=body.timeout_s,
                                       stdin=body.stdin.encode() if body.stdin is not None else None)
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
    except AgentUnreachable as exc:  # (an AgentError: first)
        if isinstance(exc.cause, httpx.TransportError):
            raise ApiError(502, "agent_unreachable",
                           f"cannot reach the VM's agent: {type(exc.cause).__name__}") from None
        raise ApiError(502, "agent_error", f"bad answer from the VM's agent: {exc.cause}") from None
    except AgentError as exc:
        if exc.status in (400, 422):  # a bad request or a program that cannot start: the caller's to fix
            raise ApiError(422, "exec_rejected", f"the VM's agent refused the command: {exc.reason}") from None
        raise ApiError(502, "agent_error", f"the VM's agent answered {exc.status}: {exc.reason}") from None
    except ProtocolError as exc:
        raise ApiError(502, "agent_error", f"bad answer from the VM's agent: {exc}") from None
    if last is None:
        raise ApiError(502, "agent_error", "the agent's stream ended without the command's exit")
    log.info("vm_exec", vm_id=str(vm_id), program=body.args[0], exit_code=last.code, timed_out=last.timed_out)
    return ExecOut(exit_code=last.code if last.code is not None else -1,
                   stdout=bytes(out["stdout"]).decode("utf-8", "replace"),
                   stderr=bytes(out["stderr"]).decode("utf-8", "replace"),
                   stdout_truncated=truncated["stdout"], stderr_truncated=truncated["stderr"],
                   timed_out=last.timed_out, duration_s=last.duration_s or 0.0)
