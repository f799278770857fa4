"""E2B's control plane at the SDK's paths: create, list, get, kill, set the timeout, connect, pause.

`X-API-KEY` is a Polydev API token. Every answer that is not a success is `{"code": status, "message": …}`,
the shape the SDK's generated parsers read (anything else escapes them as a JSONDecodeError or KeyError), so
a bad request is a 400 the SDK raises as its own exception, never a 5xx. Routes use `E2bRoute`, which turns
validation and service errors into that shape instead of the API's own `{"error": …}`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polydev.api.deps import ServicesDep
from polydev.core.quotas import HostFull, QuotaExceeded
from polydev.core.sandbox_metrics import MetricsUnavailable
from polydev.core.sandboxes import (
    ENVD_VERSION,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    CreateSpec,
    Opened,
    SandboxConflict,
    SandboxError,
    SandboxLimit,
    SandboxNotFound,
    SandboxNotImplemented,
    SandboxUnavailable,
    SandboxView,
    TemplateNotFound,
)
from polydev.store.models import User

CLIENT_ID = "polydev"
MAX_PAGE = 100
_STATUS: dict[type[SandboxError], int] = {SandboxNotFound: 404, TemplateNotFound: 404, SandboxConflict: 409,
                                          SandboxLimit: 429, SandboxNotImplemented: 501, SandboxUnavailable: 503}


class E2bError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def e2b_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def _validation_message(errors: list[Any]) -> str:
    # The field and the rule, never the submitted value (it may hold a secret).
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}"


class E2bRoute(APIRoute):
    """Answers every failure of its endpoint (validation, auth, service errors) in E2B's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return e2b_error(400, _validation_message(list(exc.errors())))
            except E2bError as exc:
                return e2b_error(exc.status, exc.message, exc.headers)
            except (QuotaExceeded, HostFull) as exc:
                # Should-Retry: a quota is not freed by retrying within seconds; the SDK would wait 3×60 s.
                status = 429 if isinstance(exc, QuotaExceeded) else 503
                return e2b_error(status, str(exc), {"Retry-After": str(exc.retry_after), "Should-Retry": "false"})
            except SandboxError as exc:
                status = _STATUS.get(type(exc), 500)
                # (a limit or a host that cannot serve it now is not helped by the SDK's quick retries)
                return e2b_error(status, str(exc), {"Should-Retry": "false"} if status in (429, 503) else None)

        return handle


router = APIRouter(tags=["e2b"], route_class=E2bRoute)


async def e2b_user(services: ServicesDep, x_api_key: Annotated[str | None, Header()] = None) -> User:
    if not x_api_key:
        raise E2bError(401, "missing API key: send a Polydev API token as X-API-KEY (E2B_API_KEY)")
    user = await services.users.authenticate(x_api_key)
    if user is None:
        raise E2bError(401, "invalid or revoked API key")
    return user


E2bUser = Annotated[User, Depends(e2b_user)]
_Meta = dict[Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(max_length=4096)]]


class NewSandbox(BaseModel):
    # The SDK sends fields this server does not know yet; they are ignored, as E2B's API ignores them, except
    # those below that would change what the sandbox is and so are refused when set.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    templateID: str = Field(min_length=1, max_length=64)
    timeout: int = Field(300, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S, description="seconds until the sandbox ends")
    metadata: _Meta | None = Field(None, max_length=64)
    envVars: _Meta | None = Field(None, max_length=256)
    autoPause: bool = False
    autoPauseMemory: bool | None = None  # False: the timeout's pause keeps only the disk (mode "filesystem")
    autoResume: Any = None
    allow_internet_access: bool | None = None
    network: dict[str, Any] | None = None
    volumeMounts: list[Any] | None = None
    mcp: dict[str, Any] | None = None


class Pause(BaseModel):
    model_config = ConfigDict(extra="ignore")
    memory: bool = True  # False: E2B's mode "filesystem" (only the disk is kept; the resume boots it cold)
    requireHealthyGuest: bool = False  # the SDK's strict: refuse the pause when the agent does not answer


class Timeout(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)


class Reconnect(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int | None = Field(None, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _created(opened: Opened, domain: str | None) -> dict[str, Any]:
    view = opened.sandbox
    return {"sandboxID": view.id, "templateID": view.template, "clientID": CLIENT_ID, "envdVersion": ENVD_VERSION,
            "envdAccessToken": opened.access_token, "domain": domain}


def _listed(view: SandboxView) -> dict[str, Any]:
    return {"sandboxID": view.id, "templateID": view.template, "clientID": CLIENT_ID, "alias": view.template,
            "startedAt": _iso(view.started_at), "endAt": _iso(view.end_at), "cpuCount": view.cpu_count,
            "memoryMB": view.memory_mb, "diskSizeMB": 0, "state": view.state, "envdVersion": ENVD_VERSION,
            "metadata": view.metadata}


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise E2bError(400, _validation_message(list(exc.errors()))) from None


@router.post("/v2/sandboxes", status_code=201)
async def create_sandbox(request: Request, user: E2bUser, services: ServicesDep) -> JSONResponse:
    body: NewSandbox = await _json_body(request, NewSandbox)
    if body.volumeMounts or body.mcp:
        raise E2bError(400, "volume mounts and MCP servers are not supported by this server")
    if body.network and any(body.network.get(k) for k in ("allowOut", "denyOut", "maskRequestHost")):
        raise E2bError(400, "per-sandbox network rules are not supported by this server; "
                            "use allow_internet_access")
    spec = CreateSpec(template=body.templateID, timeout_s=body.timeout, metadata=body.metadata,
                      env_vars=body.envVars, auto_pause=body.autoPause,
                      auto_pause_memory=body.autoPauseMemory is not False,
                      internet=body.allow_internet_access is not False)
    opened = await services.sandboxes.create(user.id, spec)
    return JSONResponse(_created(opened, services.settings.sandbox_domain), status_code=201)


@router.get("/v2/sandboxes")
async def list_sandboxes(user: E2bUser, services: ServicesDep, metadata: str | None = None,
                         state: Annotated[list[str] | None, Query()] = None,
                         limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE),
                         nextToken: str | None = Query(None, max_length=200)) -> JSONResponse:
    views = await services.sandboxes.list(user.id)
    states = {s for value in state or [] for s in value.split(",") if s}
    if states - {"running", "paused"}:
        raise E2bError(400, "state must be running or paused")
    if states:
        views = [v for v in views if v.state in states]
    if metadata:
        wanted = dict(parse_qsl(metadata, keep_blank_values=True))
        views = [v for v in views if all(v.metadata.get(k) == value for k, value in wanted.items())]
    views.sort(key=lambda v: (v.started_at, v.id))
    if nextToken:
        after = _cursor(nextToken)
        views = [v for v in views if (_iso(v.started_at), v.id) > after]
    page, more = views[:limit], len(views) > limit
    headers = {}
    if more:
        last = page[-1]
        headers["x-next-token"] = base64.urlsafe_b64encode(json.dumps([_iso(last.started_at), last.id]).encode()).decode()
    return JSONResponse([_listed(v) for v in page], headers=headers)


def _cursor(token: str) -> tuple[str, str]:
    """(startedAt, id) of the last sandbox of the previous page, as `x-next-token` gave it."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        value = None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise E2bError(400, "nextToken is not one this server gave")
    return value[0], value[1]


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, user: E2bUser, services: ServicesDep) -> JSONResponse:
    view = await services.sandboxes.get(user.id, sandbox_id)
    return JSONResponse({**_listed(view), "domain": services.settings.sandbox_domain})


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, user: E2bUser, services: ServicesDep) -> Response:
    await services.sandboxes.kill(user.id, sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, request: Request, user: E2bUser, services: ServicesDep) -> Response:
    body: Timeout = await _json_body(request, Timeout)
    await services.sandboxes.set_timeout(user.id, sandbox_id, body.timeout)
    return Response(status_code=204)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect_sandbox(sandbox_id: str, request: Request, user: E2bUser, services: ServicesDep) -> JSONResponse:
    body: Reconnect = await _json_body(request, Reconnect)
    opened = await services.sandboxes.connect(user.id, sandbox_id, body.timeout)
    return JSONResponse(_created(opened, services.settings.sandbox_domain))


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause_sandbox(sandbox_id: str, request: Request, user: E2bUser, services: ServicesDep) -> Response:
    body: Pause = await _json_body(request, Pause)
    await services.sandboxes.pause(user.id, sandbox_id, memory=body.memory, strict=body.requireHealthyGuest)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/metrics")
async def sandbox_metrics(sandbox_id: str, user: E2bUser, services: ServicesDep,
                          start: int | None = None, end: int | None = None) -> JSONResponse:
    """Its use now, one sample taken in its VM (E2B keeps a series; `start`/`end`, Unix seconds, bound it)."""
    try:
        samples = await services.sandboxes.metrics(user.id, sandbox_id)
    except MetricsUnavailable as exc:
        raise E2bError(503, str(exc), {"Should-Retry": "false"}) from None
    return JSONResponse([m for m in samples if (start is None or m["timestampUnix"] >= start)
                         and (end is None or m["timestampUnix"] <= end)])
