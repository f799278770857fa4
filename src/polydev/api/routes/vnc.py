"""The login browser over VNC: a ticket from an authenticated call, then a WebSocket bridged to the VM.

    POST /api/auth/sessions/{id}/vnc-ticket   (API token; the session's owner)
        → {"ticket", "expires_in", "url": "/api/auth/sessions/{id}/vnc?ticket=…"}
    GET  /api/auth/sessions/{id}/vnc?ticket=…  (WebSocket, subprotocol `binary` as noVNC asks)
        → RFB bytes both ways between the user's page and the VM's VNC server

The VM's VNC server wants a password that only this server holds (core/rfb.py): the bridge authenticates
to it first, then offers the user's viewer the None security type and, after that handshake, passes the
bytes through unchanged. So the ticket is the only way in, whoever else can reach the VM's VNC port.

The ticket is the WebSocket's only credential (browsers cannot put an API token on a WebSocket): random,
single use, bound to the user and the session, valid `VNC_TICKET_SECONDS` (≤ 60). A missing, expired,
reused or foreign ticket is refused before the handshake completes (close 1008, which the server turns
into HTTP 403): nothing is ever bridged for it. With a good ticket the socket is accepted and, when there
is nothing to show, closed at once with a code that says why:

    4410 session_expired   the session has expired or ended — show "Start a new session"
    4409 vnc_unavailable   the session is live but its VNC server is not up (yet), or did not take the
                           login's password
    4502 peer_unreachable  the server driving the login could not be reached (api/peers.py passes the ticket
                           request and the WebSocket of a login another server drives on to that server)
    1002 rfb_handshake_failed  the viewer did not complete the RFB security handshake (None, RFB 3.7/3.8)
    1000 session_ended     the session ended while the bridge was open (completed, cancelled, timeout, failed)
    1011 vnc_lost          the VM's VNC server closed the connection

Tickets travel in the query string. Our request log skips WebSockets, but uvicorn logs every handshake with
its query string ("WebSocket /…/vnc?ticket=…" [accepted] / 403) on `uvicorn.error`: `RedactTickets` rewrites
those lines. A ticket is useless once redeemed, but it must not sit in logs while it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid

import structlog
from fastapi import APIRouter, WebSocket
from pydantic import BaseModel
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect

from polydev.api.deps import CurrentUser, ServicesDep, read_live_login_session
from polydev.api.errors import ApiError
from polydev.core import rfb
from polydev.core.errors import SessionExpired, SessionNotFound, SessionNotLive
from polydev.core.tasks import cancel_and_wait
from polydev.services import Services
from polydev.store.models import AUTH_SESSION_TERMINAL

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/auth", tags=["auth"])
CHUNK = 64 * 1024
CLOSE_POLICY, CLOSE_ENDED, CLOSE_LOST, CLOSE_PROTOCOL = 1008, 1000, 1011, 1002
CLOSE_EXPIRED, CLOSE_UNAVAILABLE = 4410, 4409
HANDSHAKE_S = 30.0  # for either side's RFB security handshake: a few round trips, even to an emulated guest
_TICKET = re.compile(r"(ticket=)[^&\s\"']+")


class RedactTickets(logging.Filter):
    """Blank out `ticket=…` in log records (uvicorn's handshake lines carry the full query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _TICKET.sub(r"\1[redacted]", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_TICKET.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args)
        return True


logging.getLogger("uvicorn.error").addFilter(RedactTickets())


class TicketOut(BaseModel):
    ticket: str
    expires_in: int
    url: str


def vnc_path(session_id: uuid.UUID) -> str:
    return f"/api/auth/sessions/{session_id}/vnc"


@router.post("/sessions/{session_id}/vnc-ticket", response_model=TicketOut, responses={404: {}, 409: {}, 410: {}})
async def vnc_ticket(session_id: uuid.UUID, user: CurrentUser, services: ServicesDep,
                     response: Response) -> TicketOut:
    """A single-use ticket for the session's VNC WebSocket; ask for one right before connecting."""
    await read_live_login_session(services, user.id, session_id)  # 404 for others' sessions, 410 once ended
    try:
        await services.login_flow.vnc_target(user.id, session_id)
    except SessionNotLive as exc:
        raise ApiError(409, "vnc_unavailable", str(exc)) from None
    ticket = await services.vnc_tickets.issue(user.id, session_id)
    response.headers["Cache-Control"] = "no-store"
    return TicketOut(ticket=ticket.secret, expires_in=ticket.expires_in,
                     url=f"{vnc_path(session_id)}?ticket={ticket.secret}")


@router.websocket("/sessions/{session_id}/vnc")
async def vnc_socket(websocket: WebSocket, session_id: uuid.UUID, ticket: str = "") -> None:
    services: Services = websocket.app.state.services
    user_id = await services.vnc_tickets.redeem(ticket, session_id)
    if user_id is None:
        await websocket.close(CLOSE_POLICY, "invalid or used ticket")
        return
    subprotocol = "binary" if "binary" in websocket.scope.get("subprotocols", []) else None
    try:
        state = await services.login_sessions.read(user_id, session_id)
        expired = state["status"] in AUTH_SESSION_TERMINAL
    except (SessionExpired, SessionNotFound):
        expired = True
    if expired:
        await websocket.accept(subprotocol)
        await websocket.close(CLOSE_EXPIRED, "session_expired: start a new session")
        return
    try:
        target = await services.login_flow.vnc_target(user_id, session_id)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*target.address), 10)
    except (SessionNotLive, OSError, TimeoutError):
        await websocket.accept(subprotocol)
        await websocket.close(CLOSE_UNAVAILABLE, "vnc_unavailable")
        return
    try:  # into the VM first: the user's viewer is let in only to a VNC session we already hold
        await asyncio.wait_for(rfb.authenticate(reader.readexactly, _sender(writer), target.password), HANDSHAKE_S)
    except (rfb.RfbError, asyncio.IncompleteReadError, OSError, TimeoutError) as exc:
        log.warning("vnc_auth_failed", session_id=str(session_id), error=str(exc) or type(exc).__name__)
        await _close(writer)
        await websocket.accept(subprotocol)
        await websocket.close(CLOSE_UNAVAILABLE, "vnc_unavailable")
        return
    await websocket.accept(subprotocol)
    viewer = _Viewer(websocket)
    try:
        await asyncio.wait_for(rfb.serve_none(viewer.read, websocket.send_bytes), HANDSHAKE_S)
    except (rfb.RfbError, WebSocketDisconnect, RuntimeError, TimeoutError) as exc:
        log.info("vnc_bridge_refused", session_id=str(session_id), reason=str(exc) or type(exc).__name__)
        await _close(writer)
        if not isinstance(exc, WebSocketDisconnect):
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_PROTOCOL, "rfb_handshake_failed")
        return
    log.info("vnc_bridge_open", session_id=str(session_id))
    _, reason = await _bridge(websocket, reader, writer, target.ended, viewer.take())
    log.info("vnc_bridge_closed", session_id=str(session_id), reason=reason)


class _Viewer:
    """The viewer's side of the security handshake: exact byte counts out of WebSocket messages of any size."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.buffer = b""

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            self.buffer += message.get("bytes") or (message.get("text") or "").encode()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def take(self) -> bytes:
        """What the viewer sent past the handshake (its ClientInit, if it came in the same message)."""
        rest, self.buffer = self.buffer, b""
        return rest


def _sender(writer: asyncio.StreamWriter) -> rfb.Write:
    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return send


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _bridge(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  ended: asyncio.Event, first: bytes = b"") -> tuple[int, str]:
    """Copy bytes both ways until one side closes or the session ends; then close both. `first`: the
    viewer's bytes already read, which go to the VM before anything else."""

    async def to_vm() -> tuple[int, str]:
        if first:
            writer.write(first)
            await writer.drain()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return CLOSE_ENDED, "client_left"
            data = message.get("bytes") or (message.get("text") or "").encode()
            writer.write(data)
            await writer.drain()

    async def to_user() -> tuple[int, str]:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return CLOSE_LOST, "vnc_lost"
            await websocket.send_bytes(data)

    async def session_end() -> tuple[int, str]:
        await ended.wait()
        return CLOSE_ENDED, "session_ended"

    tasks = [asyncio.create_task(f()) for f in (to_vm, to_user, session_end)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        try:
            code, reason = first.result()
        except (WebSocketDisconnect, OSError, RuntimeError):
            code, reason = CLOSE_LOST, "connection_error"
    finally:
        await cancel_and_wait(tasks)
        await _close(writer)
    if reason != "client_left":
        with contextlib.suppress(Exception):
            await websocket.close(code, reason)
    return code, reason
