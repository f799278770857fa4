"""The hop to another server (api/peer_proxy.py), over real sockets: a WebSocket server on loopback stands in
for the host, the hop is served by uvicorn (tests/support/live_asgi.py). The client's WebSocket is accepted
with the subprotocol the host chose, bytes pass both ways, the host's close code reaches the client, the
host's refusal is the client's refusal, and a host that cannot be reached is a clear error naming the cause
(never its internal address)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from polydev.api.peer_proxy import (
    CLOSE_PEER_UNREACHABLE,
    _headers,
    forward_http,
    forward_websocket,
)
from tests.support.live_asgi import serving
from tests.support.servers import free_port

TOKEN = "peer-secret"


async def host_vnc(ws: ServerConnection) -> None:
    """The host's side: greets like an RFB server, echoes one message, closes as a session that ended."""
    await ws.send(b"RFB 003.008\n")
    data = await ws.recv()
    await ws.send(b"echo:" + (data if isinstance(data, bytes) else data.encode()))
    await ws.close(4410, "session_expired")


@pytest.fixture
async def host() -> AsyncIterator[tuple[str, list[tuple[str, str | None]]]]:
    """The host's URL, and (path with query, peer header) of each handshake it got."""
    seen: list[tuple[str, str | None]] = []

    def refuse_forged(ws: ServerConnection, request: Request) -> Response | None:
        seen.append((request.path, request.headers.get("x-polydev-peer")))
        return ws.respond(403, "bad ticket\n") if "ticket=forged" in request.path else None

    port = free_port()
    async with serve(host_vnc, "127.0.0.1", port, subprotocols=["binary"],  # type: ignore[list-item]
                     process_request=refuse_forged):
        yield f"http://127.0.0.1:{port}", seen


def hop_to(base: str):  # type: ignore[no-untyped-def]
    """A server whose every request goes to `base`: WebSockets as a VNC view, HTTP as a VM call."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await forward_websocket(scope, receive, send, base, TOKEN, "login session")
        elif scope["type"] == "http":
            await forward_http(scope, b"{}", send, base, TOKEN, "VM")

    return app


async def test_a_websocket_reaches_the_host_and_passes_bytes_and_the_close_both_ways(host) -> None:  # type: ignore[no-untyped-def]
    base, seen = host
    async with serving(hop_to(base)) as hop, \
            connect(f"ws://{hop}/api/auth/sessions/s1/vnc?ticket=good", subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send(b"hello")
        assert await ws.recv() == b"echo:hello"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4410, "session_expired")
    assert seen == [("/api/auth/sessions/s1/vnc?ticket=good", TOKEN)], "path, ticket and the peer secret went on"


async def test_the_hosts_refusal_is_the_clients(host) -> None:  # type: ignore[no-untyped-def]
    base, _ = host
    async with serving(hop_to(base)) as hop:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{hop}/api/auth/sessions/s1/vnc?ticket=forged"):
                pass
    assert refused.value.response.status_code == 403


async def test_a_host_that_cannot_be_reached_is_named_as_the_cause_without_its_address() -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with serving(hop_to(gone)) as hop:
        async with connect(f"ws://{hop}/api/auth/sessions/s1/vnc?ticket=good") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_PEER_UNREACHABLE
        assert closed.value.rcvd.reason.startswith("peer_unreachable")
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://{hop}/api/vms/v1/exec", json={})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "peer_unreachable" and "ConnectError" in error["message"]
    assert gone.split("//")[1] not in error["message"]


def test_the_hop_carries_the_users_headers_plus_the_peer_secret() -> None:
    scope = {"headers": [(b"host", b"lb.example"), (b"authorization", b"Bearer pd_x"),
                         (b"x-polydev-peer", b"forged"), (b"content-length", b"2")], "client": ("10.1.2.3", 5)}
    headers = Headers(_headers(scope, TOKEN))
    assert headers["authorization"] == "Bearer pd_x" and headers["x-forwarded-for"] == "10.1.2.3"
    assert headers.get_all("x-polydev-peer") == [TOKEN], "a client's own peer header never goes on"
    assert "host" not in headers and "content-length" not in headers
