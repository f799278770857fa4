"""GET /tcp?port=N: the request's connection becomes a byte pipe to 127.0.0.1:N in the guest.

The host reaches a guest's ports through this (a sandbox's `get_host`), since the only way in under QEMU's
user networking is the agent's forwarded port. After the `200` head the agent relays raw bytes both ways until
either side closes; the client sends nothing before it has read that head, so no bytes wait in the request's
buffered reader.
"""

from __future__ import annotations

import socket
import threading

from polydev.guest.http import HTTPError, Request

CONNECT_TIMEOUT_S = 5.0
CHUNK = 64 * 1024


def open_tunnel(req: Request) -> None:
    raw = req.query.get("port", "")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise HTTPError(400, "port must be a number from 1 to 65535")
    try:
        target = socket.create_connection(("127.0.0.1", int(raw)), timeout=CONNECT_TIMEOUT_S)
    except OSError:
        raise HTTPError(503, f"port {raw} is not open") from None
    target.settimeout(None)
    with target:
        req.start(200, {"Content-Type": "application/octet-stream"})
        other = threading.Thread(target=_pump, args=(req.conn, target), daemon=True)
        other.start()
        _pump(target, req.conn)
        other.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)  # the far side sees the end; the other direction keeps going
    except OSError:
        pass
