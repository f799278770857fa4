"""The read side of the login flow."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from polydev.api.deps import CurrentUser, Provider, ServicesDep
from polydev.api.errors import ApiError
from polydev.core.login_sessions import SessionExpired, SessionNotFound

router = APIRouter(prefix="/api/auth/sessions", tags=["auth"])


class SessionOut(BaseModel):
    session_id: uuid.UUID
    provider: Provider
    status: str
    auth_url: str | None = None
    vnc_url: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None


@router.get("/{session_id}", response_model=SessionOut, responses={404: {}, 410: {}})
async def get_session(session_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> SessionOut:
    try:
        state = await services.login.read(user.id, session_id)
    except SessionNotFound:
        raise ApiError(404, "not_found", "no such login session") from None
    except SessionExpired:
        raise ApiError(410, "session_expired", "this login session has expired; start a new session",
                       action="start_new_session") from None
    return SessionOut.model_validate(state)
