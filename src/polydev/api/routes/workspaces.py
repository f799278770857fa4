"""Workspaces: projects the CLIs work on across turns, each kept on a VM of its own (core/workspaces.py).

`POST /api/workspaces` makes an empty one, or one cloned from a git repository (JSON); `POST
/api/workspaces/upload?name=N` makes one from the archive in the body (`application/x-tar`, `application/gzip`
or `application/zip`). Both answer 202 with the workspace `creating`; it becomes `ready`, or `failed` with the
reason. Another user's workspace answers 404 like a missing one.

The terminal is a WebSocket, like the login browser's VNC view (api/routes/vnc.py): `POST …/terminal-ticket`
gives a single-use ticket, and `GET …/terminal?ticket=…&rows=R&cols=C` (WebSocket) carries the shell's output
as binary frames to the page and its keystrokes back as binary frames; a text frame
`{"type": "resize", "rows": R, "cols": C}` resizes the terminal. Close codes: 1000 the shell ended, 1008 a bad
or used ticket (refused before the handshake: HTTP 403), 4404 no such workspace, 4409 the workspace is not
ready (or its VM could not be reached), 1011 the terminal was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import datetime
from typing import Literal

import structlog
from fastapi import APIRouter, Query, Request, Response, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from starlette.websockets import WebSocketDisconnect

from polydev.api.deps import CurrentUser, ServicesDep
from polydev.api.errors import ApiError, from_domain
from polydev.core.tasks import cancel_and_wait
from polydev.core.workspace_models import (
    Source,
    WorkspaceBusy,
    WorkspaceError,
    WorkspaceInvalid,
    WorkspaceLimit,
    WorkspaceNotFound,
    WorkspaceUnavailable,
    WorkspaceView,
)
from polydev.core.workspace_terminal import Terminal
from polydev.services import Services

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/workspaces", tags=["workspaces"])
CLOSE_ENDED, CLOSE_POLICY, CLOSE_LOST = 1000, 1008, 1011
CLOSE_NOT_FOUND, CLOSE_UNAVAILABLE = 4404, 4409

ERRORS: dict[type[Exception], tuple[int, str]] = {
    WorkspaceNotFound: (404, "not_found"), WorkspaceLimit: (429, "workspace_limit"),
    WorkspaceBusy: (409, "workspace_not_ready"), WorkspaceUnavailable: (503, "unavailable"),
    WorkspaceInvalid: (422, "invalid_workspace"),
    WorkspaceError: (500, "workspace_error"),
}
ARCHIVE_TYPES = {"application/x-tar": "tar", "application/gzip": "tar", "application/x-gzip": "tar",
                 "application/x-compressed-tar": "tar", "application/zip": "zip"}
NAME = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")


class NewWorkspace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = NAME
    source: Literal["empty", "git"] = Field("empty", description="empty, or git (clone `repo_url`); uploads: "
                                            "POST /api/workspaces/upload")
    repo_url: str | None = Field(None, max_length=2000, description="git: an https:// URL on a host in "
                                 "WORKSPACE_GIT_HOSTS, with no credentials in it")
    branch: str | None = Field(None, min_length=1, max_length=200, description="git: the branch to check out "
                               "(default: the remote's)")
    git_token: SecretStr | None = Field(None, max_length=4096, description="git: a token for a private "
                                        "repository and for pushing (`user:token`, or the token alone), stored "
                                        "sealed and never shown again")

    @model_validator(mode="after")
    def _git_fields(self) -> NewWorkspace:
        if self.source == "git" and not self.repo_url:
            raise ValueError("a git workspace needs repo_url")
        if self.source != "git" and (self.repo_url or self.branch or self.git_token):
            raise ValueError("repo_url, branch and git_token are for source git")
        return self


class PushIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    branch: str = Field(min_length=1, max_length=200, description="the branch on the remote to push HEAD to "
                        "(created, or fast-forwarded; never forced)")


class PushOut(BaseModel):
    branch: str
    commit: str
    remote: str


class TicketOut(BaseModel):
    ticket: str
    expires_in: int
    url: str


def _domain(exc: WorkspaceError) -> ApiError:
    return from_domain(ERRORS, exc) if type(exc) in ERRORS else ApiError(500, "workspace_error", str(exc))


@router.post("", response_model=WorkspaceView, status_code=202, responses={422: {}, 429: {}, 503: {}})
async def create_workspace(body: NewWorkspace, user: CurrentUser, services: ServicesDep) -> WorkspaceView:
    try:
        token = body.git_token.get_secret_value() if body.git_token else None
        source = Source(body.source, repo_url=body.repo_url, branch=body.branch, git_token=token)
        return await services.workspaces.create(user.id, body.name, source)
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
async def pause_workspace(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep,
                          memory: bool = Query(True, description="keep its memory (resumes as it was); false: "
                                               "its disk only (boots cold when next used)")) -> WorkspaceView:
    """Pause its VM now (it is paused anyway once idle for WORKSPACE_IDLE_PAUSE_SECONDS). 429 past the
    user's WORKSPACE_PAUSED_PER_USER with memory."""
    try:
        return await services.workspaces.pause(user.id, workspace_id, memory=memory)
    except WorkspaceError as exc:
        raise _domain(exc) from None


@router.post("/{workspace_id}/push", response_model=PushOut, responses={404: {}, 409: {}, 422: {}})
async def push_workspace(workspace_id: uuid.UUID, body: PushIn, user: CurrentUser, services: ServicesDep
                         ) -> PushOut:
    """Push the workspace's HEAD (each turn is a commit) to a branch of the repository it was cloned from,
    with the git token stored with it."""
    try:
        pushed = await services.workspaces.push(user.id, workspace_id, body.branch)
    except WorkspaceError as exc:
        raise _domain(exc) from None
    return PushOut(branch=pushed.branch, commit=pushed.commit, remote=pushed.remote)


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


def terminal_path(workspace_id: uuid.UUID) -> str:
    return f"/api/workspaces/{workspace_id}/terminal"


@router.post("/{workspace_id}/terminal-ticket", response_model=TicketOut, responses={404: {}, 409: {}})
async def terminal_ticket(workspace_id: uuid.UUID, user: CurrentUser, services: ServicesDep,
                          response: Response) -> TicketOut:
    """A single-use ticket for the workspace's terminal WebSocket; ask for one right before connecting."""
    try:
        view = await services.workspaces.get(user.id, workspace_id)
    except WorkspaceError as exc:
        raise _domain(exc) from None
    if view.state in ("creating", "failed"):
        raise ApiError(409, "workspace_not_ready", "the workspace is still being made" if view.state == "creating"
                       else f"the workspace failed: {view.error}")
    ticket = await services.terminal_tickets.issue(user.id, workspace_id)
    response.headers["Cache-Control"] = "no-store"
    return TicketOut(ticket=ticket.secret, expires_in=ticket.expires_in,
                     url=f"{terminal_path(workspace_id)}?ticket={ticket.secret}")


@router.websocket("/{workspace_id}/terminal")
async def terminal_socket(websocket: WebSocket, workspace_id: uuid.UUID, ticket: str = "", rows: int = 24,
                          cols: int = 80) -> None:
    services: Services = websocket.app.state.services
    user_id = await services.terminal_tickets.redeem(ticket, workspace_id)
    if user_id is None:
        await websocket.close(CLOSE_POLICY, "invalid or used ticket")
        return
    await websocket.accept()
    try:  # (waking a paused workspace takes a moment: the page shows the socket open meanwhile)
        term = await services.workspaces.terminal(user_id, workspace_id, _clamp(rows), _clamp(cols))
    except WorkspaceNotFound:
        await websocket.close(CLOSE_NOT_FOUND, "no such workspace")
        return
    except WorkspaceError as exc:
        await websocket.close(CLOSE_UNAVAILABLE, str(exc)[:120])
        return
    except Exception as exc:  # noqa: BLE001 - the VM's agent failed under us: say so, not a bare drop
        log.warning("terminal_failed", workspace_id=str(workspace_id), error=str(exc) or type(exc).__name__)
        await websocket.close(CLOSE_LOST, "terminal_lost")
        return
    log.info("terminal_open", workspace_id=str(workspace_id))
    try:
        code, reason = await _bridge_terminal(websocket, term)
    finally:
        await services.workspaces.close_terminal(workspace_id, term)
    with contextlib.suppress(Exception):
        await websocket.close(code, reason)
    log.info("terminal_closed", workspace_id=str(workspace_id), reason=reason)


def _clamp(n: int) -> int:
    return max(1, min(n, 1000))


async def _bridge_terminal(websocket: WebSocket, term: Terminal) -> tuple[int, str]:
    """The shell's output to the page and the page's keystrokes and resizes to the shell, until either ends."""

    async def output() -> tuple[int, str]:
        while (data := await term.read()) is not None:
            await websocket.send_bytes(data)
        if term.failure:
            return CLOSE_LOST, "terminal_lost"
        return CLOSE_ENDED, f"shell exited ({term.exit_code})"

    async def keys() -> tuple[int, str]:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return CLOSE_ENDED, "closed by the page"
            if message.get("bytes"):
                await term.write(message["bytes"])
            elif message.get("text"):
                await _control(term, message["text"])

    tasks = [asyncio.create_task(output()), asyncio.create_task(keys())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        try:
            return next(iter(done)).result()
        except (WebSocketDisconnect, RuntimeError):
            return CLOSE_ENDED, "closed by the page"
        except Exception as exc:  # noqa: BLE001 - the agent went away under us
            log.info("terminal_lost", error=str(exc) or type(exc).__name__)
            return CLOSE_LOST, "terminal_lost"
    finally:
        await cancel_and_wait(tasks)


async def _control(term: Terminal, text: str) -> None:
    """A control message from the page; anything else in a text frame is typed, as a terminal would."""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if isinstance(message, dict) and message.get("type") == "resize":
        rows, cols = message.get("rows"), message.get("cols")
        if isinstance(rows, int) and isinstance(cols, int):
            await term.resize(_clamp(rows), _clamp(cols))
        return
    await term.write(text.encode())
