"""ASGI middleware: request-size limit, request-body time limit, and per-request logging and metrics keyed by
route template."""

from __future__ import annotations

import asyncio
import time

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polydev.api.errors import error_response
from polydev.api.metrics import Metrics

log = structlog.get_logger("polydev.http")


class _HttpMiddleware:
    """Pure ASGI middleware that acts on HTTP requests and passes everything else (WebSockets, lifespan)
    through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimitMiddleware(_HttpMiddleware):
    """Answer 413 for bodies over `limit` bytes, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None) -> None:
        super().__init__(app)
        self.default = limit
        self.paths = paths or {}  # routes with a limit of their own (an archive upload), by exact path

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.paths.get(scope.get("path", ""), self.default)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                    return
                if declared > limit:
                    await self._too_large(scope, receive, send, limit)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body read, so the app's error handlers answer it.
                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        await error_response(413, "payload_too_large", f"request body larger than {limit} bytes")(
            scope, receive, send)


class BodyTimeoutMiddleware(_HttpMiddleware):
    """Answer 408 and close the connection when a request's body has not arrived in full `seconds` after its
    headers. The server itself waits for a body as long as its client keeps the connection open: a client
    that announces 100 bytes and sends 7 would hold its connection, and the route waiting on it, for as long
    as it likes. The limit is on the whole body, not on each chunk, so a body trickling in is cut off too."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        super().__init__(app)
        self.seconds = seconds

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = asyncio.get_running_loop().time() + self.seconds
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:  # later calls wait for the client to leave (a streamed response): no limit on that
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Raised inside the route's body read, so the app's error handlers answer it; "Connection:
                # close" makes the server drop the connection and the rest of the body that may still come.
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class ObservabilityMiddleware(_HttpMiddleware):
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # The template (/api/auth/sessions/{session_id}) keeps label cardinality bounded.
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], template, status, elapsed)
            log.info("request", method=scope["method"], path=scope["path"], route=template, status=status,
                     duration_ms=round(elapsed * 1000, 2))
