"""Test hosts in network namespaces the tests create: listeners and connection probes.

Everything here runs inside namespaces made by the tests themselves; no packet reaches a real interface.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from polydev.vm import handover
from tests.support import required

_LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("hello " + peer[0] + "\n").encode()); c.close()
"""

_PROBE = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode().strip()); c.close()
except OSError as e:
    print("fail", type(e).__name__); sys.exit(1)
"""


def require_root_netns() -> None:
    required.root("network slot tests make network namespaces, veth pairs, TAP devices, nftables rules")
    if not Path("/usr/sbin/nft").exists() and not Path("/sbin/nft").exists():
        required.unmet("nft is not installed (scripts/test.sh installs nftables)")


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


class Listener:
    def __init__(self, ns: str, ip: str, port: int) -> None:
        self.proc = subprocess.Popen(in_ns(ns, sys.executable, "-c", _LISTENER, ip, str(port)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"listener {ns} {ip}:{port} failed: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def connect(ns: str, ip: str, port: int, timeout: float = 1.0) -> str | None:
    """Open a TCP connection from namespace `ns`; the greeting (which names our source address) or None."""
    result = subprocess.run(in_ns(ns, sys.executable, "-c", _PROBE, ip, str(port), str(timeout)),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip() if result.returncode == 0 else None


HOST_SERVICE_IP = "10.255.255.1"  # an address that exists only in a test's host namespace
POOL = ("192.168.100.2", "192.168.100.254")


@contextlib.contextmanager
def host_namespace() -> Iterator[str]:
    """A namespace that plays the host for slot tests; removed with everything in it afterwards.
    Yields the slot-name prefix; the namespace is `<prefix>-host`. (`ip` rather than pyroute2, so it works
    from async tests too: pyroute2's sync API runs an event loop of its own.)"""
    name = "t" + secrets.token_hex(2)
    host = f"{name}-host"
    subprocess.run(["ip", "netns", "add", host], check=True)
    try:
        subprocess.run(["ip", "-n", host, "link", "set", "lo", "up"], check=True)
        # An address only this namespace has (on lo: this kernel has no dummy links).
        subprocess.run(["ip", "-n", host, "addr", "add", f"{HOST_SERVICE_IP}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", host], check=False)


def agent_health(url: str, token: str, netns: str) -> dict[str, object]:
    """GET /health from the namespace that plays the host (the agent is reachable only through its slot)."""
    host, port = url.removeprefix("http://").split(":")
    with handover.socket_in_netns(netns) as sock:
        sock.settimeout(10)
        sock.connect((host, int(port)))
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head[:200]
    return json.loads(body)
