"""A CONNECT proxy stand-in that terminates TLS with the test CA and hands the plain HTTP to one upstream.

The CLI sends ``CONNECT host:443``; the proxy answers 200, does the TLS handshake itself with a certificate
for ``host`` signed by :class:`~tests.standins.tls.TestCA`, and pipes the decrypted bytes to ``upstream``
(the OAuth stand-in, which tells hosts apart by the ``Host`` header). Plain ``http://`` proxy requests are
piped the same way. Nothing is ever forwarded anywhere but ``upstream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

from tests.standins.tls import TestCA


@dataclass
class ProxyLog:
    #: every CONNECT target (host:port) or absolute URL asked for, in order
    connects: list[str] = field(default_factory=list)
    #: why a connection ended badly (TLS handshake refused by the client, upstream gone, ...)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def add(self, target: str) -> None:
        with self.lock:
            self.connects.append(target)

    def hosts(self) -> list[str]:
        with self.lock:
            return [c.rsplit(":", 1)[0] for c in self.connects]


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):  # peer went away
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                # TLS has no half-close: the client learns of the end (e.g. the upstream closing an idle
                # keep-alive connection) only from the close, and must not send its next request into it.
                writer.close()


class ConnectProxy:
    def __init__(self, ca: TestCA, upstream_host: str, upstream_port: int) -> None:
        self.ca = ca
        self.upstream = (upstream_host, upstream_port)
        self.log = ProxyLog()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # closing: end quietly (a cancelled handler task makes asyncio's stream callback log a traceback)
            self.log.error("cancelled")
        except Exception as e:  # noqa: BLE001 - e.g. a client rejecting the certificate; kept for the test
            self.log.error(f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _ = request_line.split(" ", 2)
        self.log.add(target)
        if method.upper() == "CONNECT":
            host = target.rsplit(":", 1)[0].strip("[]")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await writer.start_tls(self.ca.server_context(host))
            await self._to_upstream(reader, writer)
        else:
            # absolute-form plain-HTTP proxy request: pass it on as it is (the app reads Host).
            await self._to_upstream(reader, writer, head)

    async def _to_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           first: bytes = b"") -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        if first:
            up_writer.write(first)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
