"""A TCP proxy in front of a live server that drops the first connection in the middle of a server-sent event
stream: after the start of the Nth event's `data:` line, so the client has half an event when the connection
dies. Later connections pass through whole. It records each connection's request head, so a test can see
what the client asked for when it came back (its Last-Event-ID)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.servers import free_port, serve_connections


@dataclass
class CuttingProxy:
    url: str
    requests: list[bytes] = field(default_factory=list)  # each connection's request head, in order
    cuts: int = 0

    def header(self, index: int, name: str) -> str | None:
        """A header of the index-th connection's request, or None."""
        for line in self.requests[index].decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _head(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _cut_stream(upstream: socket.socket, client: socket.socket, event: int) -> None:
    """Forward until `event` bytes into the event-th `data:` line, then close both ends."""
    sent = 0
    seen = b""
    while chunk := upstream.recv(65536):
        seen += chunk
        at = -1
        for _ in range(event):
            at = seen.find(b"\ndata: ", at + 1)
            if at < 0:
                break
        if at >= 0:
            client.sendall(seen[sent:at + len(b"\ndata: ") + 4])  # four bytes of the event's JSON, no more
            break
        client.sendall(seen[sent:])
        sent = len(seen)
    for sock in (upstream, client):
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@contextmanager
def cutting_proxy(host: str, port: int, cut_at_event: int) -> Iterator[CuttingProxy]:
    listener = socket.create_server(("127.0.0.1", free_port()))
    proxy = CuttingProxy(f"http://127.0.0.1:{listener.getsockname()[1]}")

    def handle(client: socket.socket) -> None:
        # Connections are handled one after another: a client comes back only once the first is cut.
        upstream = socket.create_connection((host, port))
        head = _head(client)
        proxy.requests.append(head)
        upstream.sendall(head)
        if len(proxy.requests) == 1:
            _cut_stream(upstream, client, cut_at_event)
            proxy.cuts += 1
            return
        threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
        _pipe(upstream, client)

    serve_connections(listener, handle)
    try:
        yield proxy
    finally:
        listener.close()
