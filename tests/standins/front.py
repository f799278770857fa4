"""The providers' hosts as the egress gateway dials them: TLS on port 443 of a loopback address of its own,
with a certificate for whatever name the client asks for (SNI), signed by the test CA, and the plain HTTP
piped to one upstream — :func:`front_app`, which sends the model APIs' paths to the API stand-in and
everything else (token, profile and account endpoints, sign-in pages) to the OAuth stand-in.

Guests reach it only through the gateway: the server under test pins every provider host to FRONT_ADDRESS
with EGRESS_HOSTS (a pinned name is trusted, the one way a loopback address gets past the gateway's refusal of
non-public destinations). So the CLIs keep their real host names, their proxy setting is the gateway's, and
nothing on the path is a proxy the tests made.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.types import Receive, Scope, Send

from tests.standins.proxy import ConnectProxy

FRONT_ADDRESS = "127.0.0.58"  # a loopback address of its own: the gateway dials port 443
FRONT_PORT = 443
# The model APIs' paths (tests/standins/api.py); the OAuth stand-in serves none of them.
API_PATHS = ("/v1/messages", "/v1/responses", "/v1/models", "/v1beta/models/", "/v1internal:")


def front_app(api_app: Any, oauth_app: Any) -> Any:
    """One ASGI app for every provider host: the API stand-in for the model calls, the OAuth one for the rest
    (it tells the hosts apart by the Host header)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        target = api_app if str(scope.get("path", "")).startswith(API_PATHS) else oauth_app
        await target(scope, receive, send)

    return app


class TlsFront(ConnectProxy):
    """Terminates TLS for any host name and pipes the bytes to ``upstream``; ``log`` records each name asked
    for (as ``name:443``), in order — what reached "the internet" through the gateway."""

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.ca.leaf("front.stand.invalid"))  # for a client that names no host

        def by_name(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            if name:
                self.log.add(f"{name}:{FRONT_PORT}")
                sslobj.context = self.ca.server_context(name)

        ctx.sni_callback = by_name  # type: ignore[assignment]
        return ctx

    async def start(self, host: str = FRONT_ADDRESS, port: int = FRONT_PORT) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self._context(),
                                                  ssl_handshake_timeout=30, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._to_upstream(reader, writer)  # (the TLS handshake is done: the name is logged)
