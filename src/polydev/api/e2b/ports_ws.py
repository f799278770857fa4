"""WebSockets to a sandbox's port (`get_host(port)` → `wss://{port}-{id}.{domain}/…`): the client's WebSocket,
which uvicorn has already parsed into messages, is spoken on to the server in the sandbox by wsproto as a
client over the agent's `GET /tcp` tunnel to 127.0.0.1:port, and messages, pings and the close are relayed both
ways. As with HTTP (ports.py): only while the sandbox runs, never the agent's own port; a closed port or a
missing sandbox refuses the handshake (HTTP 403 from uvicorn, as a refused upgrade).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from starlette.types import Receive, Scope, Send
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from polydev.core.sandboxes import SandboxNotFound
from polydev.protocol import AGENT_PORT
from polydev.services import Services
from polydev.vm.agent_client import AgentError

READ = 64 * 1024
_PASSED = {b"cookie", b"authorization", b"origin", b"user-agent"}  # what the sandbox's server may look at


async def serve_websocket(services: Callable[[], Services], sandbox_id: str, port: int, scope: Scope,
                          receive: Receive, send: Send) -> None:
    svc = services()
    if await receive() != {"type": "websocket.connect"} or port == AGENT_PORT:
        await send({"type": "websocket.close", "code": 1008})
        return
    try:
        sandbox = await svc.sandboxes.running(sandbox_id)

        def open_tunnel() -> socket.socket:
            with svc.sandboxes.agent(sandbox) as agent:
                return agent.tunnel(port)
        sock = await asyncio.to_thread(open_tunnel)
    except (SandboxNotFound, AgentError, OSError):
        await send({"type": "websocket.close", "code": 1011})
        return
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        if not await _handshake(ws, scope, port, reader, writer, send):
            return
        await _relay(ws, reader, writer, receive, send)
    finally:
        writer.close()


async def _handshake(ws: WSConnection, scope: Scope, port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, send: Send) -> bool:
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    headers = [(k, v) for k, v in scope["headers"] if k.lower() in _PASSED]
    writer.write(ws.send(Request(host=f"127.0.0.1:{port}", target=target,
                                 subprotocols=list(scope.get("subprotocols") or []), extra_headers=headers)))
    await writer.drain()
    while True:
        data = await reader.read(READ)
        if not data:
            await send({"type": "websocket.close", "code": 1011})
            return False
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                await send({"type": "websocket.accept", "subprotocol": event.subprotocol})
                return True
            if isinstance(event, RejectConnection):
                await send({"type": "websocket.close", "code": 1011})
                return False


async def _relay(ws: WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, receive: Receive,
                 send: Send) -> None:
    async def from_client() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                writer.write(ws.send(CloseConnection(code=message.get("code", 1000))))
                await writer.drain()
                return
            if message.get("text") is not None:
                writer.write(ws.send(TextMessage(data=message["text"])))
            elif message.get("bytes") is not None:
                writer.write(ws.send(BytesMessage(data=message["bytes"])))
            await writer.drain()

    async def from_sandbox() -> None:
        parts: list[str | bytes] = []
        while data := await reader.read(READ):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        whole = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
                        parts = []
                        await send({"type": "websocket.send",
                                    **({"text": whole} if isinstance(whole, str) else {"bytes": whole})})
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                    await writer.drain()
                elif isinstance(event, CloseConnection):
                    writer.write(ws.send(event.response()))
                    await writer.drain()
                    await send({"type": "websocket.close", "code": event.code})
                    return
        await send({"type": "websocket.close", "code": 1011})  # the sandbox's server went away without a close

    tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_sandbox())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
