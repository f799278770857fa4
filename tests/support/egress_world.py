"""A small internet in network namespaces, for the egress gateway's tests: made by the test, removed after.

Three namespaces joined by veth pairs (none of it touches the machine's own interfaces or routes):

    <tag>-gw    the gateway host: the users' pool addresses routed to it (198.18.0.0/24, fd00:e9::/64 as
                `local` routes on lo, as an operator routes a block to a host), the gateway runs here
    <tag>-px    an upstream proxy's machine (tinyproxy, dante), between the gateway host and the internet
    <tag>-inet  the internet: the TLS stand-in (`whoami_tls`) on 203.0.113.10, 2001:db8:e9::10 and 10.20.30.40

Each namespace gets its own /etc/netns/<ns>/hosts and resolv.conf (bind-mounted by `ip netns exec`), so
names resolve from files the test writes and no DNS query leaves: the resolver points at the namespace's
own loopback, where nothing answers. Only documentation, benchmark and private ranges are used.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polydev.vm import handover
from tests.standins.tls import TestCA

ROOT = Path(__file__).resolve().parents[2]
STAND_V4, STAND_V6, STAND_PRIVATE = "203.0.113.10", "2001:db8:e9::10", "10.20.30.40"
POOL_V4, POOL_V6 = "198.18.0.0/24", "fd00:e9::/64"
GW_INET, PX_GW, PX_INET = "10.77.0.1", "10.78.0.2", "10.79.0.1"  # the gateway's, the proxy's addresses
PORT = 443


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def wait_listening(ns: str, host: str, port: int, proc: subprocess.Popen[Any], what: str) -> None:
    """Until `host:port` accepts a TCP connection made from namespace `ns` (or `proc` died)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read() if proc.stderr else ''}")
        sock = handover.socket_in_netns(ns)
        try:
            sock.settimeout(1)
            sock.connect((host, port))
            return
        except OSError:
            time.sleep(0.05)
        finally:
            sock.close()
    raise RuntimeError(f"{what} did not listen on {host}:{port}")


@dataclass
class World:
    tag: str
    tmp: Path
    ca: TestCA
    log: Path  # the stand-in's record: "<tag> <source address>" per request
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def gw(self) -> str:
        return f"{self.tag}-gw"

    @property
    def px(self) -> str:
        return f"{self.tag}-px"

    @property
    def inet(self) -> str:
        return f"{self.tag}-inet"

    def seen(self) -> dict[str, str]:
        """Request tag → the source address the stand-in saw for it."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return dict(line.split(" ", 1) for line in lines)

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(in_ns(ns, *args), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def gateway(self, config: dict[str, Any]) -> Gateway:
        """The gateway (tests.support.egress_stand) started in the gateway namespace with `config`."""
        path = self.tmp / f"gateway-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps({"run_dir": str(self.tmp / "run"), **config}))
        return Gateway(self.spawn(self.gw, sys.executable, "-m", "tests.support.egress_stand", str(path)))


class Gateway:
    """The gateway process: its VMs' socket paths, and its stdin commands (attach, detach, usage)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.sockets: dict[uuid.UUID, Path] = {}
        while (line := self._line()) != "ready":
            self._vm(line)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the gateway exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return line

    def _vm(self, line: str) -> Path:
        word, vm_id, path = line.split(" ", 2)
        assert word == "vm", line
        self.sockets[uuid.UUID(vm_id)] = Path(path)
        return Path(path)

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line()

    def attach(self, vm: dict[str, Any]) -> Path:
        return self._vm(self.command("attach " + json.dumps(vm)))

    def detach(self, vm_id: uuid.UUID) -> None:
        assert self.command(f"detach {vm_id}") == f"detached {vm_id}"

    def usage(self) -> list[dict[str, Any]]:
        return json.loads(self.command("usage"))


@dataclass
class Reply:
    status: int
    head: str
    peer: str | None = None  # what the stand-in answered: the source address it saw


def connect(sock_path: Path, target: str, headers: str = "") -> tuple[socket.socket, Reply]:
    """Open a CONNECT tunnel from a VM's gateway socket; the socket (tunnel open when status is 200)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(sock_path))
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:  # nothing follows a 200 until we speak TLS; a refusal's body may follow
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    text = head.decode("latin-1")
    return sock, Reply(int(text.split(" ", 2)[1]) if text.startswith("HTTP/1.") else 0, text)


def whoami(world: World, sock_path: Path, host: str, tag: str, headers: str = "") -> Reply:
    """Through the gateway to the stand-in over TLS (verified against the test CA): what address it saw."""
    sock, reply = connect(sock_path, f"{host}:{PORT}", headers)
    try:
        if reply.status != 200:
            return reply
        ctx = ssl.create_default_context(cafile=str(world.ca.cert_path))
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(f"GET /{tag} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        reply.peer = data.partition(b"\r\n\r\n")[2].decode()
        return reply
    finally:
        sock.close()


def require_root() -> None:
    """Skip (with the reason; fail under POLYDEV_REQUIRE_SERVERS=1) unless root: namespaces and veth pairs
    need it."""
    from tests.support import required

    required.root("egress namespace tests make network namespaces, veth pairs, /etc/netns")
    require_tool("ip")


def require_tool(name: str) -> str:
    """The path of a Debian tool the test drives (tinyproxy, danted); skips without it (fails under
    POLYDEV_REQUIRE_SERVERS=1: scripts/test.sh installs it)."""
    from tests.support import required

    found = find_tool(name)
    if found is None:
        required.unmet(f"{name} is not installed (scripts/test.sh installs it)")
    return found


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)


def tinyproxy(world: World, port: int, user: str, password: str) -> tuple[subprocess.Popen[str], Path]:
    """A real HTTP CONNECT proxy (Debian's tinyproxy) in the proxy namespace, Basic credentials required;
    (its process, its log, where each CONNECT it was asked for appears)."""
    exe = require_tool("tinyproxy")
    d = world.tmp / f"tinyproxy-{port}"
    d.mkdir(exist_ok=True)
    log = d / "tinyproxy.log"
    (d / "tinyproxy.conf").write_text(
        f'Port {port}\nListen {PX_GW}\nTimeout 30\nLogFile "{log}"\nLogLevel Connect\nPidFile "{d}/pid"\n'
        f"MaxClients 20\nBasicAuth {user} {password}\nConnectPort {PORT}\nAllow 10.78.0.0/30\n")
    proc = world.spawn(world.px, exe, "-d", "-c", str(d / "tinyproxy.conf"))
    wait_listening(world.px, PX_GW, port, proc, "tinyproxy")
    return proc, log


def danted(world: World, port: int) -> tuple[subprocess.Popen[str], Path]:
    """A real SOCKS5 proxy (Debian's dante-server) in the proxy namespace, without credentials (dante checks
    them against the system's accounts, which a test does not touch); (its process, its log)."""
    exe = require_tool("danted")
    d = world.tmp / f"danted-{port}"
    d.mkdir(exist_ok=True)
    log = d / "danted.log"
    rule = "    from: 10.78.0.0/30 to: 0.0.0.0/0\n    log: connect disconnect\n"
    (d / "danted.conf").write_text(
        f"logoutput: {log}\ninternal: {PX_GW} port = {port}\nexternal: {PX_INET}\nclientmethod: none\n"
        f"socksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n"
        f"client pass {{\n{rule}}}\nsocks pass {{\n{rule}    command: connect\n}}\n")
    proc = world.spawn(world.px, exe, "-f", str(d / "danted.conf"), "-N", "1")
    wait_listening(world.px, PX_GW, port, proc, "danted")
    return proc, log


def _netns_files(ns: str, hosts: dict[str, str]) -> None:
    d = Path("/etc/netns") / ns
    d.mkdir(parents=True, exist_ok=True)
    d.joinpath("hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in hosts.items()))
    # No DNS server: the namespace's own loopback, where nothing listens, so a lookup fails at once, locally.
    d.joinpath("resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    # Made in the first namespace and its peer moved straight into the second: never in the host's.
    ip("-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns)
    ip("-n", a_ns, "link", "set", a, "up")
    ip("-n", b_ns, "link", "set", b, "up")


def _build(w: World, gw_hosts: dict[str, str], px_hosts: dict[str, str]) -> None:
    t, gw, px, inet = w.tag, w.gw, w.px, w.inet
    for ns in (gw, px, inet):
        ip("-n", ns, "link", "set", "lo", "up")
        # No duplicate-address detection on the new links (theirs alone): IPv6 works at once, not ~1 s later.
        subprocess.run(in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"), check=True)
    _veth(gw, f"{t}a0", inet, f"{t}a1")
    _veth(gw, f"{t}b0", px, f"{t}b1")
    _veth(px, f"{t}c0", inet, f"{t}c1")
    for ns, dev, v4, v6 in ((gw, "a0", "10.77.0.1/30", "fd00:77::1/64"), (inet, "a1", "10.77.0.2/30", "fd00:77::2/64"),
                            (gw, "b0", "10.78.0.1/30", None), (px, "b1", "10.78.0.2/30", None),
                            (px, "c0", "10.79.0.1/30", None), (inet, "c1", "10.79.0.2/30", None)):
        ip("-n", ns, "addr", "add", v4, "dev", t + dev)
        if v6:
            ip("-n", ns, "-6", "addr", "add", v6, "dev", t + dev, "nodad")
    for addr in (f"{STAND_V4}/32", f"{STAND_PRIVATE}/32", f"{STAND_V6}/128"):
        ip("-n", inet, "addr", "add", addr, "dev", "lo")
    # The pool routed to the gateway host, as an operator routes a block to a host: every address in it is local.
    ip("-n", gw, "route", "add", "local", POOL_V4, "dev", "lo")
    ip("-n", gw, "-6", "route", "add", "local", POOL_V6, "dev", "lo")
    ip("-n", gw, "route", "add", "203.0.113.0/24", "via", "10.77.0.2")
    ip("-n", gw, "route", "add", f"{STAND_PRIVATE}/32", "via", "10.77.0.2")
    ip("-n", gw, "-6", "route", "add", "2001:db8:e9::/64", "via", "fd00:77::2")
    ip("-n", inet, "route", "add", POOL_V4, "via", "10.77.0.1")
    ip("-n", inet, "-6", "route", "add", POOL_V6, "via", "fd00:77::1")
    ip("-n", px, "route", "add", "203.0.113.0/24", "via", "10.79.0.2")
    _netns_files(gw, gw_hosts)
    _netns_files(px, px_hosts)
    _netns_files(inet, {})
    cert, key = w.ca.leaf("*.stand.test")
    proc = w.spawn(inet, sys.executable, "-m", "tests.support.whoami_tls", str(cert), str(key), str(w.log), str(PORT))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the TLS stand-in did not start: {proc.stderr.read() if proc.stderr else ''}")


@contextlib.contextmanager
def egress_world(tmp: Path, gw_hosts: dict[str, str], px_hosts: dict[str, str]) -> Iterator[World]:
    """The three namespaces with the stand-in running; `gw_hosts`/`px_hosts` the hosts files' names (name →
    address) in the gateway's and the proxy's namespace. Everything is removed afterwards, whatever happened."""
    w = World("eg" + secrets.token_hex(3), tmp, TestCA(tmp / "ca"), tmp / "whoami.log")
    made: list[str] = []
    try:
        for ns in (w.gw, w.px, w.inet):
            ip("netns", "add", ns)
            made.append(ns)
        _build(w, gw_hosts, px_hosts)
        yield w
    finally:
        for proc in w.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for ns in made:  # deleting a namespace removes its veth ends, addresses and routes with it
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only when no other namespace has files there
