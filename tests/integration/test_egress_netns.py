"""The egress gateway on a real network, all inside namespaces this module creates (tests/support/egress_world):
the gateway process runs in a namespace playing the gateway host, a TLS stand-in in one playing the internet
tells each client the source address it saw, real proxy servers (tinyproxy, dante) sit in a third.

What it proves: each user's tunnels leave through that user's own identity (their pool address, IPv4 or
IPv6, or their upstream proxy) and nobody else's; a user whose proxy is down fails with a reason and is not
sent the direct way; the allow-list and the address checks hold on real name resolution (a hosts file
pointing allowed names at 127.0.0.1, 10.x, 169.254.169.254, ::1, the pool); each limit trips for its user
only; a VM's socket carries its own identity whatever it says, and a detached VM's socket is gone.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.egress_world import (
    GW_INET,
    POOL_V4,
    POOL_V6,
    PX_GW,
    PX_INET,
    STAND_PRIVATE,
    STAND_V4,
    STAND_V6,
    Gateway,
    Reply,
    World,
    connect,
    danted,
    egress_world,
    find_tool,
    require_root,
    tinyproxy,
    whoami,
)
from tests.support.required import unmet

PROXY_USER, PROXY_PASSWORD = "polyuser", "s3cret-proxy-pw"
TINYPROXY_PORT, DOWN_PROXY_PORT, DANTE_PORT = 8888, 8889, 1080
ADDRESSES = {"A": "198.18.0.11", "B": "198.18.0.12", "A6": "fd00:e9::a", "B6": "fd00:e9::b"}
REBIND = {  # allowed names whose only address is one no tunnel may reach, from the gateway host's hosts file
    "lo.rebind.test": ("127.0.0.1", "loopback"),
    "ten.rebind.test": (STAND_PRIVATE, "private"),  # where the stand-in really listens: reachable if dialled
    "meta.rebind.test": ("169.254.169.254", "link-local"),
    "pool.rebind.test": (ADDRESSES["B"], "platform's own range"),
}
REBIND_V6 = {"v6lo.rebind.test": ("::1", "loopback"), "v6pool.rebind.test": (ADDRESSES["B6"], "platform's own range")}


def users() -> dict[str, dict[str, object]]:
    proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{PX_GW}"
    return {
        **{name: {"mode": "address", "address": addr} for name, addr in ADDRESSES.items()},
        "C": {"mode": "proxy", "proxy_url": f"{proxy}:{TINYPROXY_PORT}"},
        "Cbad": {"mode": "proxy", "proxy_url": f"http://{PROXY_USER}:not-the-pw@{PX_GW}:{TINYPROXY_PORT}"},
        "D": {"mode": "proxy", "proxy_url": f"{proxy}:{DOWN_PROXY_PORT}"},
        "S": {"mode": "proxy", "proxy_url": f"socks5://{PX_GW}:{DANTE_PORT}"},
        "Lconc": {"mode": "direct", "limits": {"concurrent": 1}},
        "Lmin": {"mode": "direct", "limits": {"per_minute": 2}},
        "Lbytes": {"mode": "direct", "limits": {"bytes_per_day": 1}},
    }


@dataclass
class Stand:
    world: World
    gateway: Gateway
    user_ids: dict[str, uuid.UUID]
    vms: dict[str, uuid.UUID]  # VM name ("A", "Lconc2", …) → its id
    proxy_log: Path | None
    socks_log: Path | None

    def sock(self, vm: str) -> Path:
        return self.gateway.sockets[self.vms[vm]]

    def ask(self, vm: str, host: str, headers: str = "") -> tuple[str, Reply]:
        """Through `vm`'s socket to the stand-in as `host`; (the request's tag, the reply)."""
        tag = f"{vm}-{uuid.uuid4().hex[:10]}"
        return tag, whoami(self.world, self.sock(vm), host, tag, headers)


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    require_root()
    tmp = tmp_path_factory.mktemp("egress-netns")
    gw_hosts = {name: addr for name, (addr, _) in {**REBIND, **REBIND_V6}.items()}
    names = ("a", "b", "c", "s", "d", "l", "other")
    px_hosts = {f"{n}.stand.test": STAND_V4 for n in names}
    with egress_world(tmp, gw_hosts, px_hosts) as world:
        # Without a proxy installed, the proxy cases skip (fail under POLYDEV_REQUIRE_SERVERS=1) on their own;
        # the rest runs.
        proxy_log = tinyproxy(world, TINYPROXY_PORT, PROXY_USER, PROXY_PASSWORD)[1] if find_tool("tinyproxy") else None
        socks_log = danted(world, DANTE_PORT)[1] if find_tool("danted") else None
        user_ids = {name: uuid.uuid4() for name in users()}
        vms = {name: uuid.uuid4() for name in users()} | {"Lconc2": uuid.uuid4(), "A2": uuid.uuid4()}
        config = {
            "ports": [443],
            # Pinned names (EGRESS_HOSTS): the stand-in's, trusted as given. "other" is pinned but not allowed.
            "hosts": {**{f"{n}.stand.test": [STAND_V4, STAND_V6] for n in names},
                      "private.stand.test": [STAND_PRIVATE]},
            "allow": {"claude_code run": [f"{n}.stand.test" for n in names if n != "other"]
                      + ["private.stand.test", "*.rebind.test"]},
            "refused_networks": [POOL_V4, POOL_V6],
            "users": {str(user_ids[n]): spec for n, spec in users().items()},
            "vms": [{"vm_id": str(vm_id), "user_id": str(user_ids[name.rstrip("2")]), "purpose": "run",
                     "provider": "claude_code"} for name, vm_id in vms.items() if name != "A2"],
        }
        gateway = world.gateway(config)
        yield Stand(world, gateway, user_ids, vms, proxy_log, socks_log)


def test_each_user_leaves_from_their_own_ipv4_address(stand: Stand) -> None:
    asked = [stand.ask(vm, f"{vm.lower()}.stand.test") for vm in ("A", "B", "A", "B", "A", "B")]
    assert [reply.peer for _, reply in asked] == [ADDRESSES["A"], ADDRESSES["B"]] * 3
    seen = stand.world.seen()  # and the stand-in's own record agrees, request by request
    assert [seen[tag] for tag, _ in asked] == [ADDRESSES["A"], ADDRESSES["B"]] * 3


def test_each_user_leaves_from_their_own_ipv6_address(stand: Stand) -> None:
    asked = [stand.ask(vm, "a.stand.test") for vm in ("A6", "B6", "A6", "B6")]
    assert [reply.peer for _, reply in asked] == [ADDRESSES["A6"], ADDRESSES["B6"]] * 2
    # The name has an A and an AAAA record: an IPv6 user is given the AAAA one (the stand-in's IPv6 address).
    assert all(":" in stand.world.seen()[tag] for tag, _ in asked)


def test_a_proxy_user_leaves_through_their_proxy_and_nobody_else_does(stand: Stand) -> None:
    if stand.proxy_log is None:
        unmet("tinyproxy is not installed (scripts/test.sh installs it)")
    before = stand.proxy_log.read_text()
    asked = [stand.ask(vm, f"{vm.lower()}.stand.test") for vm in ("C", "A", "C", "B", "C")]
    peers = {vm: {r.peer for t, r in asked if t.startswith(vm + "-")} for vm in ("A", "B", "C")}
    assert peers == {"A": {ADDRESSES["A"]}, "B": {ADDRESSES["B"]}, "C": {PX_INET}}  # C: the proxy's address
    log = stand.proxy_log.read_text()
    new = log[len(before):]
    assert new.count("CONNECT c.stand.test:443") == 3, new  # every one of C's tunnels, through the proxy
    assert "a.stand.test" not in log and "b.stand.test" not in log  # never A's or B's


def test_wrong_proxy_credentials_fail_with_the_proxys_answer_and_no_secret(stand: Stand) -> None:
    if stand.proxy_log is None:
        unmet("tinyproxy is not installed (scripts/test.sh installs it)")
    tag, reply = stand.ask("Cbad", "c.stand.test")
    assert reply.status == 502
    assert f"upstream proxy http://{PX_GW}:{TINYPROXY_PORT} refused c.stand.test:443" in reply.head
    assert "401" in reply.head and "not-the-pw" not in reply.head and PROXY_USER not in reply.head
    assert tag not in stand.world.seen()


def test_a_proxy_that_is_down_fails_the_users_tunnel_without_falling_back(stand: Stand) -> None:
    if stand.proxy_log is None:
        unmet("tinyproxy is not installed (scripts/test.sh installs it)")
    proc, log = tinyproxy(stand.world, DOWN_PROXY_PORT, PROXY_USER, PROXY_PASSWORD)
    tag, reply = stand.ask("D", "d.stand.test")
    assert reply.peer == PX_INET and "CONNECT d.stand.test:443" in log.read_text()  # works while it is up
    proc.kill()
    proc.wait()
    tag, reply = stand.ask("D", "d.stand.test")
    assert reply.status == 502, reply.head
    assert f"upstream proxy http://{PX_GW}:{DOWN_PROXY_PORT} unreachable" in reply.head
    assert PROXY_PASSWORD not in reply.head
    assert tag not in stand.world.seen()  # nothing reached the stand-in: no direct route was tried


def test_a_socks5_user_leaves_through_their_socks_proxy(stand: Stand) -> None:
    if stand.socks_log is None:
        unmet("dante-server is not installed (scripts/test.sh installs it)")
    before = stand.socks_log.read_text()
    tag, reply = stand.ask("S", "s.stand.test")
    assert reply.peer == PX_INET and stand.world.seen()[tag] == PX_INET
    new = stand.socks_log.read_text()[len(before):]
    assert f"-> {PX_INET}." in new and f"{STAND_V4}.443" in new, new  # dante made the connection
    assert stand.proxy_log is None or "s.stand.test" not in stand.proxy_log.read_text()


def test_a_pinned_host_off_the_allow_list_is_refused(stand: Stand) -> None:
    tag, reply = stand.ask("A", "other.stand.test")
    assert reply.status == 403
    assert "other.stand.test refused: not on the allow-list for claude_code runs" in reply.head
    assert tag not in stand.world.seen()
    # The same stand-in answers under an allowed name: the refusal is the allow-list's, not the network's.
    assert stand.ask("A", "a.stand.test")[1].peer == ADDRESSES["A"]


@pytest.mark.parametrize("vm, name", [("A", n) for n in REBIND] + [("A6", n) for n in REBIND_V6])
def test_allowed_names_resolving_to_non_public_addresses_are_refused(stand: Stand, vm: str, name: str) -> None:
    address, why = {**REBIND, **REBIND_V6}[name]
    tag, reply = stand.ask(vm, name)
    assert reply.status == 403, reply.head
    assert f"{name} refused: its address {address} is" in reply.head and why in reply.head
    assert tag not in stand.world.seen()


def test_the_private_address_is_reachable_when_pinned(stand: Stand) -> None:
    """The control for ten.rebind.test: the same address through a pinned name reaches the stand-in."""
    assert stand.ask("A", "private.stand.test")[1].peer == ADDRESSES["A"]


def test_the_concurrent_limit_trips_for_its_user_only(stand: Stand) -> None:
    held, first = connect(stand.sock("Lconc"), "l.stand.test:443")
    try:
        assert first.status == 200
        _, second = stand.ask("Lconc2", "l.stand.test")  # the same user's other VM: the limit is the user's
        assert second.status == 429 and "limit: 1 concurrent connections reached" in second.head
        assert stand.ask("A", "a.stand.test")[1].peer == ADDRESSES["A"]  # nobody else is held back
        ctx = ssl.create_default_context(cafile=str(stand.world.ca.cert_path))
        with ctx.wrap_socket(held, server_hostname="l.stand.test") as tls:  # the held tunnel still works
            tls.sendall(b"GET /held HTTP/1.1\r\nHost: l.stand.test\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.endswith(b"\r\n\r\n" + GW_INET.encode())
    finally:
        held.close()


def test_the_per_minute_limit_trips_for_its_user_only(stand: Stand) -> None:
    replies = [stand.ask("Lmin", "l.stand.test")[1] for _ in range(3)]
    assert [r.peer for r in replies[:2]] == [GW_INET, GW_INET]  # the direct route: the gateway host's address
    assert replies[2].status == 429 and "limit: 2 new connections per minute reached" in replies[2].head
    assert [stand.ask("B", "b.stand.test")[1].peer for _ in range(3)] == [ADDRESSES["B"]] * 3


def test_the_bytes_per_day_limit_trips_for_its_user_only(stand: Stand) -> None:
    assert stand.ask("Lbytes", "l.stand.test")[1].peer == GW_INET  # admitted under the limit, then charged
    tag, reply = stand.ask("Lbytes", "l.stand.test")
    assert reply.status == 429 and "limit: 1 bytes per day reached" in reply.head
    assert tag not in stand.world.seen()
    assert stand.ask("A6", "a.stand.test")[1].peer == ADDRESSES["A6"]


def test_a_vms_socket_carries_its_own_identity_whatever_the_request_says(stand: Stand) -> None:
    stand.gateway.usage()  # start the accounting afresh
    b_user, b_vm = stand.user_ids["B"], stand.vms["B"]
    forged = (f"Proxy-Authorization: Basic {PROXY_USER}\r\nX-Polydev-VM: {b_vm}\r\nX-Polydev-User: {b_user}\r\n"
              f"Forwarded: for={ADDRESSES['B']}\r\nX-Forwarded-For: {ADDRESSES['B']}\r\n")
    _, reply = stand.ask("A", "b.stand.test", forged)  # A's socket, B's name, B's ids in every header
    assert reply.peer == ADDRESSES["A"]
    rows = [(r["user_id"], r["host"], r["connections"]) for r in stand.gateway.usage()]
    assert rows == [(str(stand.user_ids["A"]), "b.stand.test", 1)]  # accounted to A, never to B


def test_a_detached_vms_socket_is_gone_and_its_tunnels_end(stand: Stand) -> None:
    vm_id = stand.vms["A2"]
    path = stand.gateway.attach({"vm_id": str(vm_id), "user_id": str(stand.user_ids["A"]), "purpose": "run",
                                 "provider": "claude_code"})
    assert stand.ask("A2", "a.stand.test")[1].peer == ADDRESSES["A"]
    held, reply = connect(path, "a.stand.test:443")
    try:
        assert reply.status == 200
        stand.gateway.detach(vm_id)
        assert held.recv(100) == b""  # the open tunnel was ended
    finally:
        held.close()
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(path))
    assert stand.ask("A", "a.stand.test")[1].peer == ADDRESSES["A"]  # the user's other VM is untouched
