"""What a process listens on, and what an outsider gets there: for the VM tests' "no unauthenticated way in".

`tcp_listeners(pid)` reads the kernel's socket tables (/proc/PID/net/tcp, tcp6) and keeps the listening
sockets whose inodes the process holds (/proc/PID/fd): no psutil or ss needed. `probe` opens one as a stranger
would and says what answered: an RFB server (the security types it offers, and whether None or a wrong VncAuth
password got in) or an HTTP server (the status of requests without, or with a wrong, bearer token).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.rfb_server import expected_response

RFB_VERSION = b"RFB 003.008\n"
LISTEN = "0A"


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints the address as 32-bit words in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(packed)), int(port, 16)


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket process `pid` holds, IPv4 and IPv6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.append(_address(fields[1]))
    return sorted(found)


@dataclass
class Probe:
    kind: str  # "rfb", "http" or "other"
    head: bytes = b""
    security_types: bytes = b""  # rfb: what the server offers
    none_result: bytes = b""  # rfb: its answer to choosing None anyway (b"" when it closed instead)
    wrong_password_result: bytes = b""  # rfb: its SecurityResult for a VncAuth answer with a wrong password
    http_status: dict[str, int] = field(default_factory=dict)  # http: request → status


async def _rfb_connection(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect and send an RFB client version at once: an RFB server reads it after its own banner; an HTTP
    server takes it for a malformed request line and answers. Returns the first 12 bytes (fewer at EOF)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    writer.write(RFB_VERSION)
    head = b""
    while len(head) < 12 and (chunk := await asyncio.wait_for(reader.read(12 - len(head)), 60)):
        head += chunk
    return reader, writer, head


async def _rfb_attempt(host: str, port: int, choice: int, password: bytes = b"") -> tuple[bytes, bytes]:
    """(the security types offered, the SecurityResult after choosing `choice` (and answering a VncAuth
    challenge as `password` would); b"" when the server closed instead)."""
    reader, writer, _ = await _rfb_connection(host, port)
    try:
        types = await asyncio.wait_for(reader.readexactly((await reader.readexactly(1))[0]), 60)
        writer.write(bytes([choice]))
        try:
            if choice == 2:
                writer.write(expected_response(password, await asyncio.wait_for(reader.readexactly(16), 60)))
            return types, await asyncio.wait_for(reader.readexactly(4), 60)
        except (asyncio.IncompleteReadError, ConnectionError):  # a server that does not offer it may just close
            return types, b""
    finally:
        writer.close()


async def probe(host: str, port: int, wrong_password: bytes) -> Probe:
    """What a stranger gets at (host, port); a wildcard address is tried on the loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    _, writer, head = await _rfb_connection(host, port)
    writer.close()
    if head == RFB_VERSION:
        types, none_result = await _rfb_attempt(host, port, 1)
        _, wrong = await _rfb_attempt(host, port, 2, wrong_password)
        return Probe("rfb", head, types, none_result, wrong)
    if head.startswith(b"HTTP/1."):
        statuses = {}
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            statuses["GET /health"] = (await client.get("/health")).status_code
            statuses["POST /exec"] = (await client.post("/exec", json={"argv": ["true"]})).status_code
            statuses["GET /health, wrong token"] = (await client.get(
                "/health", headers={"Authorization": "Bearer not-the-token"})).status_code
        return Probe("http", head, http_status=statuses)
    return Probe("other", head)


def failed(result: bytes) -> bool:
    """A SecurityResult that let nobody in: failed (non-zero), or the connection closed."""
    return result == b"" or struct.unpack(">I", result)[0] != 0
