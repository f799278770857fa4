"""What the routes share: the wired services, the authenticated user, and helpers more than one route uses."""

from __future__ import annotations

import uuid
from enum import Enum
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from polydev.api.errors import ApiError
from polydev.core.login_sessions import SessionExpired, SessionNotFound
from polydev.services import Services
from polydev.store.models import AUTH_SESSION_TERMINAL, User


class Provider(str, Enum):
    claude_code = "claude_code"
    codex = "codex"
    gemini_cli = "gemini_cli"


# Server-sent event streams: never cached, never buffered by a proxy.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer pd_…`")


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per request.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_user(
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "missing API token: send `Authorization: Bearer <token>`")
    user = await services.users.authenticate(creds.credentials)
    if user is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API token")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def admin_user(user: CurrentUser) -> User:
    if user.role != "admin":
        raise ApiError(403, "forbidden", "this needs an admin token")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


async def read_login_session(services: Services, user_id: uuid.UUID, session_id: uuid.UUID) -> dict[str, Any]:
    """The user's login session's state; 404 for no such session (or another user's), 410 once expired."""
    try:
        return await services.login_sessions.read(user_id, session_id)
    except SessionNotFound:
        raise ApiError(404, "not_found", "no such login session") from None
    except SessionExpired:
        raise ApiError(410, "session_expired", "this login session has expired; start a new session",
                       action="start_new_session") from None


async def read_live_login_session(services: Services, user_id: uuid.UUID, session_id: uuid.UUID) -> dict[str, Any]:
    """As read_login_session, and 410 once the session has ended: a code or a VNC ticket for it can do
    nothing, whichever way it ended, and the answer says to start a new one, as for an expired session."""
    state = await read_login_session(services, user_id, session_id)
    if state["status"] in AUTH_SESSION_TERMINAL:
        raise ApiError(410, "session_expired", f"this login session has ended ({state['status']}); start a new "
                       "session", action="start_new_session")
    return state
