"""The hop to another server of the deployment: a user's request, HTTP or WebSocket, passed on as it came.

The peer authenticates the user itself (the request keeps its Authorization header and, for the VNC
WebSocket, its ticket); the hop adds the peer secret (`x-polydev-peer`, core/cluster.py), which tells the peer
the request has been routed already, so it handles it itself and never passes it on again. A peer that cannot
be reached is answered 502 `peer_unreachable` (a WebSocket: accepted, then closed 4502) naming the cause; the
peer's internal URL goes to the log, not to the user.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import structlog
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from polydev.api.errors import error_response
from polydev.core.cluster import PEER_HEADER
from polydev.core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

# Hop-by-hop headers, and those the hop sets itself.
_DROP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
         b"proxy-authorization", b"content-length", PEER_HEADER.encode(), b"sec-websocket-key",
         b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol",
         b"sec-websocket-accept"}
_DROP_BACK = {"connection", "keep-alive", "transfer-encoding", "upgrade", "trailer"}
# Connecting is quick on a working network; the answer may take as long as the call does (an exec: an hour).
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0)
CLOSE_PEER_UNREACHABLE = 4502
CONNECT_S = 5.0


def _headers(scope: Scope, peer_token: str) -> list[tuple[str, str]]:
    out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", []) if k not in _DROP]
    client = scope.get("client")
    if client:
        out.append(("x-forwarded-for", str(client[0])))
    out.append((PEER_HEADER, peer_token))
    return out


def _target(base: str, scope: Scope, websocket: bool = False) -> str:
    url = base.rstrip("/") + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    if websocket:
        url = "ws" + url[len("http"):]  # http → ws, https → wss
    return url


def _unreachable(what: str, exc: BaseException) -> str:
    return f"the server hosting this {what} could not be reached ({type(exc).__name__}); try again shortly"


async def forward_http(scope: Scope, body: bytes, send: Send, base: str, peer_token: str, what: str) -> None:
    """Send the request (its body already read) to the peer at `base` and its answer back to the client."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        try:
            request = client.build_request(scope["method"], _target(base, scope), headers=_headers(scope, peer_token),
                                           content=body)
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            log.warning("peer_unreachable", url=base, path=scope["path"], error=type(exc).__name__)
            await error_response(502, "peer_unreachable", _unreachable(what, exc))(scope, _no_body, send)
            return
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _DROP_BACK]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


async def forward_websocket(scope: Scope, receive: Receive, send: Send, base: str, peer_token: str,
                            what: str) -> None:
    """Open the same WebSocket on the peer; accept the client's only once the peer has accepted (with the
    subprotocol the peer chose), refuse it as the peer refused, then pass messages and the close both ways."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    offered = list(scope.get("subprotocols") or [])
    try:
        upstream = await asyncio.wait_for(connect(
            _target(base, scope, websocket=True), additional_headers=_headers(scope, peer_token),
            subprotocols=offered or None, max_size=None, open_timeout=None, ping_interval=None,
            user_agent_header=None), CONNECT_S)  # type: ignore[arg-type]
    except InvalidStatus as exc:  # the peer refused the handshake (a bad ticket): refuse the same way
        log.info("peer_websocket_refused", path=scope["path"], status=exc.response.status_code)
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
        return
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        log.warning("peer_unreachable", url=base, path=scope["path"], error=type(exc).__name__)
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": CLOSE_PEER_UNREACHABLE,
                    "reason": "peer_unreachable: " + _unreachable(what, exc)[:80]})
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
    await _pump(upstream, receive, send)


async def _pump(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    async def to_peer() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code", 1000))
                return
            data: Any = message.get("bytes")
            await upstream.send(data if data is not None else message.get("text") or "")

    async def to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
                else:
                    await send({"type": "websocket.send", "text": data})
        except ConnectionClosed:
            pass
        # The host's close, as it sent it; 1005 (no code given) and 1006 (no close frame) may not be sent in a
        # close: they become 1000 and 1011.
        code, reason = upstream.close_code or 1006, upstream.close_reason or ""
        code = {1005: 1000, 1006: 1011}.get(code, code)
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code, "reason": reason})

    tasks = [asyncio.create_task(to_peer()), asyncio.create_task(to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
        await upstream.close()
