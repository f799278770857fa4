"""A minimal HTTP/1.1 server for the guest agent: one thread per connection, one request per connection.

Why not http.server: it imports email, html, mimetypes and http.client (tens of modules), which costs most of a
second on an emulated CPU, and its request handler hides the socket we need to watch for a client that went
away. The agent needs little: a request line, headers, a Content-Length body, and either a fixed-length or a
chunked response. Keep-alive is not offered (`Connection: close`); the host opens a connection per call.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Callable

MAX_HEADER_BYTES = 64 * 1024
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
           422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable"}


class HTTPError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request:
    """One parsed request. The body is not read up front: handlers read JSON or stream it to a file."""

    def __init__(self, conn: socket.socket, rfile, method: str, target: str, headers: dict[str, str]) -> None:
        self.conn = conn
        self.rfile = rfile
        self.method = method
        self.headers = headers
        path, _, query = target.partition("?")
        self.path = _unquote(path)
        self.query: dict[str, str] = {}
        for part in query.split("&"):
            if part:
                key, _, value = part.partition("=")
                self.query[_unquote(key.replace("+", " "))] = _unquote(value.replace("+", " "))
        self.responded = False

    def content_length(self, limit: int) -> int:
        if "transfer-encoding" in self.headers:
            raise HTTPError(411, "send a Content-Length; chunked request bodies are not accepted")
        raw = self.headers.get("content-length")
        if raw is None:
            if self.method in ("POST", "PUT"):
                raise HTTPError(411, "Content-Length is required")
            return 0
        if not raw.isdigit():
            raise HTTPError(400, "bad Content-Length")
        length = int(raw)
        if length > limit:
            raise HTTPError(413, f"body larger than {limit} bytes")
        if self.headers.get("expect", "").lower() == "100-continue":  # curl asks before large uploads
            self.conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return length

    def read_body(self, limit: int = 16 * 1024 * 1024) -> bytes:
        length = self.content_length(limit)
        body = self.rfile.read(length)
        if len(body) != length:
            raise HTTPError(400, "body shorter than Content-Length")
        return body

    def start(self, status: int, headers: dict[str, str] | None = None, chunked: bool = False,
              length: int | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Connection: close"]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        self.conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.responded = True

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        self.start(status, {"Content-Type": content_type, **(headers or {})}, length=len(body))
        self.conn.sendall(body)

    def send_json(self, status: int, value: object) -> None:
        self.send(status, json.dumps(value).encode())

    def send_chunk(self, data: bytes) -> None:
        if data:
            self.conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.conn.sendall(b"0\r\n\r\n")


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw):
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _read_head(rfile) -> tuple[str, str, dict[str, str]] | None:
    line = rfile.readline(MAX_HEADER_BYTES)
    if not line:
        return None
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise HTTPError(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise HTTPError(400, "only HTTP/1.x is spoken here")
    headers: dict[str, str] = {}
    total = len(line)
    while True:
        line = rfile.readline(MAX_HEADER_BYTES)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise HTTPError(400, "headers too large")
        if line in (b"\r\n", b"\n", b""):
            break
        key, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HTTPError(400, "malformed header line")
        headers[key.strip().lower()] = value.strip()
    return method, target, headers


Handler = Callable[[Request], None]


def serve(sock: socket.socket, handle: Handler) -> None:
    """Accept forever; each connection gets a daemon thread so a long /exec never blocks a /health."""
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_connection, args=(conn, handle), daemon=True).start()


def _connection(conn: socket.socket, handle: Handler) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rfile = conn.makefile("rb")
    request = None
    try:
        head = _read_head(rfile)
        if head is None:
            return
        request = Request(conn, rfile, *head)
        handle(request)
    except HTTPError as exc:
        if request is None or not request.responded:
            _error(conn, exc.status, exc.reason)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away; whatever it asked for has been cleaned up by the handler
    except Exception as exc:  # a bug must answer 500 rather than silently drop the connection
        if request is None or not request.responded:
            _error(conn, 500, f"{type(exc).__name__}: {exc}")
    finally:
        try:
            rfile.close()
            conn.close()
        except OSError:
            pass


def _error(conn: socket.socket, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    try:
        conn.sendall(head.encode() + body)
    except OSError:
        pass


def client_gone(conn: socket.socket) -> bool:
    """After select() says the connection is readable: True when the peer closed it (we expect no more bytes)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
