"""Any server answers for any VM: requests that need a VM hosted by another server go there, and new work goes
to the server with the most room (core/placement.py).

A login or run is driven, and a VM run, by the one server that created it (its engine holds the VM's agent
token and VNC password). Most requests need only the shared database and session store and are answered
where they arrive: reads, a login's pasted code and cancel, a run's cancel (core/relay.py), a run's events
(core/run_events.py). Those below need the live VM and are passed on to its host (api/peer_proxy.py):

    POST /api/auth/sessions/{id}/vnc-ticket, WebSocket /api/auth/sessions/{id}/vnc   the login's host
    POST /api/vms/{id}/exec, DELETE /api/vms/{id}                                     the VM's host
    POST/DELETE /sandboxes/{id}…, /v2/sandboxes/{id}/…, GET …/metrics, and every
    envd or port request (HTTP or WebSocket) for a sandbox (api/e2b/routing.py,
    through `forward_sandbox`, which names the sandbox and port by headers)           the sandbox VM's host
    POST/DELETE /api/workspaces/{id}…, GET …/archive, WebSocket …/terminal,
    POST /api/runs with a workspace_id or conversation_id (a turn)                    the workspace VM's host

and the requests that create a VM are placed: POST /api/auth/start, POST /api/runs, POST /api/vms,
POST /v2/sandboxes, POST /api/workspaces (and …/upload) go to the
live server with the most room for the VM, this one when it is as roomy as any (or when none has room: its
own admission then answers 503). A request that came from a peer (core/cluster.py's peer secret) is always
answered here, so a request hops at most once. A host that stopped or was taken for dead is not asked: the
rows of its work are ended (or about to be), and the local answer says so.

Every answer carries `X-Polydev-Server`: the id of the server that answered.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polydev.api.errors import error_response
from polydev.api.peer_proxy import forward_http, forward_websocket
from polydev.core.cluster import PEER_HEADER, SERVER_HEADER

if TYPE_CHECKING:
    from polydev.services import Services
    from polydev.store.models import Server

log = structlog.get_logger(__name__)

_ID = r"(?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
_LOGIN_VNC = re.compile(rf"^/api/auth/sessions/{_ID}/(vnc|vnc-ticket)$")
_VM_LIVE = re.compile(rf"^/api/vms/{_ID}(/exec)?$")
_SANDBOX = re.compile(r"^/(v2/)?sandboxes/(?P<id>[a-z0-9]{1,32})(/[a-z]+)?$")
_WORKSPACE = re.compile(rf"^/api/workspaces/{_ID}(?P<what>/(pause|archive|push|terminal|terminal-ticket))?$")
_PLACED = {"/api/auth/start": "login", "/api/runs": "run", "/api/vms": "vm", "/v2/sandboxes": "sandbox",
           "/api/workspaces": "workspace", "/api/workspaces/upload": "workspace"}


class PeerRouting:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        services: Services | None = getattr(scope["app"].state, "services", None)
        if services is None or not services.cluster.registered:  # one server alone (or not started)
            await self.app(scope, receive, send)
            return
        cluster = services.cluster
        send = _stamped(send, cluster.server_id)
        if cluster.is_peer(_header(scope, PEER_HEADER)):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope.get("method")
        if (m := _LOGIN_VNC.match(path)) is not None:
            host, what = await cluster.servers.host_of_login(uuid.UUID(m["id"])), "login session"
        elif (m := _VM_LIVE.match(path)) is not None and method in ("POST", "DELETE"):
            host, what = await cluster.servers.host_of_vm(uuid.UUID(m["id"])), "VM"
        elif (m := _SANDBOX.match(path)) is not None and (method in ("POST", "DELETE") or path.endswith("/metrics")):
            host, what = await cluster.servers.host_of_sandbox(m["id"]), "sandbox"
        elif (m := _WORKSPACE.match(path)) is not None and (method in ("POST", "DELETE") or m["what"] in (
                "/archive", "/terminal")):
            host, what = await cluster.servers.host_of_workspace(uuid.UUID(m["id"])), "workspace"
        elif method == "POST" and path in _PLACED:
            await self._place(services, _PLACED[path], scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return
        if host is None or not _elsewhere(host, cluster.server_id):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await forward_websocket(scope, receive, send, host.url, cluster.peer_token, what)
        elif (body := await _body(scope, receive, send)) is not None:
            await forward_http(scope, body, send, host.url, cluster.peer_token, what)

    async def _place(self, services: Services, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _body(scope, receive, send)
        if body is None:
            return
        if kind == "run" and (host := await _turn_host(services, body)) is not None:
            # A turn runs where its workspace's VM is, not where there is most room.
            if _elsewhere(host, services.cluster.server_id):
                await forward_http(scope, body, send, host.url, services.cluster.peer_token, "workspace")
            else:
                await self.app(scope, _replay(body, receive), send)
            return
        purpose = _purpose(services, kind, body)
        load = None if purpose is None else await services.cluster.place(*services.settings.vm_size(purpose))
        if load is None:
            await self.app(scope, _replay(body, receive), send)
            return
        log.info("placed_on_peer", kind=kind, server_id=str(load.server_id))
        await forward_http(scope, body, send, load.url, services.cluster.peer_token, kind)


async def forward_sandbox(services: Services | None, sandbox_id: str, scope: Scope, receive: Receive,
                          send: Send) -> Send | None:
    """Pass an envd or port request for a sandbox to the server hosting its VM (None: it was), or give back
    the `send` to answer it here with (one server alone, a hop from a peer, a sandbox hosted here or unknown),
    which names this server when there are several."""
    if services is None or not services.cluster.registered:
        return send
    cluster = services.cluster
    send = _stamped(send, cluster.server_id)
    if cluster.is_peer(_header(scope, PEER_HEADER)):
        return send
    host = await cluster.servers.host_of_sandbox(sandbox_id)
    if host is None or not _elsewhere(host, cluster.server_id):
        return send
    if scope["type"] == "websocket":  # to a port in the sandbox
        await forward_websocket(scope, receive, send, host.url, cluster.peer_token, "sandbox")
        return None
    body = await _body(scope, receive, send)
    if body is not None:
        await forward_http(scope, body, send, host.url, cluster.peer_token, "sandbox")
    return None


def _elsewhere(host: Server, me: uuid.UUID) -> bool:
    return host.id != me and host.stopped_at is None and host.reaped_at is None


def _purpose(services: Services, kind: str, body: bytes) -> str | None:
    """The size of VM the request would make; None for a body the local route should refuse (no hop for it)."""
    if kind == "login":
        return "browser" if services.login_browser() is not None else "cli"
    if kind in ("run", "sandbox", "workspace"):  # a sandbox's template `base` runs on a cli VM
        return "cli"
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    purpose = data.get("purpose", "cli") if isinstance(data, dict) else None
    return purpose if purpose in ("cli", "browser") else None


async def _turn_host(services: Services, body: bytes) -> Server | None:
    """For a run that is a turn on a workspace: the server hosting the workspace's VM (None: not a turn, or
    no host known, and the local route answers)."""
    try:
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            return None
        if data.get("conversation_id"):
            return await services.cluster.servers.host_of_conversation(uuid.UUID(str(data["conversation_id"])))
        if data.get("workspace_id"):
            return await services.cluster.servers.host_of_workspace(uuid.UUID(str(data["workspace_id"])))
    except ValueError:  # not JSON, or not an id: the route refuses it
        return None
    return None


def _header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope.get("headers", []):
        if k == key:
            return v.decode("latin-1")
    return None


async def _body(scope: Scope, receive: Receive, send: Send) -> bytes | None:
    """The whole request body; None when it was refused (too large, too slow: answered here, as the
    middleware outside this one would have had the route answer it)."""
    chunks: list[bytes] = []
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
    except HTTPException as exc:
        await error_response(exc.status_code, "payload_too_large" if exc.status_code == 413 else "request_timeout",
                             str(exc.detail), headers=exc.headers)(scope, receive, send)
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _stamped(send: Send, server_id: uuid.UUID) -> Send:
    """`send` that names this server on an HTTP answer that names none yet (a peer's answer names the peer)."""
    value = str(server_id).encode()

    async def stamped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(k.lower() == SERVER_HEADER.encode() for k, _ in headers):
                message = {**message, "headers": [*headers, (SERVER_HEADER.encode(), value)]}
        await send(message)

    return stamped
