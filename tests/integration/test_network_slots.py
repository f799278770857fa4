"""Network slots in namespaces the test creates: a namespace plays the host, emulated guests play VMs.

Proves what the tap network mode promises: the control plane reaches every agent; a guest reaches no
other guest, no host port, not its own namespace, and only the egress its policy allows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pyroute2 import NetNS, netns

from polydev.vm import network as net
from polydev.vm.network import EgressPolicy, EgressRule, NetworkError, SlotNetwork
from tests.support.egress_probe import CONNECT_PROBE
from tests.support.netns import (
    HOST_SERVICE_IP,
    POOL,
    Listener,
    connect,
    host_namespace,
    require_root_netns,
)


@pytest.fixture
def slots() -> Iterator[SlotNetwork]:
    require_root_netns()
    with host_namespace() as prefix:
        network = SlotNetwork(*POOL, prefix=prefix, host_netns=f"{prefix}-host")
        listeners: list[Listener] = []
        network.listeners = listeners  # type: ignore[attr-defined]
        try:
            yield network
        finally:
            for listener in listeners:
                listener.close()
            network.reclaim([])


def listen(slots: SlotNetwork, ns: str, ip: str, port: int) -> None:
    slots.listeners.append(Listener(ns, ip, port))  # type: ignore[attr-defined]


def test_pool_is_cut_into_aligned_pairs() -> None:
    pairs = net.pool_pairs("192.168.100.2", "192.168.100.254")
    assert len(pairs) == 126
    assert (pairs[0].host_ip, pairs[0].ns_ip) == ("192.168.100.2", "192.168.100.3")
    assert (pairs[-1].host_ip, pairs[-1].ns_ip) == ("192.168.100.252", "192.168.100.253")
    assert net.pool_pairs("10.0.0.3", "10.0.0.6")[0].host_ip == "10.0.0.4"
    with pytest.raises(NetworkError):
        net.pool_pairs("10.0.0.9", "10.0.0.1")


def test_control_plane_reaches_every_agent_and_guests_reach_nothing_else(slots: SlotNetwork) -> None:
    host = slots.host_netns
    assert host is not None
    a = slots.create(0, guest="emulated")
    b = slots.create(1, guest="emulated")
    assert a.guest_netns and b.guest_netns
    for slot in (a, b):
        listen(slots, slot.guest_netns, net.GUEST_IP, net.AGENT_PORT)  # type: ignore[arg-type]
        listen(slots, slot.guest_netns, net.GUEST_IP, 5000)  # type: ignore[arg-type]
        listen(slots, slot.netns, "0.0.0.0", 7777)  # something listening in the slot namespace itself
    listen(slots, host, "0.0.0.0", 9999)

    # The control plane (host namespace) reaches each agent through the slot's own address.
    assert connect(host, a.ns_ip, net.AGENT_PORT) == f"hello {a.host_ip}"
    assert connect(host, b.ns_ip, net.AGENT_PORT) == f"hello {b.host_ip}"
    # ...and nothing else in the guest.
    assert connect(host, a.ns_ip, 5000) is None

    for src, other in ((a, b), (b, a)):
        g = src.guest_netns
        assert g
        assert connect(g, other.ns_ip, net.AGENT_PORT) is None, "VM to VM (agent channel)"
        assert connect(g, other.ns_ip, 7777) is None, "VM to another slot's namespace"
        assert connect(g, src.host_ip, 9999) is None, "VM to host (own veth end)"
        assert connect(g, other.host_ip, 9999) is None, "VM to host (other veth end)"
        assert connect(g, HOST_SERVICE_IP, 9999) is None, "VM to a host service"
        assert connect(g, net.GATEWAY_IP, 7777) is None, "VM to its own slot namespace"
        assert connect(g, src.ns_ip, 7777) is None, "VM to its own slot's outer address"
    # The probes can succeed at all: inside a guest, its own service answers.
    assert connect(a.guest_netns, net.GUEST_IP, 5000) == f"hello {net.GUEST_IP}"


def test_egress_goes_only_where_the_policy_allows_masqueraded(slots: SlotNetwork) -> None:
    host = slots.host_netns
    assert host is not None
    policy = EgressPolicy(allow=(EgressRule(f"{HOST_SERVICE_IP}/32", 9000),))
    c = slots.create(2, egress=policy, guest="emulated")
    listen(slots, host, "0.0.0.0", 9000)
    listen(slots, host, "0.0.0.0", 9999)
    assert c.guest_netns
    # The allowed destination sees the slot's address, never the guest's shared one.
    assert connect(c.guest_netns, HOST_SERVICE_IP, 9000) == f"hello {c.ns_ip}"
    assert connect(c.guest_netns, HOST_SERVICE_IP, 9999) is None
    assert connect(c.guest_netns, c.host_ip, 9000) is None, "the pool stays closed whatever the policy"


def test_destroy_and_reclaim_leave_nothing(slots: SlotNetwork) -> None:
    for i in (0, 1, 3):
        slots.create(i, guest="emulated" if i else "tap")
    assert slots.existing() == {0, 1, 3}
    slots.destroy(0)
    slots.destroy(0)  # idempotent
    assert slots.existing() == {1, 3}
    assert slots.reclaim([3]) == [1]
    assert slots.existing() == {3}
    assert slots.reclaim([]) == [3]
    assert slots.existing() == set()
    assert not [n for n in netns.listnetns() if n.startswith(f"{slots.prefix}-slot-")]
    with NetNS(slots.host_netns) as host:  # type: ignore[arg-type]
        assert not [l.get("ifname") for l in host.get_links() if l.get("ifname", "").startswith(f"{slots.prefix}h")]


def test_a_failed_create_leaves_nothing(slots: SlotNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: list[str], stdin: str | None = None) -> None:
        if "nft" in args:
            raise NetworkError("nft exploded")

    monkeypatch.setattr(net, "_run", broken)
    with pytest.raises(NetworkError, match="nft exploded"):
        slots.create(4, guest="emulated")
    assert slots.existing() == set()


def test_create_over_a_crash_leftover(slots: SlotNetwork) -> None:
    slots.create(5)
    again = slots.create(5)  # e.g. after a crash: the stale slot is replaced, not an error
    assert again.index == 5 and slots.existing() == {5}


def test_slot_outside_the_pool_is_refused(slots: SlotNetwork) -> None:
    with pytest.raises(NetworkError, match="outside the pool"):
        slots.create(slots.capacity)




async def test_the_gateway_knows_a_tap_vm_by_its_slots_listener(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tap mode: each guest's proxy address (GATEWAY_IP:EGRESS_PORT, the same in every slot) reaches its own
    slot's listener, so its tunnels are its own VM's; a guest cannot reach another slot's listener, a
    connection from anywhere but the slot is refused, and a detached VM reaches nothing."""
    import asyncio
    import subprocess
    import sys
    import uuid

    from polydev.egress.gateway import EgressGateway, Identity
    from polydev.egress.limits import Limits
    from polydev.egress.policy import Policy
    from polydev.egress.resolve import Resolver
    from polydev.egress.routes import DirectRoute

    class Routes:
        async def route(self, user_id: uuid.UUID | None) -> tuple[DirectRoute, Limits]:
            return DirectRoute(), Limits()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()

    def through(ns: str, ip: str, target: str) -> str:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CONNECT_PROBE, ip,
                              str(net.EGRESS_PORT), target], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().replace("\n", " / ")

    require_root_netns()
    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)  # where the gateway's tunnels go (its own netns)
    port = upstream.sockets[0].getsockname()[1]
    gw = EgressGateway(policy=Policy(extra=("api.stand.test",), ports=frozenset({port})),
                       resolver=Resolver({"api.stand.test": ("127.0.0.1",)}), routes=Routes(), run_dir=tmp_path)
    with host_namespace() as prefix:
        slots = SlotNetwork(*POOL, prefix=prefix, host_netns=f"{prefix}-host", egress_port=net.EGRESS_PORT)
        try:
            a = await asyncio.to_thread(slots.create, 0, guest="emulated")
            b = await asyncio.to_thread(slots.create, 1, guest="emulated")
            assert a.guest_netns and b.guest_netns
            users = {a.index: uuid.uuid4(), b.index: uuid.uuid4()}
            vms = {a.index: uuid.uuid4(), b.index: uuid.uuid4()}
            for slot in (a, b):
                path = await gw.attach(Identity(vms[slot.index], users[slot.index], "run", "claude_code"),
                                       listener=slots.listen(slot), peer=slot.ns_ip)
                assert path is None
            target = f"api.stand.test:{port}"
            assert await asyncio.to_thread(through, a.guest_netns, net.GATEWAY_IP, target) == \
                "HTTP/1.1 200 Connection Established / echo ping from the guest"
            b_after = await asyncio.to_thread(through, b.guest_netns, net.GATEWAY_IP, target)
            assert b_after.endswith("echo ping from the guest"), b_after
            refused = await asyncio.to_thread(through, a.guest_netns, net.GATEWAY_IP, f"other.test:{port}")
            assert refused.startswith("HTTP/1.1 403"), refused
            # Each tunnel is its own VM's user's, and the refusal A's.
            book = {(d.user_id, d.host): d for d in gw.usage.drain()}
            assert book[(users[a.index], "api.stand.test")].connections == 1
            assert book[(users[b.index], "api.stand.test")].connections == 1
            assert book[(users[a.index], "other.test")].refusals == 1
            assert gw.last_refusal(vms[a.index]) is not None and gw.last_refusal(vms[b.index]) is None
            # A's guest cannot reach B's listener (nor its own host end) by address: only its proxy address.
            assert await asyncio.to_thread(through, a.guest_netns, b.host_ip, target) == "fail TimeoutError"
            # From the host side (not the slot's address), A's listener answers no tunnel.
            from_host = await asyncio.to_thread(through, f"{prefix}-host", a.host_ip, target)
            assert from_host == "HTTP/1.1 403 Forbidden | this listener belongs to another VM", from_host
            # A detached VM reaches nothing.
            await gw.detach(vms[a.index])
            gone = await asyncio.to_thread(through, a.guest_netns, net.GATEWAY_IP, target)
            assert gone.startswith("fail"), gone
            b_after = await asyncio.to_thread(through, b.guest_netns, net.GATEWAY_IP, target)
            assert b_after.endswith("echo ping from the guest"), b_after
        finally:
            await gw.close()
            upstream.close()
            await asyncio.to_thread(slots.reclaim, [])
