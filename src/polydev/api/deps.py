"""Request dependencies: the wired services and the authenticated user."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from polydev.api.errors import ApiError
from polydev.services import Services
from polydev.store.models import User


class Provider(str, Enum):
    claude_code = "claude_code"
    codex = "codex"
    gemini_cli = "gemini_cli"


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
