"""The E2B-compatible sandboxes in Polydev's own API: `GET /api/sandboxes`, the caller's own, or everyone's for
an admin with `?all=true` (the SDK's view is at E2B's paths, api/e2b/control.py). Access tokens never appear."""

from __future__ import annotations

from fastapi import APIRouter, Query

from polydev.api.deps import CurrentUser, ServicesDep
from polydev.api.errors import ApiError
from polydev.core.sandboxes import SandboxView

router = APIRouter(prefix="/api/sandboxes", tags=["sandboxes"])


@router.get("", response_model=list[SandboxView], responses={403: {"description": "`all` without an admin token"}})
async def list_sandboxes(user: CurrentUser, services: ServicesDep,
                         all_users: bool = Query(False, alias="all", description="everyone's (admins)")
                         ) -> list[SandboxView]:
    if all_users and user.role != "admin":
        raise ApiError(403, "forbidden", "only admins may list everyone's sandboxes")
    return await services.sandboxes.list(None if all_users else user.id)
