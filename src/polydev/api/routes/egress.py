"""Egress: each user's egress identity (admins set it) and the gateway's accounting (everyone reads their
own; admins everyone's). core/egress_admin.py checks a change before anything is stored.

An upstream proxy's URL may hold credentials: it is accepted in a PUT body and never answered back, only as
`has_proxy` and `proxy` (scheme://host:port). The request body's validation errors never echo values
(api/errors.py), and nothing here logs the URL.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from polydev.api.deps import AdminUser, CurrentUser, ServicesDep
from polydev.api.errors import ApiError, from_domain
from polydev.core.egress_admin import (
    AddressPoolExhausted,
    BadEgressFamily,
    BadEgressLimits,
    BadEgressMode,
    BadProxyUrl,
    EgressAdminError,
    EgressUserNotFound,
    EgressView,
    NoAddressPool,
    UsageRow,
)

router = APIRouter(prefix="/api", tags=["egress"])

_ERRORS: dict[type[Exception], tuple[int, str]] = {  # the service's errors as answers (api.errors.from_domain)
    EgressUserNotFound: (404, "not_found"), BadEgressMode: (422, "bad_egress_mode"),
    BadEgressFamily: (422, "bad_egress_family"), BadProxyUrl: (422, "bad_proxy_url"),
    BadEgressLimits: (422, "bad_egress_limits"), NoAddressPool: (422, "no_address_pool"),
    AddressPoolExhausted: (409, "address_pool_exhausted"),
}


def api_error(exc: EgressAdminError) -> ApiError:
    return from_domain(_ERRORS, exc)


class EgressIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A plain string, so an unknown mode is the service's `bad_egress_mode` rather than a generic 422.
    mode: str = Field(description="direct, address or proxy")
    proxy_url: str | None = Field(None, max_length=2048, description="proxy mode: http://, socks5:// or socks5h://, "
                                  "optionally user:password@; sealed, never answered back")
    # Checked by the service too (`bad_egress_family`, `bad_egress_limits`), so the codes say what is wrong.
    family: StrictInt | None = Field(None, description="address mode: 4 or 6, the family to assign from")
    limits: dict[str, StrictInt] | None = Field(None, description="overrides of the settings' limits, keys "
                                                "concurrent, per_minute, bytes_per_day; {} clears them")


class EgressOut(BaseModel):
    user_id: uuid.UUID
    user_name: str
    mode: str
    address: str | None
    family: int | None
    has_proxy: bool
    proxy: str | None = Field(description="the upstream proxy as scheme://host:port (never its credentials)")
    limits: dict[str, int] = Field(description="this user's overrides")
    effective_limits: dict[str, int] = Field(description="what the gateway applies: defaults and overrides")

    @classmethod
    def of(cls, v: EgressView) -> EgressOut:
        return cls(user_id=v.user_id, user_name=v.user_name, mode=v.mode, address=v.address, family=v.family,
                   has_proxy=v.has_proxy, proxy=v.proxy, limits=v.limits, effective_limits=v.effective_limits)


_NOT_FOUND = {404: {"description": "no such user (`not_found`)"}}


@router.get("/egress/identities", response_model=list[EgressOut])
async def list_identities(_: AdminUser, services: ServicesDep) -> list[EgressOut]:
    """Every user's egress identity (admins)."""
    return [EgressOut.of(v) for v in await services.egress_admin.list_all()]


@router.get("/users/{user_id}/egress", response_model=EgressOut, responses=_NOT_FOUND)
async def get_egress(user_id: uuid.UUID, _: AdminUser, services: ServicesDep) -> EgressOut:
    try:
        return EgressOut.of(await services.egress_admin.get(user_id))
    except EgressAdminError as exc:
        raise api_error(exc) from None


@router.put("/users/{user_id}/egress", response_model=EgressOut,
            responses={**_NOT_FOUND, 409: {"description": "`address_pool_exhausted`"},
                       422: {"description": "`bad_egress_mode`, `bad_proxy_url`, `bad_egress_family`, "
                                            "`bad_egress_limits`, `no_address_pool`"}})
async def set_egress(user_id: uuid.UUID, body: EgressIn, _: AdminUser, services: ServicesDep) -> EgressOut:
    """Set a user's egress identity (admins): `direct`, `address` (one from EGRESS_ADDRESS_POOL, assigned once
    and kept) or `proxy` (their upstream proxy; the URL is sealed and may be left out to keep the stored one)."""
    try:
        view = await services.egress_admin.set(user_id, body.mode, proxy_url=body.proxy_url, family=body.family,
                                               limits=body.limits)
    except EgressAdminError as exc:
        raise api_error(exc) from None
    return EgressOut.of(view)


@router.get("/egress/usage", response_model=list[UsageRow])
async def usage(user: CurrentUser, services: ServicesDep,
                all_users: bool = Query(False, alias="all", description="everyone's (admins)")) -> list[UsageRow]:
    """The gateway's accounting per destination host, most recent first: yours, or everyone's with
    `?all=true` (admins)."""
    if all_users and user.role != "admin":
        raise ApiError(403, "forbidden", "everyone's usage needs an admin token")
    rows = await services.egress_admin.usage(user.id, all_users=all_users)
    return rows
