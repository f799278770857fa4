"""Stored provider credentials: metadata out, secrets only in."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from polydev.api.deps import CurrentUser, Provider, ServicesDep
from polydev.api.errors import ApiError
from polydev.store.models import Credential

router = APIRouter(prefix="/api/credentials", tags=["credentials"])

ProviderPath = Annotated[Provider, Path(description="claude_code, codex or gemini_cli")]


class CredentialOut(BaseModel):
    provider: Provider
    kind: Literal["oauth", "api_key"]
    is_valid: bool
    created_at: datetime
    updated_at: datetime
    last_validated: datetime | None

    @classmethod
    def of(cls, c: Credential) -> CredentialOut:
        return cls(provider=Provider(c.provider), kind=c.kind, is_valid=c.is_valid,  # type: ignore[arg-type]
                   created_at=c.created_at, updated_at=c.updated_at, last_validated=c.last_validated)


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A plain str: pydantic cannot apply a pattern to SecretStr. It is never echoed (see api/errors.py).
    api_key: str = Field(min_length=8, max_length=4096, pattern=r"^[\x21-\x7e]+$",
                               description="the provider's API key (printable ASCII, no spaces)")


@router.get("", response_model=list[CredentialOut])
async def list_credentials(user: CurrentUser, services: ServicesDep) -> list[CredentialOut]:
    return [CredentialOut.of(c) for c in await services.credentials.list(user.id)]


@router.put("/{provider}/api-key", response_model=CredentialOut)
async def put_api_key(provider: ProviderPath, body: ApiKeyIn, user: CurrentUser,
                      services: ServicesDep) -> CredentialOut:
    row = await services.credentials.put(user.id, provider.value, "api_key",
                                         body.api_key.encode())
    return CredentialOut.of(row)


@router.delete("/{provider}", status_code=204, responses={404: {}})
async def delete_credential(provider: ProviderPath, user: CurrentUser, services: ServicesDep) -> Response:
    if not await services.credentials.delete(user.id, provider.value):
        raise ApiError(404, "not_found", f"no stored credential for {provider.value}")
    return Response(status_code=204)
