"""Users and API tokens. Admins manage users; everyone manages their own tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from polydev.api.deps import AdminUser, CurrentUser, ServicesDep
from polydev.api.errors import ApiError
from polydev.store.models import ApiToken, User
from polydev.store.users import NameTaken

router = APIRouter(prefix="/api", tags=["users"])

_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserOut(BaseModel):
    id: uuid.UUID
    name: str
    role: Literal["admin", "user"]
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(id=user.id, name=user.name, role=user.role, created_at=user.created_at)  # type: ignore[arg-type]


class UserIn(Strict):
    name: str = Field(pattern=_NAME, description="lower-case letters, digits, `_`, `.`, `-`; at most 64")
    role: Literal["admin", "user"] = "user"


class TokenIn(Strict):
    name: str = Field("default", min_length=1, max_length=64, pattern=r"^[\w .-]+$")


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool

    @classmethod
    def of(cls, t: ApiToken) -> TokenOut:
        return cls(id=t.id, name=t.name, prefix=t.prefix, created_at=t.created_at, last_used_at=t.last_used_at,
                   revoked=t.revoked_at is not None)


class IssuedTokenOut(TokenOut):
    token: str = Field(description="the token itself; shown only in this response")


@router.get("/me", response_model=UserOut)
async def me(user: CurrentUser) -> UserOut:
    return UserOut.of(user)


@router.get("/users", response_model=list[UserOut])
async def list_users(_: AdminUser, services: ServicesDep) -> list[UserOut]:
    return [UserOut.of(u) for u in await services.users.list()]


@router.post("/users", response_model=UserOut, status_code=201, responses={409: {}})
async def create_user(body: UserIn, _: AdminUser, services: ServicesDep) -> UserOut:
    try:
        return UserOut.of(await services.users.create(body.name, body.role))
    except NameTaken:
        raise ApiError(409, "name_taken", f"a user named {body.name!r} already exists") from None


@router.get("/users/{user_id}", response_model=UserOut, responses={404: {}})
async def get_user(user_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> UserOut:
    user = await services.users.get(user_id)
    if user is None:
        raise ApiError(404, "not_found", "no such user")
    return UserOut.of(user)


@router.post("/users/{user_id}/tokens", response_model=IssuedTokenOut, status_code=201, responses={404: {}})
async def issue_token(user_id: uuid.UUID, body: TokenIn, user: CurrentUser, services: ServicesDep) -> IssuedTokenOut:
    # A user may mint tokens for themself; only an admin for someone else. Others' ids read as absent.
    if user.id != user_id and user.role != "admin":
        raise ApiError(404, "not_found", "no such user")
    if await services.users.get(user_id) is None:
        raise ApiError(404, "not_found", "no such user")
    issued = await services.users.issue_token(user_id, body.name)
    return IssuedTokenOut(**TokenOut.of(issued.token).model_dump(), token=issued.secret)


@router.get("/tokens", response_model=list[TokenOut])
async def list_tokens(user: CurrentUser, services: ServicesDep) -> list[TokenOut]:
    return [TokenOut.of(t) for t in await services.users.list_tokens(user.id)]


@router.delete("/tokens/{token_id}", status_code=204, responses={404: {}})
async def revoke_token(token_id: uuid.UUID, user: CurrentUser, services: ServicesDep) -> Response:
    if not await services.users.revoke_token(user.id, token_id):
        raise ApiError(404, "not_found", "no such token")
    return Response(status_code=204)
