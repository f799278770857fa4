"""The E2B-compatible sandboxes in Polydev's own API: `GET /api/sandboxes`, the caller's own, or everyone's for
an admin with `?all=true`, and `DELETE /api/sandboxes/{id}` to kill one of your own (the SDK's view is at
E2B's paths, api/e2b/control.py). Access tokens never appear."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from polydev.api.deps import CurrentUser, ServicesDep
from polydev.api.errors import ApiError
from polydev.core.sandboxes import SandboxNotFound, SandboxView

router = APIRouter(prefix="/api/sandboxes", tags=["sandboxes"])


@router.get("", response_model=list[SandboxView], responses={403: {"description": "`all` without an admin token"}})
async def list_sandboxes(user: CurrentUser, services: ServicesDep,
                         all_users: bool = Query(False, alias="all", description="everyone's (admins)")
                         ) -> list[SandboxView]:
    if all_users and user.role != "admin":
        raise ApiError(403, "forbidden", "only admins may list everyone's sandboxes")
    return await services.sandboxes.list(None if all_users else user.id)


@router.delete("/{sandbox_id}", status_code=204, responses={404: {"description": "no such sandbox of yours"}})
async def kill_sandbox(sandbox_id: str, user: CurrentUser, services: ServicesDep) -> Response:
    """Kill one of your sandboxes (running or paused): its VM and its saved state go."""
    try:
        await services.sandboxes.kill(user.id, sandbox_id)
    except SandboxNotFound:
        raise ApiError(404, "not_found", "no such sandbox") from None
    return Response(status_code=204)
