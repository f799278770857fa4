"""Real VMs through the engine in tap mode, in namespaces the test creates: VMs are restored from one tap-mode
snapshot into different slots; the control plane (the test's host namespace) reaches each agent; a VM reaches
neither another VM nor any host port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from polydev.egress.gateway import EgressGateway
from polydev.egress.limits import Limits
from polydev.egress.policy import Policy
from polydev.egress.resolve import Resolver
from polydev.egress.routes import DirectRoute
from polydev.egress.service import EngineHook
from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import images
from polydev.vm import network as net
from polydev.vm.backends.qemu.backend import QemuBackend
from polydev.vm.engine import VMEngine, find_marked_processes
from polydev.vm.network import SlotNetwork
from tests.support.egress_probe import CONNECT_PROBE
from tests.support.netns import (
    HOST_SERVICE_IP,
    POOL,
    Listener,
    host_namespace,
    in_ns,
    require_root_netns,
)

pytest_plugins = ["tests.support.vm_fixtures"]

# Runs in the host namespace: one agent call (token from the environment, never on a command line).
_CALL = r"""
import json, os, sys
from polydev.vm.agent_client import AgentClient
url, args = sys.argv[1], json.loads(sys.argv[2])
with AgentClient(url, os.environ["AGENT_TOKEN"], timeout=120) as agent:
    if args == "livez":
        print(json.dumps({"live": agent.livez()}))
    else:
        r = agent.exec(args)
        print(json.dumps({"exit": r.exit_code, "out": r.stdout.decode(), "err": r.stderr.decode()}))
"""

# Inside a guest: try a TCP connection, exit 0 on success.
_TRY = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
        "except OSError: sys.exit(1)\n")


@pytest.fixture(params=["sqlite"])
def database_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'polydev.db'}"


class Routes:
    async def route(self, user_id: uuid.UUID | None) -> tuple[DirectRoute, Limits]:
        return DirectRoute(), Limits()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """Where the egress gateway's tunnels go: an echo server on the test process's own loopback."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def tap_engine(services: Services, test_image: images.Image,
                     echo_port: int) -> AsyncIterator[tuple[VMEngine, str]]:
    require_root_netns()
    gateway = EgressGateway(policy=Policy(extra=("api.stand.test",), ports=frozenset({echo_port})),
                            resolver=Resolver({"api.stand.test": ("127.0.0.1",)}), routes=Routes(),
                            run_dir=services.settings.data_dir / "egress")
    with host_namespace() as prefix:
        network = SlotNetwork(*POOL, prefix=prefix, host_netns=f"{prefix}-host", egress_port=net.EGRESS_PORT)
        eng = VMEngine(backend=QemuBackend(test_image, services.settings.data_dir / "snapshots"),
                       vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                       leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir, network=network,
                       vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 1024, "browser": 1024},
                       egress=EngineHook(gateway))
        try:
            yield eng, f"{prefix}-host"
        finally:
            await eng.close()
            await eng.reconcile()
            await gateway.close()




def call(host: str, url: str, token: str, args: object) -> dict:  # type: ignore[type-arg]
    result = subprocess.run(in_ns(host, sys.executable, "-c", _CALL, url, json.dumps(args)),
                            env={"AGENT_TOKEN": token, "PATH": "/usr/sbin:/usr/bin:/bin",
                                 "PYTHONPATH": ":".join(sys.path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


async def test_tap_mode_vms_are_reachable_and_isolated(tap_engine: tuple[VMEngine, str], echo_port: int) -> None:
    engine, host = tap_engine
    a, b = await asyncio.gather(engine.create(None, "cli"), engine.create(None, "cli"))
    assert {a.slot_index, b.slot_index} == {0, 1}
    backend = engine.backend
    assert isinstance(backend, QemuBackend)
    meta = json.loads((backend.snapshot_dir(1, 1024, "tap") / "meta.json").read_text())
    assert meta["network"] == "tap"
    assert backend.snapshot_dir(1, 1024, "tap") != backend.snapshot_dir(1, 1024, "user")
    listener = Listener(host, "0.0.0.0", 9999)
    try:
        ends = {}
        started_at: set[str] = set()
        for vm in (a, b):
            url, token = engine.agent_endpoint(vm.id)
            assert url.startswith(f"http://{engine.network.address(vm.slot_index).ns_ip}:")  # type: ignore[union-attr,arg-type]
            ends[vm.id] = (url, token)
            # The control plane reaches each agent through its slot; the guest has the shared address.
            out = call(host, url, token, ["ip", "-4", "-o", "addr", "show", "eth0"])
            assert out["exit"] == 0 and f"{net.GUEST_IP}/{net.GUEST_PREFIX}" in out["out"]
            # Field 22 of the agent's /proc stat: when it started, in ticks since boot. Cold boots differ;
            # restores of one snapshot share the snapshot's memory image, so the same value.
            out = call(host, url, token, ["sh", "-c", "cut -d' ' -f22 /proc/$PPID/stat"])
            assert out["exit"] == 0
            started_at.add(out["out"].strip())
        assert len(started_at) == 1, "both VMs restored from the one snapshot"
        b_ip = engine.network.address(b.slot_index).ns_ip  # type: ignore[union-attr,arg-type]
        a_host = engine.network.address(a.slot_index).host_ip  # type: ignore[union-attr,arg-type]
        url, token = ends[a.id]
        probes = {
            "VM A to VM B's agent": (b_ip, net.AGENT_PORT),
            "VM A to a host service": (HOST_SERVICE_IP, 9999),
            "VM A to its own veth host end": (a_host, 9999),
            "VM A to its slot gateway": (net.GATEWAY_IP, 9999),
        }
        for what, (ip, port) in probes.items():
            out = call(host, url, token, ["python3", "-c", _TRY, ip, str(port)])
            assert out["exit"] == 1, f"{what} must fail"
        # The probe itself works: inside VM A, its own agent port answers.
        out = call(host, url, token, ["python3", "-c", _TRY, net.GUEST_IP, str(net.AGENT_PORT)])
        assert out["exit"] == 0
        # Each VM's proxy address (the same in every guest) reaches the egress gateway as that VM: its
        # slot DNATs it to the listener at its own host end. (In a thread: the gateway serves on this loop.)
        engine.label(a.id, purpose="run", provider="claude_code")
        engine.label(b.id, purpose="run", provider="claude_code")
        gateway = engine.egress.gateway  # type: ignore[union-attr]
        for vm in (a, b):
            url, token = ends[vm.id]
            out = await asyncio.to_thread(call, host, url, token, [
                "python3", "-c", CONNECT_PROBE, net.GATEWAY_IP, str(net.EGRESS_PORT), f"api.stand.test:{echo_port}"])
            assert out["exit"] == 0 and out["out"].splitlines() == ["HTTP/1.1 200 Connection Established",
                                                            "echo ping from the guest"], out
        assert {d.host for d in gateway.usage.drain()} == {"api.stand.test"}
    finally:
        listener.close()
    for vm in (a, b):
        assert await engine.destroy(vm.id)
    assert find_marked_processes(engine.tag) == {}
    assert await asyncio.to_thread(engine.network.existing) == set()  # type: ignore[union-attr]


async def test_a_hibernated_tap_vm_frees_its_slot_and_wakes_in_another(tap_engine: tuple[VMEngine, str],
                                                                       echo_port: int) -> None:
    engine, host = tap_engine
    a = await engine.create(None, "cli")
    assert a.slot_index == 0
    url, token = engine.agent_endpoint(a.id)
    out = call(host, url, token, ["sh", "-c", "echo intact > /root/kept; (sleep 3600 &) ; echo started"])
    assert out["exit"] == 0
    token_kept = await engine.hibernate(a.id)
    # Asleep, it holds no slot: no lease, no namespace, and the next VM gets the slot it had.
    assert await engine.leases.held() == {}
    assert await asyncio.to_thread(engine.network.existing) == set()  # type: ignore[union-attr]
    b = await engine.create(None, "cli")
    assert b.slot_index == 0
    woken = await engine.wake(a.id, token_kept, timedelta(minutes=10))
    assert woken.slot_index == 1
    url, token = engine.agent_endpoint(a.id)
    assert url.startswith(f"http://{engine.network.address(1).ns_ip}:")  # type: ignore[union-attr]
    out = call(host, url, token, ["sh", "-c", "cat /root/kept; pgrep -x sleep >/dev/null && echo running"])
    assert out["out"].split() == ["intact", "running"]  # its disk and its processes, as they were
    # Its traffic still leaves through the gateway, as this VM, from its new slot.
    engine.label(a.id, purpose="run", provider="claude_code")
    out = await asyncio.to_thread(call, host, url, token, [
        "python3", "-c", CONNECT_PROBE, net.GATEWAY_IP, str(net.EGRESS_PORT), f"api.stand.test:{echo_port}"])
    assert out["exit"] == 0 and out["out"].splitlines()[-1] == "echo ping from the guest", out
    for vm in (a, b):
        assert await engine.destroy(vm.id)
    assert find_marked_processes(engine.tag) == {}
    assert await asyncio.to_thread(engine.network.existing) == set()  # type: ignore[union-attr]
