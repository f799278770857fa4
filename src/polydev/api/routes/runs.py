"""Runs: send a prompt to a provider's CLI in a fresh VM and follow its output live (SSE)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from polydev.api.deps import SSE_HEADERS, CurrentUser, Provider, ServicesDep
from polydev.api.errors import ApiError
from polydev.core.errors import (
    BadRunFiles,
    CredentialBusy,
    FlowUnavailable,
    NoCredential,
    RunFilesTooLarge,
    TurnRefused,
)
from polydev.core.run_files import check_files
from polydev.core.workspace_models import WorkspaceNotFound
from polydev.store.models import Run
from polydev.store.runs import MAX_EVENT_SEQ, WorkspaceTurnBusy

router = APIRouter(prefix="/api/runs", tags=["runs"])


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Provider
    # No min_length: an empty prompt answers empty_prompt, as a blank one does (start_run).
    prompt: str = Field(description="what to ask the CLI; its size limit is MAX_PROMPT_BYTES")
    files: dict[str, str] | None = Field(None, description="text files to put in the run's working "
                                         "directory, keyed by relative path (segments separated by `/`, "
                                         "none empty, `.` or `..`; no control or format characters)")
    timeout: int | None = Field(None, ge=10, description="seconds before the run is stopped")
    workspace_id: uuid.UUID | None = Field(None, description="run as a turn in this workspace's VM (a new "
                                           "conversation), instead of in a fresh VM")
    conversation_id: uuid.UUID | None = Field(None, description="a follow-up: continue this conversation (the "
                                              "CLI resumes its session, on the conversation's workspace)")


class RunOut(BaseModel):
    id: uuid.UUID
    provider: Provider
    status: str
    prompt: str
    error_message: str | None = None
    exit_code: int | None = None
    usage: dict[str, Any] | None = None
    result: str | None = None
    credential_refreshed: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    workspace_id: uuid.UUID | None = None
    conversation_id: uuid.UUID | None = None
    changes: list[dict[str, Any]] | None = Field(None, description="a turn's files changed: path, status "
                                                 "(added, modified, deleted, renamed …), binary; the patch is "
                                                 "at /api/runs/{id}/diff")

    @classmethod
    def of(cls, r: Run) -> RunOut:
        return cls(id=r.id, provider=Provider(r.provider), status=r.status, prompt=r.prompt,
                   error_message=r.error_message, exit_code=r.exit_code,
                   usage=json.loads(r.usage_json) if r.usage_json else None, result=r.result_text,
                   credential_refreshed=bool(r.credential_refreshed), created_at=r.created_at,
                   started_at=r.started_at, finished_at=r.finished_at, workspace_id=r.workspace_id,
                   conversation_id=r.conversation_id,
                   changes=json.loads(r.changes_json) if r.changes_json else None)


@router.post("", response_model=RunOut, status_code=202, responses={409: {}, 413: {}, 422: {}, 503: {}})
async def start_run(body: RunIn, user: CurrentUser, services: ServicesDep) -> RunOut:
    s = services.settings
    if not body.prompt.strip():
        raise ApiError(422, "empty_prompt", "the prompt is empty")
    try:
        size = len(body.prompt.encode())
    except UnicodeEncodeError:  # JSON may carry a lone surrogate ("\ud800"), which no CLI can be given
        raise ApiError(422, "validation_error", "prompt: not valid Unicode text (a lone surrogate)") from None
    if size > s.max_prompt_bytes:
        raise ApiError(413, "prompt_too_large", f"the prompt is over the {s.max_prompt_bytes}-byte limit")
    if body.timeout is not None and body.timeout > s.run_max_timeout_seconds:
        raise ApiError(422, "timeout_too_long", f"timeout may be at most {s.run_max_timeout_seconds} s")
    try:
        files = check_files(body.files, s.max_run_files_bytes)
    except RunFilesTooLarge as exc:
        raise ApiError(413, "files_too_large", str(exc)) from None
    except BadRunFiles as exc:
        raise ApiError(422, "bad_files", str(exc)) from None
    provider = body.provider.value
    try:
        row = await services.run_flow.start(user.id, provider, body.prompt, files=files, timeout=body.timeout,
                                            workspace_id=body.workspace_id, conversation_id=body.conversation_id)
    except TurnRefused as exc:
        raise ApiError(404 if exc.not_found else 422, "not_found" if exc.not_found else "bad_turn", str(exc)) from None
    except WorkspaceNotFound:
        raise ApiError(404, "not_found", "no such workspace") from None
    except WorkspaceTurnBusy:
        raise ApiError(409, "workspace_busy", "a turn is already running on this workspace; wait for it to "
                       "finish or cancel it") from None
    except NoCredential:
        raise ApiError(409, "no_credential",
                       f"no stored credential for {provider}: connect the account first (POST /api/auth/start "
                       f"or `polydev login {provider}`) or store an API key (PUT /api/credentials/{provider}/api-key)",
                       action="connect_provider") from None
    except CredentialBusy:
        raise ApiError(409, "credential_busy",
                       f"another run is using your {provider} credential; wait for it to finish or cancel it "
                       "(one VM at a time per credential: refresh tokens are single-use)") from None
    except FlowUnavailable as exc:
        raise ApiError(503, "vm_unavailable", f"this server cannot start VMs: {exc}") from None
    return RunOut.of(row)


@router.get("", response_model=list[RunOut])
async def list_runs(user: CurrentUser, services: ServicesDep,
                    limit: int = Query(50, ge=1, le=500)) -> list[RunOut]:
    return [RunOut.of(r) for r in await services.runs.list_for(user.id, limit)]


async def _owned(services: ServicesDep, user_id: uuid.UUID, run_id: uuid.UUID) -> Run:
    row = await services.runs.get_owned(user_id, run_id)
    if row is None:
        raise ApiError(404, "not_found", "no such run")
    return row


@router.get("/{run_id}", response_model=RunOut, responses={404: {}})
async def get_run(run_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> RunOut:
    return RunOut.of(await _owned(services, user.id, run_id))


_EVENT_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() also takes "+1", "1_0", " 1" and "١"


def _last_event_id(value: str) -> int:
    """The Last-Event-ID header as the event number to resume after; 400 for anything that is not one."""
    if _EVENT_ID.fullmatch(value) is None or int(value) > MAX_EVENT_SEQ:
        raise ApiError(400, "bad_last_event_id",
                       f"the Last-Event-ID header must be an event id: an integer from 0 to {MAX_EVENT_SEQ}")
    return int(value)


@router.get("/{run_id}/events", responses={400: {}, 404: {}})
async def run_events(run_id: uuid.UUID, request: Request, user: CurrentUser, services: ServicesDep,
                     last_event_id: str | None = Header(None, description="resume after this event id"),
                     after: int | None = Query(None, ge=-1, le=MAX_EVENT_SEQ,
                                               description="same as Last-Event-ID")) -> StreamingResponse:
    """The run's events as server-sent events: `id` is the event's sequence number, `event` its type, `data`
    the event as JSON. Everything from the start (or after Last-Event-ID), then live, until the run ends."""
    # Checked before anything is read: a value the database cannot compare would break the stream once
    # its 200 has been sent.
    start = _last_event_id(last_event_id) if last_event_id is not None else after if after is not None else -1
    await _owned(services, user.id, run_id)

    async def gen() -> AsyncIterator[bytes]:
        async for ev in services.run_flow.stream(run_id, start):
            if ev is None:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            yield f"id: {ev.seq}\nevent: {ev.data.get('type', 'message')}\ndata: {json.dumps(ev.data)}\n\n".encode()

    return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/{run_id}/diff", responses={200: {"content": {"text/x-diff": {}}}, 404: {}})
async def run_diff(run_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> Response:
    """A turn's changes to its workspace as a patch (`git diff` against the turn's start; binary files are
    named, not included). 404 for a run that is not a turn, or has not ended."""
    row = await _owned(services, user.id, run_id)
    if row.patch is None:
        raise ApiError(404, "not_found", "no diff: the run is not a turn on a workspace, or has not ended")
    return Response(row.patch, media_type="text/x-diff")


@router.post("/{run_id}/cancel", response_model=RunOut, responses={404: {}})
async def cancel_run(run_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> RunOut:
    row = await services.run_flow.cancel(user.id, run_id)
    if row is None:
        raise ApiError(404, "not_found", "no such run")
    return RunOut.of(row)
