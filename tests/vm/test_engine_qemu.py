"""The engine with the real QEMU backend: the first VM's boot becomes a snapshot, later VMs are restores,
each with its own token; destroy and reconcile leave no QEMU process or disk behind, nor does an engine killed
with SIGKILL; guest forwards open exactly the configured host loopback services to a guest."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from polydev.config import Settings
from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import handover, images
from polydev.vm.backends.qemu.backend import QemuBackend
from polydev.vm.engine import VMEngine, find_marked_processes

pytest_plugins = ["tests.support.vm_fixtures"]


@pytest.fixture(params=["sqlite"])  # the engine's SQL is covered on both databases by test_engine.py
def database_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'polydev.db'}"


def make_engine(services: Services, image: images.Image) -> VMEngine:
    backend = QemuBackend(image, services.settings.data_dir / "snapshots")
    return VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                    leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir,
                    vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 1024, "browser": 1024})


@pytest.fixture
async def engine(services: Services, test_image: images.Image) -> AsyncIterator[VMEngine]:
    eng = make_engine(services, test_image)
    yield eng
    await eng.close()
    await make_engine(services, test_image).reconcile()


async def test_vms_restore_from_one_snapshot_each_with_its_own_token(engine: VMEngine) -> None:
    first = await engine.create(None, "cli")
    backend = engine.backend
    assert isinstance(backend, QemuBackend)
    snapshot = backend.ensure_snapshot(1, 1024, "unused")
    assert snapshot.state.exists() and snapshot.disk.exists()
    second = await engine.create(None, "cli")
    third = await engine.create(None, "cli")
    marked = find_marked_processes(engine.tag)
    assert {first.id, second.id, third.id} <= set(marked)
    outputs = set()
    for vm in (first, second, third):
        with engine.agent(vm.id) as agent:
            # Field 22 of the agent's /proc stat: when it started, in ticks since boot. Identical in every
            # restore of one snapshot, different between cold boots.
            result = agent.exec(["sh", "-c", "echo $((6*7)); cut -d' ' -f22 /proc/$PPID/stat"])
            assert result.exit_code == 0
            lines = result.stdout.decode().split()
            assert lines[0] == "42"
            outputs.add(lines[1])
        # The snapshot's token no longer opens a restored VM's agent.
        r = httpx.post(f"{vm.agent_url}/exec", json={"args": ["true"]},
                       headers={"Authorization": f"Bearer {snapshot.token}"}, timeout=10)
        assert r.status_code == 401
        url, token = engine.agent_endpoint(vm.id)
        assert token != snapshot.token
    # Restored guests share the snapshot's memory image: the same agent process, started at the same tick.
    assert len(outputs) == 1
    # Writes in one VM stay in its own overlay.
    with engine.agent(second.id) as a, engine.agent(third.id) as b:
        a.put_file("/root/mine", b"second")
        assert b.exec(["test", "-e", "/root/mine"]).exit_code == 1
    # A restored guest's clock is the snapshot's; the token handover sets it to the host's. Here the guest
    # is given the clock of a years-old snapshot, then handed over again (its own token, unchanged).
    with engine.agent(second.id) as agent:
        assert agent.exec(["date", "-s", "@1000000000"]).exit_code == 0
        url, token = engine.agent_endpoint(second.id)
        where = httpx.URL(url)
        handover.rotate_token(where.host, where.port or 80, token, token)
        guest_now = int(agent.exec(["date", "+%s"]).stdout)
    assert abs(guest_now - time.time()) < 120, guest_now
    for vm in (first, second, third):
        assert await engine.destroy(vm.id)
        assert not engine.workdir(vm.id).exists()
    assert find_marked_processes(engine.tag) == {}


async def test_a_lost_engines_qemu_processes_are_reclaimed(services: Services, engine: VMEngine,
                                                           test_image: images.Image) -> None:
    vm = await engine.create(None, "cli")
    pid = find_marked_processes(engine.tag)[vm.id]
    successor = make_engine(services, test_image)
    counts = await successor.reconcile()
    assert counts["processes"] == 1 and counts["rows"] == 1 and counts["disks"] == 1
    assert find_marked_processes(engine.tag) == {}
    assert not (__import__("pathlib").Path(f"/proc/{pid}")).exists()
    row = await successor.get(vm.id)
    assert row is not None and row.status == "failed"
    assert await successor.get(uuid.uuid4()) is None


async def test_ten_vms_created_at_once_all_come_up(engine: VMEngine) -> None:
    import asyncio

    vms = await asyncio.gather(*(engine.create(None, "cli") for _ in range(10)))
    assert len({vm.id for vm in vms}) == 10 and all(vm.status == "running" for vm in vms)
    assert set(find_marked_processes(engine.tag)) == {vm.id for vm in vms}
    ports = set()
    for vm in vms:
        with engine.agent(vm.id) as agent:
            assert agent.exec(["true"]).exit_code == 0
        ports.add(vm.agent_url)
    assert len(ports) == 10
    await asyncio.gather(*(engine.destroy(vm.id) for vm in vms))
    assert find_marked_processes(engine.tag) == {}


QEMU_CRASHER = '''
import asyncio, sys, threading
from pathlib import Path
from polydev.config import Settings
from polydev.services import open_services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import handover, images
from polydev.vm.backends.qemu.backend import QemuBackend
from polydev.vm.backends.qemu.machine import QemuVM
from polydev.vm.engine import VMEngine

data, url, image_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
reached = threading.Event()
original = QemuVM._hand_over_token
calls = []

def hand_over(self, token, deadline):
    calls.append(1)
    if len(calls) == 3:  # the third VM: QEMU runs, the engine has not recorded it as running yet
        reached.set()
        threading.Event().wait()
    return original(self, token, deadline)

QemuVM._hand_over_token = hand_over

async def main():
    s = await open_services(Settings(POLYDEV_DATA_DIR=data, DATABASE_URL=url))
    backend = QemuBackend(images.Image.load(image_dir), data / "snapshots")
    e = VMEngine(backend=backend, vms=VmRepo(s.factory), cleanup=CleanupTaskRepo(s.factory),
                 leases=LeaseRepo(s.factory), data_dir=data, vcpus={"cli": 1, "browser": 1},
                 memory_mb={"cli": 1024, "browser": 1024})
    for _ in range(2):
        await e.create(None, "cli")
    task = asyncio.create_task(e.create(None, "cli"))
    await asyncio.to_thread(reached.wait)
    print("ready", flush=True)
    await task

asyncio.run(main())
'''


async def test_engine_sigkilled_with_real_vms_then_reconcile(services: Services, engine: VMEngine,
                                                             test_image: images.Image) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    backend = engine.backend
    assert isinstance(backend, QemuBackend)
    # Make the snapshot first, in this process, so the crasher only restores.
    await asyncio.to_thread(backend.ensure_snapshot, 1, 1024, f"polydev-{engine.tag}-{uuid.uuid4()}")
    proc = subprocess.Popen([sys.executable, "-c", QEMU_CRASHER, str(services.settings.data_dir),
                             services.settings.effective_database_url, str(test_image.dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or lines[-1] not in ("ready", ""):
        lines.append((await asyncio.to_thread(proc.stdout.readline)).strip())
    assert lines[-1] == "ready", lines
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Their supervisors end the VMs with the engine that started them: nothing could use them again.
    deadline = time.monotonic() + 120
    while find_marked_processes(engine.tag) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert find_marked_processes(engine.tag) == {}, "a QEMU process outlived its engine"
    # Their rows, disks and addresses are what the next start reconciles.
    assert sorted(r.status for r in await engine.vms.list()) == ["creating", "running", "running"]

    counts = await engine.reconcile()
    assert counts["processes"] == 0 and counts["rows"] == 3 and counts["disks"] == 3
    assert find_marked_processes(engine.tag) == {}
    assert await engine.list() == [] and not any(engine.vms_dir.iterdir())
    assert await engine.leases.held() == {}


# Inside the guest: two connections to the forwarded address open at once (the first waits half-sent while
# the second completes), then a probe of the host alias at a port that is not forwarded.
_FORWARD_PROBE = r'''
import json, socket, sys, urllib.request
first = socket.create_connection(("10.0.2.100", 80), timeout=20)
first.sendall(b"GET /first HTTP/1.0\r\n")
second = urllib.request.urlopen("http://10.0.2.100/second", timeout=20).read().decode()
first.sendall(b"\r\n")
reply = b""
while chunk := first.recv(65536):
    reply += chunk
try:
    socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=5).close()
    other = "reached"
except OSError as exc:
    other = type(exc).__name__
print(json.dumps({"first": reply.split(b"\r\n\r\n", 1)[1].decode(), "second": second, "other": other}))
'''


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _loopback_http() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_guest_forwards_reach_exactly_the_forwarded_host_services(
        services: Services, test_image: images.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session's image, whatever the guest code's digest is by now (from_settings looks it up by recipe).
    monkeypatch.setattr(images, "find", lambda cache_dir, recipe: test_image)
    with _loopback_http() as port, _loopback_http() as other_port:
        settings = Settings(POLYDEV_DATA_DIR=services.settings.data_dir, VM_IMAGE_PROFILE="test",
                            VM_GUEST_FORWARDS=f"10.0.2.100:80=127.0.0.1:{port}")
        backend = QemuBackend.from_settings(settings)
        engine = VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                          leases=LeaseRepo(services.factory), data_dir=settings.data_dir,
                          vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 1024, "browser": 1024})
        try:
            # The first VM's creation makes the snapshot (its template booted with the forwards); the second
            # is a plain restore: a fresh QEMU command line carries the forwards either way.
            for _ in range(2):
                vm = await engine.create(None, "cli")
                with engine.agent(vm.id, timeout=120) as agent:
                    result = agent.exec(["python3", "-c", _FORWARD_PROBE, str(other_port)], timeout_s=90)
                assert result.exit_code == 0, result.stderr.decode()[-2000:]
                seen = json.loads(result.stdout)
                assert seen["first"] == "hello /first" and seen["second"] == "hello /second"
                assert seen["other"] != "reached"  # restrict=on: a host port not forwarded stays shut
                await engine.destroy(vm.id)
            assert backend.snapshot_dir(1, 1024).exists()
        finally:
            await engine.close()
