"""A far end for egress tests: a listener on a loopback address of its own that answers `echo: <what it got>`."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.required import unmet
from tests.support.servers import serve_connections


@contextmanager
def echo_stand_in(address: tuple[str, int]) -> Iterator[None]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(address)
    except PermissionError:
        unmet(f"binding port {address[1]} on loopback needs root")
    server.listen(8)

    def echo(conn: socket.socket) -> None:
        data = conn.recv(100)
        conn.sendall(b"echo: " + data)

    serve_connections(server, echo)
    try:
        yield
    finally:
        server.close()
