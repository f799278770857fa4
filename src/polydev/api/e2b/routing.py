"""Which requests are envd's: those naming a sandbox by the `E2b-Sandbox-Id` header (the SDK sends it on every
envd call, so one `E2B_SANDBOX_URL` serves every sandbox) or by a host name `49983-{id}.{domain}` (wildcard
DNS). They go to the envd app before the API's routes are looked at: envd's `/health` and `/files` share
paths with Polydev's own. Other ports' host names (`{port}-{id}.{domain}`, from `get_host`) go to that port in
the sandbox (ports.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

PortServer = Callable[[str, int, Scope, Receive, Send], Awaitable[None]]
# Passes a request for a sandbox hosted by another server there (api/peers.py) and answers None; or answers
# the `send` to answer it here with.
Forwarder = Callable[[str, Scope, Receive, Send], Awaitable[Send | None]]

ENVD_PORT = 49983
SCOPE_KEY = "polydev.sandbox_id"
_HOST = re.compile(r"^(\d{1,5})-([a-z0-9]{1,32})\.(.+?)(:\d+)?$")
_ID = re.compile(r"^[a-z0-9]{1,32}$")


def sandbox_of(scope: Scope, domain: str | None) -> tuple[int, str] | None:
    """(port, sandbox id) when the request is for a sandbox, else None. Host names count only under `domain`
    (SANDBOX_DOMAIN), so no other name of this server is ever taken for a sandbox's."""
    headers = dict(scope.get("headers") or [])
    host = headers.get(b"host", b"").decode("latin-1").lower()
    match = _HOST.match(host) if domain else None
    if match and match.group(3) == domain.split(":")[0]:  # type: ignore[union-attr]
        return int(match.group(1)), match.group(2)
    named = headers.get(b"e2b-sandbox-id")
    if named is not None:
        sandbox_id = named.decode("latin-1")
        port = headers.get(b"e2b-sandbox-port", b"").decode("latin-1")
        # An id that is not one of ours still goes to envd, which answers "not found" in the SDK's shape.
        return (int(port) if port.isdigit() else ENVD_PORT), sandbox_id if _ID.match(sandbox_id) else "-"
    return None


def named(scope: Scope, sandbox_id: str, port: int) -> Scope:
    """The request with the sandbox and port also named by headers: a peer it is passed to routes it by them
    (the Host, `{port}-{id}.{domain}`, does not survive the hop)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k not in (b"e2b-sandbox-id", b"e2b-sandbox-port")]
    headers += [(b"e2b-sandbox-id", sandbox_id.encode()), (b"e2b-sandbox-port", str(port).encode())]
    return {**scope, "headers": headers}


class SandboxRouter:
    """ASGI middleware: sandbox requests to `envd` or to the sandbox's port (`ports`), the rest to the API."""

    def __init__(self, app: ASGIApp, envd: ASGIApp, ports: PortServer, domain: str | None,
                 forward: Forwarder | None = None) -> None:
        self.app = app
        self.forward = forward
        self.envd = envd
        self.ports = ports
        self.domain = domain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = sandbox_of(scope, self.domain) if scope["type"] in ("http", "websocket") else None
        if target is None or scope["type"] == "websocket" and target[0] == ENVD_PORT:
            await self.app(scope, receive, send)
            return
        port, sandbox_id = target
        if self.forward is not None and (send := await self.forward(sandbox_id, named(scope, sandbox_id, port),
                                                                    receive, send)) is None:
            return
        if scope["type"] == "websocket":  # to a port in the sandbox (envd speaks no WebSocket)
            await self.ports(sandbox_id, port, scope, receive, send)
            return
        if port == ENVD_PORT:
            await self.envd({**scope, SCOPE_KEY: sandbox_id}, receive, send)
            return
        await self.ports(sandbox_id, port, scope, receive, send)
