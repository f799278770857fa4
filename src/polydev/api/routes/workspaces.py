"""Workspaces: projects the CLIs work on across turns, each kept on a VM of its own (core/workspaces.py).

`POST /api/workspaces` makes an empty one (JSON); `POST /api/workspaces/upload?name=N` makes one from the
archive in the body (`application/x-tar`, `application/gzip` or `application/zip`). Both answer 202 with the
workspace `creating`; it becomes `ready`, or `failed` with the reason. Another user's workspace answers 404
like a missing one.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from polydev.api.deps import CurrentUser, ServicesDep
from polydev.api.errors import ApiError, from_domain
from polydev.core.workspaces import (
    Source,
    WorkspaceBusy,
    WorkspaceError,
    WorkspaceLimit,
    WorkspaceNotFound,
    WorkspaceUnavailable,
    WorkspaceView,
)

router = APIRouter(prefix="/api/workspaces", tags=["workspaces"])

ERRORS: dict[type[Exception], tuple[int, str]] = {
    WorkspaceNotFound: (404, "not_found"), WorkspaceLimit: (429, "workspace_limit"),
    WorkspaceBusy: (409, "workspace_not_ready"), WorkspaceUnavailable: (503, "unavailable"),
    WorkspaceError: (500, "workspace_error"),
}
ARCHIVE_TYPES = {"application/x-tar": "tar", "application/gzip": "tar", "application/x-gzip": "tar",
                 "application/x-compressed-tar": "tar", "application/zip": "zip"}
NAME = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")


class NewWorkspace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = NAME
    source: Literal["empty"] = Field("empty", description="empty (uploads: POST /api/workspaces/upload)")


def _domain(exc: WorkspaceError) -> ApiError:
    return from_domain(ERRORS, exc) if type(exc) in ERRORS else ApiError(500, "workspace_error", str(exc))


@router.post("", response_model=WorkspaceView, status_code=202, responses={429: {}, 503: {}})
async def create_workspace(body: NewWorkspace, user: CurrentUser, services: ServicesDep) -> WorkspaceView:
    try:
        return await services.workspaces.create(user.id, body.name, Source("empty"))
    except WorkspaceError as exc:
        raise _domain(exc) from None


@router.post("/upload", response_model=WorkspaceView, status_code=202,
             responses={413: {}, 415: {}, 422: {}, 429: {}, 503: {}})
async def upload_workspace(request: Request, user: CurrentUser, services: ServicesDep,
                           name: str = Query(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
                           ) -> WorkspaceView:
    """A workspace made from the archive in the body: tar (plain, gzip, bzip2 or xz) or zip."""
    kind = ARCHIVE_TYPES.get(request.headers.get("content-type", "").split(";")[0].strip().lower())
    if kind is None:
        raise ApiError(415, "unsupported_media_type", "send the archive as application/x-tar, application/gzip "
                       "or application/zip")
    limit = services.workspaces.limits.upload_bytes
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "archive_too_large", f"the archive is over the {limit}-byte limit")
    if not data:
        raise ApiError(422, "empty_archive", "the body holds no archive")
    try:
        return await services.workspaces.create(user.id, name, Source("archive", bytes(data), kind))
    except WorkspaceError as exc:
        raise _domain(exc) from None


@router.get("", response_model=list[WorkspaceView])
async def list_workspaces(user: CurrentUser, services: ServicesDep,
                          all_users: bool = Query(False, alias="all", description="everyone's (admins)")
                          ) -> list[WorkspaceView]:
    if all_users and user.role != "admin":
        raise ApiError(403, "forbidden", "only admins may list everyone's workspaces")
    return await services.workspaces.list(None if all_users else user.id)


@router.get("/{workspace_id}", response_model=WorkspaceView, responses={404: {}})
async def get_workspace(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> WorkspaceView:
    try:
        return await services.workspaces.get(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None


@router.delete("/{workspace_id}", status_code=204, responses={404: {}})
async def delete_workspace(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> Response:
    """Everything it held goes: its VM (running or paused), disk, saved memory."""
    try:
        await services.workspaces.delete(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None
    return Response(status_code=204)


@router.post("/{workspace_id}/pause", response_model=WorkspaceView, responses={404: {}, 503: {}})
async def pause_workspace(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> WorkspaceView:
    """Pause its VM now (it is paused anyway once idle for WORKSPACE_IDLE_PAUSE_SECONDS)."""
    try:
        return await services.workspaces.pause(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None


class ConversationOut(BaseModel):
    id: uuid.UUID
    provider: str
    turns: int
    runs: list[uuid.UUID]  # its turns, oldest first (GET /api/runs/{id}, …/events, …/diff)
    created_at: datetime
    updated_at: datetime


@router.get("/{workspace_id}/conversations", response_model=list[ConversationOut], responses={404: {}})
async def list_conversations(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep
                             ) -> list[ConversationOut]:
    try:
        await services.workspaces.get(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None
    assert services.run_flow.conversations is not None
    out = []
    for c in await services.run_flow.conversations.for_workspace(workspace_id):
        runs = [r.id for r in await services.runs.turns(c.id)]
        out.append(ConversationOut(id=c.id, provider=c.provider, turns=c.turns, runs=runs, created_at=c.created_at,
                                   updated_at=c.updated_at))
    return out


@router.get("/{workspace_id}/archive", responses={200: {"content": {"application/gzip": {}}}, 404: {}, 409: {}})
async def download_workspace(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep
                             ) -> StreamingResponse:
    """The workspace's files as a tar.gz (its git history included); a paused workspace is woken for it."""
    try:
        view = await services.workspaces.get(user.id, workspace_id)
        chunks = await services.workspaces.archive(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None
    filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in view.name)[:80] or "workspace"
    return StreamingResponse(chunks, media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{filename}.tar.gz"'})
