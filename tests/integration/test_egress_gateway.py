"""The egress gateway on loopback: CONNECT tunnels from a VM's own socket, the allow-list, the address
checks, the limits, accounting, a detached VM, and the routes through an upstream proxy."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polydev.egress.gateway import EgressGateway, Identity
from polydev.egress.limits import Limits
from polydev.egress.policy import Policy, Refused, address_refusal
from polydev.egress.resolve import Resolver
from polydev.egress.routes import DirectRoute, Route, route_for


class Routes:
    """Every user on the host's route unless given another; limits per user."""

    def __init__(self) -> None:
        self.by_user: dict[uuid.UUID | None, Route] = {}
        self.limits: dict[uuid.UUID | None, Limits] = {}

    async def route(self, user_id: uuid.UUID | None) -> tuple[Route, Limits]:
        return self.by_user.get(user_id, DirectRoute()), self.limits.get(user_id, Limits())


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def stand() -> AsyncIterator[tuple[EgressGateway, Routes, int, Path]]:
    server, port = await echo_server()
    routes = Routes()
    policy = Policy(allow={("claude_code", "run"): ("api.stand.test", "*.cdn.stand.test")}, ports=frozenset({port}))
    resolver = Resolver({"api.stand.test": ("127.0.0.1",), "x.cdn.stand.test": ("127.0.0.1",)})
    tmp = Path(f"/tmp/egress-test-{uuid.uuid4().hex[:8]}")
    gw = EgressGateway(policy=policy, resolver=resolver, routes=routes, run_dir=tmp)
    yield gw, routes, port, tmp
    await gw.close()
    server.close()
    await server.wait_closed()
    shutil.rmtree(tmp, ignore_errors=True)


async def connect(sock: Path, target: str) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_unix_connection(str(sock))
    w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    return head, r, w


def run_vm(user: uuid.UUID | None = None) -> Identity:
    return Identity(uuid.uuid4(), user or uuid.uuid4(), "run", "claude_code")


async def test_an_allowed_host_is_tunnelled_and_accounted(stand) -> None:
    gw, _, port, _ = stand
    ident = run_vm()
    sock = await gw.attach(ident)
    head, r, w = await connect(sock, f"api.stand.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    w.write(b"hello through the gateway")
    assert await asyncio.wait_for(r.readexactly(25), 10) == b"hello through the gateway"
    w.close()
    await asyncio.sleep(0.1)
    rows = gw.usage.drain()
    assert [(u.user_id, u.host, u.connections, u.bytes_up, u.bytes_down) for u in rows] == [
        (ident.user_id, "api.stand.test", 1, 25, 25)]


async def test_a_host_off_the_allow_list_is_refused_with_the_reason(stand) -> None:
    gw, _, port, _ = stand
    ident = run_vm()
    sock = await gw.attach(ident)
    head, _, w = await connect(sock, f"evil.example:{port}")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"evil.example refused: not on the allow-list for claude_code runs" in head
    assert gw.last_refusal(ident.vm_id) == "evil.example refused: not on the allow-list for claude_code runs"
    assert gw.usage.drain()[0].refusals == 1
    w.close()


@pytest.mark.parametrize("target, why", [
    ("localhost", "loopback"),            # a name the host resolves to 127.0.0.1
    ("10.1.2.3", "private"),              # an address, never dialled
    ("169.254.169.254", "link-local"),    # the cloud's metadata service
    ("[::ffff:127.0.0.1]", "loopback"),   # IPv4-mapped IPv6
])
async def test_non_public_destinations_are_refused_whatever_the_allow_list(stand, target: str, why: str) -> None:
    gw, routes, port, _ = stand
    gw.policy = Policy(extra=("*",), ports=frozenset({port}))
    sock = await gw.attach(run_vm())
    head, _, w = await connect(sock, f"{target}:{port}")
    assert head.startswith(b"HTTP/1.1 403") and why.encode() in head, head
    w.close()


def test_address_refusal_passes_public_addresses_only() -> None:
    import ipaddress
    assert address_refusal(ipaddress.ip_address("93.184.216.34")) is None
    assert address_refusal(ipaddress.ip_address("2606:4700::1111")) is None
    assert "platform's own range" in address_refusal(ipaddress.ip_address("203.0.113.9"),
                                                     [ipaddress.ip_network("203.0.113.0/24")])
    for bad in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1",
                "fd00::1", "0.0.0.0", "224.0.0.1", "100.64.0.1"):
        assert address_refusal(ipaddress.ip_address(bad)) is not None, bad


async def test_limits_trip_for_their_user_only(stand) -> None:
    gw, routes, port, _ = stand
    a, b = run_vm(), run_vm()
    routes.limits[a.user_id] = Limits(concurrent=1)
    sock_a, sock_b = await gw.attach(a), await gw.attach(b)
    first, _, w1 = await connect(sock_a, f"api.stand.test:{port}")
    assert first.startswith(b"HTTP/1.1 200")
    second, _, w2 = await connect(sock_a, f"api.stand.test:{port}")
    assert second.startswith(b"HTTP/1.1 429") and b"1 concurrent connections" in second
    other, _, w3 = await connect(sock_b, f"api.stand.test:{port}")  # B is not slowed by A's limit
    assert other.startswith(b"HTTP/1.1 200")
    for w in (w1, w2, w3):
        w.close()


async def test_the_per_minute_limit(stand) -> None:
    gw, routes, port, _ = stand
    ident = run_vm()
    routes.limits[ident.user_id] = Limits(per_minute=2)
    sock = await gw.attach(ident)
    heads = []
    for _ in range(3):
        head, _, w = await connect(sock, f"api.stand.test:{port}")
        heads.append(head.split(b"\r\n", 1)[0])
        w.close()
    assert heads[:2] == [b"HTTP/1.1 200 Connection Established"] * 2
    assert heads[2] == b"HTTP/1.1 429 Too Many Requests"
    assert gw.last_refusal(ident.vm_id) == "limit: 2 new connections per minute reached"


async def test_the_bytes_per_day_limit(stand) -> None:
    gw, routes, port, _ = stand
    ident = run_vm()
    routes.limits[ident.user_id] = Limits(bytes_per_day=10)
    sock = await gw.attach(ident)
    head, r, w = await connect(sock, f"api.stand.test:{port}")
    w.write(b"0123456789ab")
    await r.readexactly(12)
    w.close()
    head2, _, w2 = await connect(sock, f"api.stand.test:{port}")
    assert head2.startswith(b"HTTP/1.1 429") and b"limit: 10 bytes per day reached" in head2
    w2.close()


async def test_a_detached_vm_reaches_nothing_and_its_tunnels_end(stand) -> None:
    gw, _, port, _ = stand
    ident = run_vm()
    sock = await gw.attach(ident)
    head, r, w = await connect(sock, f"api.stand.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    await gw.detach(ident.vm_id)
    assert await asyncio.wait_for(r.read(), 10) == b""  # the open tunnel was ended
    assert not sock.exists()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(sock))


async def test_bad_requests_are_answered_not_tunnelled(stand) -> None:
    gw, _, _, _ = stand
    sock = await gw.attach(run_vm())
    for request, status in ((b"GET http://x/ HTTP/1.1\r\n\r\n", b"405"), (b"CONNECT nope HTTP/1.1\r\n\r\n", b"400")):
        r, w = await asyncio.open_unix_connection(str(sock))
        w.write(request)
        assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).split()[1] == status
        w.close()


def test_route_for_modes_and_bad_urls_say_nothing_secret() -> None:
    assert route_for("direct").describe() == "direct"
    assert route_for("address", address="2001:db8::7").describe() == "address 2001:db8::7"
    proxy = route_for("proxy", proxy_url="socks5://user:s3cret@proxy.test:1080")
    assert proxy.describe() == "proxy socks5://proxy.test:1080" and "s3cret" not in repr(proxy.describe())
    with pytest.raises(ValueError) as err:
        route_for("proxy", proxy_url="ftp://user:s3cret@proxy.test")
    assert "s3cret" not in str(err.value)


async def test_an_unreachable_upstream_proxy_fails_without_falling_back(stand) -> None:
    gw, routes, port, _ = stand
    ident = run_vm()
    routes.by_user[ident.user_id] = route_for("proxy", proxy_url="http://u:pw@127.0.0.1:1")
    sock = await gw.attach(ident)
    head, _, w = await connect(sock, f"api.stand.test:{port}")
    assert head.startswith(b"HTTP/1.1 502") and b"upstream proxy http://127.0.0.1:1 unreachable" in head
    assert b"pw" not in head
    w.close()


async def test_a_proxy_user_reaches_a_name_the_host_cannot_resolve(stand, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's proxy resolves names on its side: a DNS failure on the host is no refusal for a proxy route
    (the proxy here is down, so the tunnel fails there, not at DNS)."""
    gw, routes, port, _ = stand

    async def no_dns(host: str) -> list:
        raise Refused(f"DNS lookup for {host} failed on the host: no such name", kind="dns")

    monkeypatch.setattr(gw.resolver, "_lookup", no_dns)  # no query leaves this machine
    ident = run_vm()
    routes.by_user[ident.user_id] = route_for("proxy", proxy_url="http://127.0.0.1:1")
    gw.policy = Policy(extra=("*.invalid",), ports=frozenset({port}))
    sock = await gw.attach(ident)
    head, _, w = await connect(sock, f"nowhere.invalid:{port}")
    assert head.startswith(b"HTTP/1.1 502") and b"upstream proxy http://127.0.0.1:1 unreachable" in head, head
    w.close()



async def test_pinned_resolution_answers_only_the_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """EGRESS_RESOLVE=pinned: the pinned names and their addresses, nothing else, and no DNS query asked."""
    import ipaddress

    resolver = Resolver({"api.stand.test": ("203.0.113.10",)}, only_pinned=True)

    async def asked(host: str) -> list:
        raise AssertionError(f"a DNS query for {host} was made")

    monkeypatch.setattr(resolver, "_lookup", asked)
    assert await resolver.resolve("API.stand.test.") == [ipaddress.ip_address("203.0.113.10")]
    assert await resolver.resolve("203.0.113.10") == [ipaddress.ip_address("203.0.113.10")]
    for host, said in (("example.com", "DNS lookup for example.com refused: EGRESS_RESOLVE=pinned"),
                       ("93.184.216.34", "93.184.216.34 refused: EGRESS_RESOLVE=pinned")):
        with pytest.raises(Refused) as caught:
            await resolver.resolve(host)
        assert str(caught.value).startswith(said) and caught.value.kind == "dns"


async def test_socket_files_a_dead_server_left_are_removed_at_start_up_and_live_ones_kept(stand) -> None:
    """A server killed with VMs attached leaves their socket files (found by tests/reliability/test_kill9.py);
    the next start of that data directory's gateway removes them, and never one it serves."""
    gw, _, _, run_dir = stand
    served = run_vm()
    path = await gw.attach(served)
    stale = run_dir / f"{uuid.uuid4()}.sock"
    stale.touch()
    assert gw.remove_stale_sockets() == 1
    assert not stale.exists() and path is not None and path.exists()
