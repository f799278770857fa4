"""The gateway's relay on loopback, both ways of moving bytes (splice, and the stream copy kept for
transports that are not plain sockets): bytes sent behind the CONNECT or behind a proxy's answer are not
lost, half-closes pass both ways, large transfers arrive intact and are counted to the byte, a peer that
breaks off ends the tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polydev.egress import relay
from polydev.egress.gateway import EgressGateway, Identity
from polydev.egress.limits import Limits
from polydev.egress.policy import Policy
from polydev.egress.resolve import Resolver
from polydev.egress.routes import DirectRoute, Route, route_for

BIG = 8 * 1024 * 1024 + 123


class Source:
    """Every user on `current` (the host's route unless a test sets another)."""

    def __init__(self) -> None:
        self.current: Route = DirectRoute()

    async def route(self, user_id: uuid.UUID | None) -> tuple[Route, Limits]:
        return self.current, Limits()


async def upstream_server() -> tuple[asyncio.AbstractServer, int]:
    """Greets with "hi:", then per request line: `sum` reads to EOF and answers the sha256 and length
    (then closes), `big` sends BIG bytes and closes, `reset` aborts the connection."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi:")
        line = await r.readline()
        if line == b"sum\n":
            h, n = hashlib.sha256(), 0
            while data := await r.read(1 << 20):
                h.update(data)
                n += len(data)
            w.write(f"{h.hexdigest()} {n}\n".encode())
        elif line == b"big\n":
            w.write(os.urandom(BIG))
        elif line == b"reset\n":
            w.transport.abort()
            return
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture(params=["splice", "copy"])
async def stand(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[tuple[EgressGateway, Source, int, Path]]:
    if request.param == "copy":
        monkeypatch.setattr(relay, "_plain", lambda _writer: False)
    server, port = await upstream_server()
    source = Source()
    run_dir = Path(f"/tmp/egress-relay-{uuid.uuid4().hex[:8]}")  # short: a Unix socket path has 108 bytes
    gw = EgressGateway(policy=Policy(extra=("up.test",), ports=frozenset({port})),
                       resolver=Resolver({"up.test": ("127.0.0.1",)}), routes=source, run_dir=run_dir)
    ident = Identity(uuid.uuid4(), uuid.uuid4(), "run", "claude_code")
    sock = await gw.attach(ident)
    yield gw, source, port, sock
    await gw.close()
    server.close()
    await server.wait_closed()
    shutil.rmtree(run_dir, ignore_errors=True)


async def tunnel(sock: Path, port: int, behind: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_unix_connection(str(sock))
    w.write(f"CONNECT up.test:{port} HTTP/1.1\r\n\r\n".encode() + behind)  # the client does not wait for the 200
    assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    return r, w


async def test_bytes_behind_the_connect_and_a_half_close_pass_intact(stand) -> None:
    _, _, port, sock = stand
    payload = os.urandom(3 * 1024 * 1024 + 7)
    r, w = await tunnel(sock, port, behind=b"sum\n" + payload[:1000])
    assert await asyncio.wait_for(r.readexactly(3), 10) == b"hi:"
    w.write(payload[1000:])
    await w.drain()
    w.write_eof()  # our half-close reaches the server, which answers only then
    answer = await asyncio.wait_for(r.readline(), 20)
    assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    assert await asyncio.wait_for(r.read(), 10) == b""  # and its close reaches us
    w.close()


async def test_a_large_download_arrives_whole_and_is_counted_to_the_byte(stand) -> None:
    gw, _, port, sock = stand
    r, w = await tunnel(sock, port, behind=b"big\n")
    got = 0
    while data := await asyncio.wait_for(r.read(1 << 20), 20):
        got += len(data)
    w.close()
    assert got == 3 + BIG
    await asyncio.sleep(0.1)
    rows = gw.usage.drain()
    assert [(row.bytes_up, row.bytes_down) for row in rows] == [(4, 3 + BIG)]


async def test_an_upstream_that_breaks_off_ends_the_tunnel(stand) -> None:
    _, _, port, sock = stand
    r, w = await tunnel(sock, port, behind=b"reset\n")
    try:
        rest = await asyncio.wait_for(r.read(), 10)
    except ConnectionError:
        rest = b""
    assert rest in (b"", b"hi:")
    w.close()


async def test_bytes_a_proxy_sends_behind_its_answer_are_not_lost(stand) -> None:
    _, source, port, sock = stand

    async def proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"HTTP/1.1 200 OK\r\n\r\n" + await up_r.readexactly(3))  # the greeting, in the same write
        await w.drain()

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            while data := await a.read(65536):
                b.write(data)
                await b.drain()
            b.write_eof()

        await asyncio.gather(pipe(r, up_w), pipe(up_r, w))
        w.close()
        up_w.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    source.current = route_for("proxy", proxy_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        r, w = await tunnel(sock, port)
        assert await asyncio.wait_for(r.readexactly(3), 10) == b"hi:"
        w.write(b"sum\nabc")
        w.write_eof()
        assert await asyncio.wait_for(r.readline(), 10) == f"{hashlib.sha256(b'abc').hexdigest()} 3\n".encode()
        w.close()
    finally:
        server.close()
