"""Egress across servers. A user's limits: two gateways counting in one real Redis (SharedLimitTracker) hold
the user to one limit between them; another user is not slowed; a server that dies without releasing its
tunnels stops counting against the user once its leases lapse; a day's bytes seeded from the accounting
count on every server; with Redis gone each gateway still enforces its own counters. And an admin's change
to a user's identity reaches every server's route cache."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from polydev.egress import shared_limits
from polydev.egress.gateway import EgressGateway
from polydev.egress.limits import Limits
from polydev.egress.policy import Policy
from polydev.egress.resolve import Resolver
from polydev.egress.route_changes import RouteChanges
from polydev.egress.shared_limits import SharedLimitTracker
from tests.integration.test_egress_gateway import Routes, connect, echo_server, run_vm
from tests.support.clock import ManualClock

pytestmark = pytest.mark.redis


@pytest.fixture
async def pair(redis_server: str) -> AsyncIterator[tuple[list[EgressGateway], Routes, int, ManualClock]]:
    """Two gateways (two servers) with their own sockets, sharing the routes, one Redis and one clock."""
    server, port = await echo_server()
    routes = Routes()
    clock = ManualClock(1_000_000.0)
    prefix = f"test-egress-{uuid.uuid4().hex[:8]}:"  # tests share one Redis
    policy = Policy(allow={("claude_code", "run"): ("api.stand.test",)}, ports=frozenset({port}))
    gateways, dirs, clients = [], [], []
    for _ in range(2):
        tmp = Path(f"/tmp/egress-shared-{uuid.uuid4().hex[:8]}")
        clients.append(aioredis.Redis.from_url(redis_server, decode_responses=True))
        tracker = SharedLimitTracker(clients[-1], prefix=prefix, clock=clock)
        gateways.append(EgressGateway(policy=policy, resolver=Resolver({"api.stand.test": ("127.0.0.1",)}),
                                      routes=routes, run_dir=tmp, limits=tracker))
        dirs.append(tmp)
    yield gateways, routes, port, clock
    for gw, client in zip(gateways, clients, strict=True):
        await gw.close()
        await gw.limits.close()  # type: ignore[attr-defined]
        await client.aclose()
    server.close()
    await server.wait_closed()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


async def two_vms(pair, limits: Limits) -> tuple[uuid.UUID, Path, Path]:
    """A user with `limits` and a VM on each of the two servers: the user and the VMs' sockets."""
    (gw1, gw2), routes, _, _ = pair
    user = uuid.uuid4()
    routes.limits[user] = limits
    return user, await gw1.attach(run_vm(user)), await gw2.attach(run_vm(user))


async def released(gw: EgressGateway, user: uuid.UUID) -> None:
    for _ in range(100):
        if await gw.limits.open_count(user) == 0:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.05)


async def test_the_concurrent_limit_holds_across_servers(pair) -> None:
    (gw1, gw2), _, port, _ = pair
    user, sock1, sock2 = await two_vms(pair, Limits(concurrent=1))
    sock_o = await gw2.attach(run_vm())
    first, _, w1 = await connect(sock1, f"api.stand.test:{port}")
    assert first.startswith(b"HTTP/1.1 200")
    second, _, w2 = await connect(sock2, f"api.stand.test:{port}")
    assert second.startswith(b"HTTP/1.1 429") and b"limit: 1 concurrent connections reached" in second
    theirs, _, w3 = await connect(sock_o, f"api.stand.test:{port}")  # another user is not slowed
    assert theirs.startswith(b"HTTP/1.1 200")
    w1.close()
    await w1.wait_closed()
    await released(gw1, user)  # the first server releases the tunnel when its relay ends
    again, _, w4 = await connect(sock2, f"api.stand.test:{port}")
    assert again.startswith(b"HTTP/1.1 200")
    for w in (w2, w3, w4):
        w.close()


async def test_a_dead_servers_tunnels_stop_counting_when_their_leases_lapse(pair) -> None:
    _, _, port, clock = pair
    _, sock1, sock2 = await two_vms(pair, Limits(concurrent=1))
    held, _, w1 = await connect(sock1, f"api.stand.test:{port}")
    assert held.startswith(b"HTTP/1.1 200")
    # Server 1 is "killed": it renews nothing and releases nothing from now on (its tunnel stays open here).
    refused, _, w2 = await connect(sock2, f"api.stand.test:{port}")
    assert refused.startswith(b"HTTP/1.1 429")
    clock.now += shared_limits.LEASE_S + 1
    after, _, w3 = await connect(sock2, f"api.stand.test:{port}")
    assert after.startswith(b"HTTP/1.1 200")
    for w in (w1, w2, w3):
        w.close()


async def test_the_per_minute_limit_counts_both_servers(pair) -> None:
    _, _, port, clock = pair
    _, *socks = await two_vms(pair, Limits(per_minute=2))
    heads = []
    for sock in (socks[0], socks[1], socks[0]):
        head, _, w = await connect(sock, f"api.stand.test:{port}")
        heads.append(head.split(b"\r\n", 1)[0])
        w.close()
    assert heads == [b"HTTP/1.1 200 Connection Established"] * 2 + [b"HTTP/1.1 429 Too Many Requests"]
    clock.now += 61  # the window slides on
    head, _, w = await connect(socks[1], f"api.stand.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    w.close()


async def test_bytes_used_on_one_server_count_on_the_other(pair) -> None:
    (gw1, gw2), routes, port, _ = pair
    user, sock1, sock2 = await two_vms(pair, Limits(bytes_per_day=10))
    _, r, w = await connect(sock1, f"api.stand.test:{port}")
    w.write(b"0123456789ab")
    await r.readexactly(12)
    w.close()
    await w.wait_closed()
    await released(gw1, user)  # bytes are charged when the tunnel ends
    head2, _, w2 = await connect(sock2, f"api.stand.test:{port}")
    assert head2.startswith(b"HTTP/1.1 429") and b"limit: 10 bytes per day reached" in head2
    w2.close()
    # What the accounting holds at start-up raises the shared counter for every server.
    other = uuid.uuid4()
    routes.limits[other] = Limits(bytes_per_day=100)
    await gw1.limits.seed_bytes(other, 100)
    head3, _, w3 = await connect(await gw2.attach(run_vm(other)), f"api.stand.test:{port}")
    assert head3.startswith(b"HTTP/1.1 429") and b"limit: 100 bytes per day reached" in head3
    w3.close()


async def test_without_redis_each_server_enforces_its_own_counters(tmp_path: Path) -> None:
    server, port = await echo_server()
    routes = Routes()
    user = uuid.uuid4()
    routes.limits[user] = Limits(concurrent=1)
    gone = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens on port 1
    gw = EgressGateway(policy=Policy(allow={("claude_code", "run"): ("api.stand.test",)}, ports=frozenset({port})),
                       resolver=Resolver({"api.stand.test": ("127.0.0.1",)}), routes=routes,
                       run_dir=Path(f"/tmp/egress-shared-{uuid.uuid4().hex[:8]}"), limits=SharedLimitTracker(gone))
    try:
        sock = await gw.attach(run_vm(user))
        first, _, w1 = await connect(sock, f"api.stand.test:{port}")
        assert first.startswith(b"HTTP/1.1 200")
        second, _, w2 = await connect(sock, f"api.stand.test:{port}")
        assert second.startswith(b"HTTP/1.1 429") and b"1 concurrent connections" in second
        w1.close()
        w2.close()
    finally:
        await gw.close()
        await gw.limits.close()  # type: ignore[attr-defined]
        await gone.aclose()
        shutil.rmtree(gw.run_dir, ignore_errors=True)
        server.close()
        await server.wait_closed()


async def test_an_identity_change_reaches_every_servers_route_cache(redis_server: str) -> None:
    channel = f"test-route-changes-{uuid.uuid4().hex[:8]}"
    clients = [aioredis.Redis.from_url(redis_server, decode_responses=True) for _ in range(2)]
    forgotten: list[list[uuid.UUID]] = [[], []]
    servers = [RouteChanges(c, forgotten[i].append, channel=channel) for i, c in enumerate(clients)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            await asyncio.wait_for(s.subscribed.wait(), 10)
        user = uuid.uuid4()
        servers[0].announce(user)
        for _ in range(100):
            if all(forgotten):
                break
            await asyncio.sleep(0.05)
        assert forgotten == [[user], [user]]
    finally:
        for s in servers:
            await s.close()
        for c in clients:
            await c.aclose()
