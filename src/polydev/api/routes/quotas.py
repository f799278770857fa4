"""Quotas: each user's limits and use (their own; admins anyone's and set overrides), and the host's capacity.

A login, run or VM past a limit is refused by the flows themselves (core/quotas.py) with 429 `quota_exceeded`
or 503 `host_capacity` (api/errors.py), naming the limit, the use and `Retry-After`.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from polydev.api.deps import AdminUser, CurrentUser, ServicesDep
from polydev.api.errors import ApiError
from polydev.core.quotas import LIMITS, check_overrides

router = APIRouter(prefix="/api", tags=["quotas"])


class QuotasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limits: dict[str, StrictInt] = Field(description=f"overrides of the defaults, keys {', '.join(LIMITS)}; "
                                                     "{} drops them")


class QuotasOut(BaseModel):
    user_id: uuid.UUID
    user_name: str | None = None
    limits: dict[str, int] = Field(description="what applies: the defaults with this user's overrides")
    overrides: dict[str, int] = Field(description="this user's own limits")
    usage: dict[str, int] = Field(description="what the user holds now, against each limit")


class ServerOut(BaseModel):
    server_id: uuid.UUID
    this: bool = Field(description="the server that answered")
    vcpus: dict[str, int] = Field(description="used and capacity")
    memory_mb: dict[str, int] = Field(description="used and capacity")


class HostOut(BaseModel):
    capacity: dict[str, dict[str, int]] = Field(description="this server's host, per resource (vcpus, memory_mb, "
                                                            "disk_mb): used and capacity")
    servers: list[ServerOut] = Field(default_factory=list, description="every live server that runs VMs, with "
                                     "what its VMs hold of its host (several servers on one database)")


_NOT_FOUND = {404: {"description": "no such user (`not_found`)"}}


async def _report(services: ServicesDep, user_id: uuid.UUID, user_name: str | None = None) -> QuotasOut:
    report = await services.admission.report(user_id)
    if report is None:
        raise ApiError(404, "not_found", "no such user")
    return QuotasOut(user_id=user_id, user_name=user_name, **report)  # type: ignore[arg-type]


@router.get("/me/quotas", response_model=QuotasOut)
async def my_quotas(user: CurrentUser, services: ServicesDep) -> QuotasOut:
    """Your limits and what you hold against each."""
    return await _report(services, user.id)


@router.get("/quotas", response_model=list[QuotasOut])
async def all_quotas(_: AdminUser, services: ServicesDep) -> list[QuotasOut]:
    """Every user's limits and use (admins)."""
    return [await _report(services, u.id, u.name) for u in await services.users.list()]


@router.get("/users/{user_id}/quotas", response_model=QuotasOut, responses=_NOT_FOUND)
async def get_quotas(user_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> QuotasOut:
    return await _report(services, user_id)


@router.put("/users/{user_id}/quotas", response_model=QuotasOut,
            responses={**_NOT_FOUND, 422: {"description": "`bad_quotas`: an unknown name or a negative number"}})
async def set_quotas(user_id: uuid.UUID, body: QuotasIn, _: AdminUser, services: ServicesDep) -> QuotasOut:
    """Set a user's own limits (admins); a change applies to their next login, run or VM."""
    try:
        limits = check_overrides(dict(body.limits))
    except ValueError as exc:
        raise ApiError(422, "bad_quotas", str(exc)) from None
    if not await services.admission.set_overrides(user_id, limits):
        raise ApiError(404, "not_found", "no such user")
    return await _report(services, user_id)


@router.get("/quotas/host", response_model=HostOut)
async def host_capacity(_: AdminUser, services: ServicesDep) -> HostOut:
    """This server's host's capacity and what its live VMs hold of it, and the same for every live server
    that runs VMs (admins): any server answers for the whole deployment."""
    loads = await services.cluster.loads()
    return HostOut(capacity=await services.admission.host_report(),
                   servers=[ServerOut(server_id=load.server_id, this=load.server_id == services.server_id,
                                      vcpus={"used": load.used_vcpus, "capacity": load.vcpus},
                                      memory_mb={"used": load.used_memory_mb, "capacity": load.memory_mb})
                            for load in loads])
