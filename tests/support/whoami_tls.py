"""A TLS server that tells each client the source address it saw: the "internet" end of the egress
namespace tests, where what matters is which address (a user's own, a proxy's, the gateway's) a tunnel
left from.

`python -m tests.support.whoami_tls CERT KEY LOG [PORT]` (inside the namespace playing the internet) listens
on every address of its namespace, IPv4 and IPv6. A request `GET /<tag>` is answered with the peer's address
as the body, and `<tag> <peer address>` is appended to LOG, so a test can also prove a tag never arrived.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: Path) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
        writer.close()
        return
    peer = writer.get_extra_info("peername")[0]
    peer = peer.removeprefix("::ffff:")
    path = head.split(b" ", 2)[1].decode("latin-1")
    tag = path.lstrip("/")
    with log.open("a") as f:
        f.write(f"{tag} {peer}\n")
    body = peer.encode()
    try:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    writer.close()


async def serve(cert: str, key: str, log: Path, port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(lambda r, w: handle(r, w, log), host=None, port=port, ssl=ctx,
                                        reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 443))
