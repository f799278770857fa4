"""The HTTP CONNECT exchange on the guest's side: read the request head, answer 200 or a refusal.

The CLIs and Chromium speak to an HTTPS proxy this way (HTTPS_PROXY, --proxy-server): one request line
`CONNECT host:port HTTP/1.1`, headers, a blank line; after a 200 the connection is the tunnel. A refusal is
an HTTP answer whose status line, `X-Polydev-Egress` header and body carry the reason, which is what the
CLI prints ("403 … not on the allow-list …") when it reports the failure.
"""

from __future__ import annotations

import asyncio

MAX_HEAD = 8192
HEAD_TIMEOUT_S = 30.0


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_target(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); BadRequest otherwise."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(400, f"CONNECT target {target[:100]!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c in host for c in " /\\@") or len(host) > 253:
        raise BadRequest(400, f"CONNECT target {target[:100]!r} has no valid host")
    return host.lower(), int(port_text)


async def read_connect(reader: asyncio.StreamReader, timeout: float = HEAD_TIMEOUT_S) -> tuple[str, int]:
    """The (host, port) a client asks to CONNECT to; BadRequest for anything else."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too large") from None
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        raise BadRequest(400, "no complete request head") from None
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    if parts[0] != "CONNECT":
        raise BadRequest(405, f"only CONNECT is served here, not {parts[0][:16]}")
    return parse_target(parts[1])


def answer(status: int, reason: str = "") -> bytes:
    """An HTTP/1.1 answer: 200 opens the tunnel, anything else carries `reason` and closes."""
    phrases = {200: "Connection Established", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
               429: "Too Many Requests", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
               504: "Gateway Timeout"}
    if status == 200:
        return b"HTTP/1.1 200 Connection Established\r\n\r\n"
    text = reason.replace("\r", " ").replace("\n", " ")
    body = f"egress: {text}\n".encode()
    return (f"HTTP/1.1 {status} {phrases.get(status, 'Error')}\r\nX-Polydev-Egress: {text}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
