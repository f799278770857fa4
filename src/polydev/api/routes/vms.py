"""VMs, for admins: list, create, inspect, destroy, and run a command in one (core/vm_admin.py).

When this server runs no VM engine, every route answers 503 `vm_unavailable` with the reason (no image, no
QEMU, tap mode without root, ...). Responses carry neither agent tokens nor the agent's URL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from polydev.api.deps import AdminUser, ServicesDep
from polydev.api.errors import ApiError, from_domain
from polydev.core.vm_admin import (
    DEFAULT_EXEC_TIMEOUT_S,
    MAX_OUTPUT_BYTES,
    ExecCommand,
    ExecRejected,
    VmAdminError,
    VmAgentFailed,
    VmAgentUnreachable,
    VmCreateFailed,
    VmNoCapacity,
    VmNotFound,
    VmNotRunning,
    VmUnavailable,
)

router = APIRouter(prefix="/api/vms", tags=["vms"])

MAX_EXEC_TIMEOUT_S = 3600.0
MAX_TTL_SECONDS = 7 * 24 * 3600

_UNAVAILABLE = {"description": "this server cannot run VMs (`vm_unavailable`, with the reason)"}
_NOT_FOUND = {"description": "no such VM (`not_found`)"}

# The service's errors as answers: (status, code); the message is the error's own.
_ERRORS: dict[type[Exception], tuple[int, str]] = {
    VmUnavailable: (503, "vm_unavailable"),
    VmNoCapacity: (503, "vm_capacity"),
    # 502: the hypervisor, not the request, is what failed.
    VmCreateFailed: (502, "vm_create_failed"),
    VmNotFound: (404, "not_found"),
    VmNotRunning: (409, "vm_not_running"),
    ExecRejected: (422, "exec_rejected"),
    VmAgentUnreachable: (502, "agent_unreachable"),
    VmAgentFailed: (502, "agent_error"),
}


def api_error(exc: VmAdminError) -> ApiError:
    extra: dict[str, Any] = {"vm_id": str(exc.vm_id)} if exc.vm_id is not None else {}
    return from_domain(_ERRORS, exc, **extra)


@contextmanager
def _answering_errors() -> Iterator[None]:
    try:
        yield
    except VmAdminError as exc:
        raise api_error(exc) from None


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
    def of(cls, vm: object) -> VmOut:
        return cls.model_validate(vm, from_attributes=True)


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


@router.get("", response_model=list[VmOut], responses={503: _UNAVAILABLE})
async def list_vms(_: AdminUser, services: ServicesDep,
                   include_ended: bool = Query(False, alias="all",
                                               description="include destroyed and failed VMs")) -> list[VmOut]:
    with _answering_errors():
        return [VmOut.of(vm) for vm in await services.vm_admin.vms(include_ended=include_ended)]


@router.post("", response_model=VmOut, status_code=201, responses={
    502: {"description": "the VM failed to start (`vm_create_failed`, with the reason and the VM's id)"},
    503: {"description": "VMs are unavailable here (`vm_unavailable`) or every network slot is in use "
                         "(`vm_capacity`, try again later)"}})
async def create_vm(body: VmIn, admin: AdminUser, services: ServicesDep, request: Request) -> VmOut:
    created = request.app.state.metrics.vm_creations
    try:
        vm = await services.vm_admin.create(admin.id, body.purpose, body.ttl_seconds)
    except VmAdminError as exc:
        created.labels("unavailable" if isinstance(exc, VmUnavailable) else "failed").inc()
        raise api_error(exc) from None
    created.labels("created").inc()
    return VmOut.of(vm)


@router.get("/{vm_id}", response_model=VmOut, responses={404: _NOT_FOUND, 503: _UNAVAILABLE})
async def get_vm(vm_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> VmOut:
    with _answering_errors():
        return VmOut.of(await services.vm_admin.get(vm_id))


@router.delete("/{vm_id}", status_code=204, responses={
    404: {"description": "no live VM by that id (never existed, or already destroyed)"}, 503: _UNAVAILABLE})
async def delete_vm(vm_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> Response:
    with _answering_errors():
        await services.vm_admin.destroy(vm_id)
    return Response(status_code=204)


@router.post("/{vm_id}/exec", response_model=ExecOut, responses={
    404: _NOT_FOUND,
    409: {"description": "the VM is not running here (`vm_not_running`)"},
    422: {"description": "invalid request, or the agent refused it (`exec_rejected`)"},
    502: {"description": "the VM's agent could not be reached or failed (`agent_unreachable`, `agent_error`)"},
    503: _UNAVAILABLE})
async def exec_in_vm(vm_id: uuid.UUID, body: ExecIn, _: AdminUser, services: ServicesDep) -> ExecOut:
    command = ExecCommand(args=list(body.args), env=dict(body.env), cwd=body.cwd, timeout_s=body.timeout_s,
                          stdin=body.stdin.encode() if body.stdin is not None else None)
    with _answering_errors():
        return ExecOut.model_validate(await services.vm_admin.exec(vm_id, command), from_attributes=True)
