"""A sandbox's ports (`sandbox.get_host(port)` → `{port}-{id}.{domain}`): HTTP requests for that host name go to
127.0.0.1:port inside that sandbox's VM, through the agent's `GET /tcp` tunnel, only while the sandbox runs.

Each request gets its own tunnel and is spoken as HTTP/1.1 with `Connection: close` by h11 (the request body
is read whole first, up to MAX_BODY, and sent with its length). A closed port answers 502 "… port is not
open" and a missing sandbox 502 "… was not found", the messages E2B's proxy gives (the SDK matches them).
WebSockets go to ports_ws.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import h11
from starlette.types import Receive, Scope, Send

from polydev.api.e2b.ports_ws import serve_websocket
from polydev.core.sandboxes import SandboxNotFound
from polydev.protocol import AGENT_PORT
from polydev.services import Services
from polydev.vm.agent_client import AgentError

MAX_BODY = 64 * 1024 * 1024
READ = 64 * 1024
# Hop-by-hop headers (RFC 9110 §7.6.1) and the framing headers h11 sets itself.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"content-length"}


async def _answer(send: Send, status: int, body: dict[str, object]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _body(receive: Receive) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            return None
        if not message.get("more_body"):
            return bytes(body)


async def serve_port(services: Callable[[], Services], sandbox_id: str, port: int, scope: Scope, receive: Receive,
                     send: Send) -> None:
    if scope["type"] == "websocket":
        await serve_websocket(services, sandbox_id, port, scope, receive, send)
        return
    svc = services()
    try:
        sandbox = await svc.sandboxes.running(sandbox_id)
    except SandboxNotFound as exc:
        await _answer(send, 502, {"code": 502, "message": str(exc), "sandboxId": sandbox_id})
        return
    if port == AGENT_PORT:  # the guest agent's own port: never handed to whoever knows the sandbox's id
        await _answer(send, 403, {"code": 403, "message": f"port {AGENT_PORT} is Polydev's guest agent's, not the "
                                                          "sandbox's", "sandboxId": sandbox_id, "port": port})
        return
    body = await _body(receive)
    if body is None:
        await _answer(send, 413, {"code": 413, "message": f"request bodies are limited to {MAX_BODY} bytes"})
        return

    def open_tunnel() -> socket.socket:
        with svc.sandboxes.agent(sandbox) as agent:
            return agent.tunnel(port)
    try:
        sock = await asyncio.to_thread(open_tunnel)
    except (AgentError, OSError, SandboxNotFound) as exc:
        closed = isinstance(exc, AgentError) and exc.status == 503
        message = "The sandbox is running but port is not open" if closed else f"cannot reach the sandbox: {exc}"
        await _answer(send, 502, {"code": 502, "message": message, "sandboxId": sandbox_id, "port": port})
        return
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await _relay(scope, body, reader, writer, send)
    finally:
        writer.close()


async def _relay(scope: Scope, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 send: Send) -> None:
    conn = h11.Connection(h11.CLIENT)
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
    headers += [(b"connection", b"close"), (b"content-length", str(len(body)).encode())]
    writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=headers)))
    writer.write(conn.send(h11.Data(data=body)) if body else b"")
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    started = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(READ)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE and not started:
                await _answer(send, 502, {"code": 502, "message": "the sandbox's server closed the connection"})
                return
            continue
        if isinstance(event, h11.Response):
            started = True
            out = [(k, v) for k, v in event.headers if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": event.status_code, "headers": out})
        elif isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            if started:
                await send({"type": "http.response.body", "body": b""})
            return
