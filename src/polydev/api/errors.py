"""One error shape for every failure: {"error": {"code": ..., "message": ...}}.

Validation messages never echo the submitted values: a rejected body may well hold an API key.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from polydev.core.quotas import HostFull, QuotaExceeded

log = structlog.get_logger(__name__)

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 409: "conflict", 410: "gone", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_error", 429: "too_many_requests", 503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def from_domain(table: dict[type[Exception], tuple[int, str]], exc: Exception, **extra: Any) -> ApiError:
    """A service's error as the API's answer: `table` maps its class to (status, code); the message is the
    error's own text."""
    status, code = table[type(exc)]
    return ApiError(status, code, str(exc), **extra)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, **exc.extra)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "malformed_json", "request body is not valid JSON")
    content_type = request.headers.get("content-type", "")
    if request.method in ("POST", "PUT", "PATCH") and content_type and "json" not in content_type \
            and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
        return error_response(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    details = [{"field": _where(e.get("loc", ())), "problem": e.get("msg", "invalid")} for e in errors]
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if loc[:2] == ("path", "provider"):
            return error_response(422, "unknown_provider",
                                  "unknown provider; expected one of claude_code, codex, gemini_cli", details=details)
        if loc[:1] == ("path",) and e.get("type", "").startswith("uuid"):
            return error_response(422, "malformed_id", f"{loc[-1]} must be a UUID", details=details)
    summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
    return error_response(422, "validation_error", summary or "invalid request", details=details)


async def _not_admitted(_request: Request, exc: Exception) -> JSONResponse:
    """A quota (429) or the host's capacity (503): which limit, the use against it, and when to retry."""
    assert isinstance(exc, QuotaExceeded | HostFull)
    status, code = (429, "quota_exceeded") if isinstance(exc, QuotaExceeded) else (503, "host_capacity")
    return error_response(status, code, str(exc), headers={"Retry-After": str(exc.retry_after)},
                          limit=exc.limit, used=exc.used, allowed=exc.allowed)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database or Redis cannot be reached (restarting, a network fault): a 503 the client may retry,
    rather than an internal error. The details (addresses) go to the log only."""
    store = "the session store (Redis)" if isinstance(exc, RedisError) else "the database"
    log.warning("store_unavailable", path=request.url.path, store=store, error_type=type(exc).__name__,
                error=str(exc)[:300])
    # SQLite's words when the data directory is full (the embedded database lives there)
    why = "is out of disk space" if "disk is full" in str(exc) else "cannot be reached"
    return error_response(503, "store_unavailable", f"{store} {why} right now; try again shortly",
                          headers={"Retry-After": "5"})


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OperationalError, InterfaceError, DisconnectionError,
                ConnectionError)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, _UNREACHABLE):  # raised outside the routes (a middleware): the same 503 as inside them
        return await _store_unavailable(request, exc)
    log.error("unhandled_error", path=request.url.path, error_type=type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(QuotaExceeded, _not_admitted)
    app.add_exception_handler(HostFull, _not_admitted)
    # A connection the database or Redis refused or broke (asyncpg raises the socket's own ConnectionError).
    for unreachable in _UNREACHABLE:
        app.add_exception_handler(unreachable, _store_unavailable)
    app.add_exception_handler(Exception, _unhandled)
