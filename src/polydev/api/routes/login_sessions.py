"""Login sessions: start one, follow it (JSON or live over SSE), hand it the user's code, cancel it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polydev.api.deps import (
    SSE_HEADERS,
    CurrentUser,
    Provider,
    ServicesDep,
    read_live_login_session,
    read_login_session,
)
from polydev.api.errors import ApiError
from polydev.core.errors import (
    CodeRejected,
    FlowUnavailable,
    SessionExpired,
    SessionNotFound,
    SessionNotLive,
)
from polydev.store.models import AUTH_SESSION_TERMINAL

router = APIRouter(prefix="/api/auth", tags=["auth"])


class SessionOut(BaseModel):
    session_id: uuid.UUID
    provider: Provider
    method: str | None = None
    status: str
    auth_url: str | None = None
    device_code: str | None = Field(None, description="device login: the code to enter at auth_url")
    accepts_code: bool = Field(False, description="a code from the provider's page may be sent to /code")
    vnc_url: str | None = Field(None, description="the login browser's view while the session is live; null "
                                "once it has ended (its VM is gone)")
    error_message: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @model_validator(mode="after")
    def _no_view_once_ended(self) -> SessionOut:
        # The state keeps the address it was given (rows and the live store alike); an ended session's VM is
        # gone, so there is nothing there to show.
        if self.status in AUTH_SESSION_TERMINAL:
            self.vnc_url = None
        return self


class StartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Provider
    method: Literal["browser", "device"] | None = Field(
        None, description="browser (default) or device (Codex's device code)")


class CodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$",
                      description="the code the provider's page showed, or the full http://localhost… "
                                  "address the browser was sent to after signing in")


@router.post("/start", response_model=SessionOut, status_code=202, responses={422: {}, 503: {}})
async def start_login(body: StartIn, user: CurrentUser, services: ServicesDep) -> SessionOut:
    """Start connecting a provider account. Answers at once; follow the session for its `auth_url`."""
    try:
        state = await services.login_flow.start(user.id, body.provider.value, body.method)
    except ValueError as exc:
        raise ApiError(422, "unsupported_method", str(exc)) from None
    except FlowUnavailable as exc:
        raise ApiError(503, "vm_unavailable", f"this server cannot start VMs: {exc}") from None
    return SessionOut.model_validate(state)


@router.get("/sessions/{session_id}", response_model=SessionOut, responses={404: {}, 410: {}})
async def get_session(session_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> SessionOut:
    return SessionOut.model_validate(await read_login_session(services, user.id, session_id))


@router.get("/sessions/{session_id}/events", responses={404: {}, 410: {}})
async def session_events(session_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> StreamingResponse:
    """The session's state as server-sent events (`event: session`), one per change, until it ends."""
    first = await read_login_session(services, user.id, session_id)

    async def gen() -> AsyncIterator[bytes]:
        state, last, idle = first, None, 0.0
        while True:
            body = SessionOut.model_validate(state).model_dump(mode="json")
            if body != last:
                last, idle = body, 0.0
                yield f"event: session\ndata: {json.dumps(body)}\n\n".encode()
            if body["status"] in AUTH_SESSION_TERMINAL:
                return
            await asyncio.sleep(0.25)
            idle += 0.25
            if idle >= 15:
                idle = 0.0
                yield b": keep-alive\n\n"
            try:
                state = await services.login_sessions.read(user.id, session_id)
            except (SessionNotFound, SessionExpired):
                yield b'event: session\ndata: {"status": "timeout", "action": "start_new_session"}\n\n'
                return

    return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/sessions/{session_id}/code", status_code=202, responses={404: {}, 409: {}, 410: {}, 422: {}})
async def submit_code(session_id: uuid.UUID, body: CodeIn, user: CurrentUser, services: ServicesDep) -> dict:
    await read_live_login_session(services, user.id, session_id)  # 410 once ended, as for a VNC ticket
    try:
        await services.login_flow.submit_code(user.id, session_id, body.code)
    except SessionNotLive as exc:
        await read_live_login_session(services, user.id, session_id)  # it may have ended in the meantime
        raise ApiError(409, "session_not_waiting", str(exc)) from None
    except CodeRejected as exc:
        raise ApiError(422, "code_rejected", str(exc)) from None
    return {"accepted": True}


@router.post("/sessions/{session_id}/cancel", response_model=SessionOut, responses={404: {}, 410: {}})
async def cancel_session(session_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> SessionOut:
    await read_login_session(services, user.id, session_id)
    try:
        state = await services.login_flow.cancel(user.id, session_id)
    except (SessionNotFound, SessionExpired):
        raise ApiError(404, "not_found", "no such login session") from None
    return SessionOut.model_validate(state)
