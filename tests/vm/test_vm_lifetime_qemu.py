"""No QEMU process outlives its VM's time, whether or not a server runs (polydev.vm.supervisor): not a server
killed with SIGKILL, not its expiry with nobody reaping, not its work directory; and a server stopped with
SIGTERM, or a creation cancelled, while VMs are still being created leaves none running."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import images
from polydev.vm.backends.qemu.backend import QemuBackend
from polydev.vm.engine import VMEngine, engine_tag, find_marked_processes, marker_for
from polydev.vm.proc import process_gone
from polydev.vm.types import VMSpec
from tests.support.live_server import LiveServer, start_server
from tests.support.waits import eventually

pytest_plugins = ["tests.support.vm_fixtures"]


@pytest.fixture(params=["sqlite"])  # the engine's SQL is covered on both databases by tests/integration
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'polydev.db'}"


@pytest.fixture
async def engine(services: Services, test_image: images.Image) -> AsyncIterator[VMEngine]:
    """An engine with no reaper running: what ends a VM here is its supervisor."""
    def make() -> VMEngine:
        backend = QemuBackend(test_image, services.settings.data_dir / "snapshots")
        return VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                        leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir,
                        vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 1024, "browser": 1024})

    eng = make()
    yield eng
    await eng.close()
    await make().reconcile()
    assert find_marked_processes(eng.tag) == {}


async def made_snapshot(engine: VMEngine) -> None:
    """The snapshot made first, so that creating a VM is a restore of a second or two, well within its ttl."""
    backend = engine.backend
    assert isinstance(backend, QemuBackend)
    await asyncio.to_thread(backend.ensure_snapshot, 1, 1024, marker_for(engine.tag, uuid.uuid4()))


async def test_the_supervisor_ends_a_vm_at_its_expiry_and_follows_the_expiry_as_it_moves(engine: VMEngine) -> None:
    await made_snapshot(engine)
    short = await engine.create(None, "cli", ttl=timedelta(seconds=15))
    kept = await engine.create(None, "cli", ttl=timedelta(seconds=15))
    await engine.assign(kept.id, None, timedelta(minutes=10))  # its expiry moves on
    pid = find_marked_processes(engine.tag)[short.id]
    assert await asyncio.to_thread(eventually, lambda: process_gone(pid))
    assert "expired at" in (engine.workdir(short.id) / "qemu.stderr").read_text()
    # The other VM's first expiry has passed too (it was given the same one, later): it runs on and answers.
    assert kept.id in find_marked_processes(engine.tag)
    with engine.agent(kept.id) as agent:
        assert agent.exec(["true"]).exit_code == 0


async def test_removing_a_vms_work_directory_ends_it(engine: VMEngine) -> None:
    vm = await engine.create(None, "cli")
    pid = find_marked_processes(engine.tag)[vm.id]
    shutil.rmtree(engine.workdir(vm.id))
    assert await asyncio.to_thread(eventually, lambda: process_gone(pid))
    assert vm.id not in find_marked_processes(engine.tag)


async def test_a_cancelled_creation_leaves_no_vm_once_its_start_has_ended(
        engine: VMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    await made_snapshot(engine)
    # QEMU's start runs in a thread, which a cancel does not stop: this one waits until the cancel is in.
    entered, release, ended = threading.Event(), threading.Event(), threading.Event()
    specs: list[VMSpec] = []
    start = QemuBackend._start

    def held_start(self: QemuBackend, spec: VMSpec):  # type: ignore[no-untyped-def]
        try:
            specs.append(spec)
            entered.set()
            release.wait(120)
            return start(self, spec)
        finally:
            ended.set()

    monkeypatch.setattr(QemuBackend, "_start", held_start)
    creating = asyncio.create_task(engine.create(None, "cli"))
    assert await asyncio.to_thread(entered.wait, 120)
    creating.cancel()
    [spec] = specs
    assert spec.deadline is not None
    # The thread goes on once the cancel has reached the backend (or, were it not waited for, has ended the
    # creation: the thread would then start a VM that nothing stops).
    while spec.deadline.exists() and not creating.done():
        await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert await asyncio.to_thread(ended.wait, 300)  # the thread has done all it will do
    assert spec.vm_id not in find_marked_processes(engine.tag)
    assert not spec.workdir.exists()
    row = await engine.get(spec.vm_id)
    assert row is not None and row.status == "failed"


# -- with a server process ---------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, test_image: images.Image) -> Iterator[LiveServer]:
    env = {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
           "VM_CLI_MEMORY_MB": "1024", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0"}
    running = start_server(tmp_path, "polydev", env)
    try:
        yield next(running)
    finally:
        running.close()


def vm_rows(server: LiveServer) -> list[tuple[str, str]]:
    with sqlite3.connect(server.data_dir / "polydev.db") as db:
        return [(str(vm_id), status) for vm_id, status in db.execute("SELECT vm_id, status FROM vms")]


def test_a_server_killed_with_sigkill_leaves_no_vm_running(server: LiveServer) -> None:
    tag = engine_tag(server.data_dir)
    h = {"Authorization": f"Bearer {server.admin_token}"}
    ids = []
    # The first VM makes the snapshot (longer than the second's ttl); the second is a restore, given 10 s.
    for body in ({"purpose": "cli"}, {"purpose": "cli", "ttl_seconds": 10}):
        r = httpx.post(f"{server.url}/api/vms", json=body, headers=h, timeout=600)
        assert r.status_code == 201, r.text
        ids.append(uuid.UUID(r.json()["id"]))
    pids = [find_marked_processes(tag)[vm_id] for vm_id in ids]
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    # Nothing reaps, and no server starts again: the QEMU processes go all the same, with their server (so
    # before their expiry, past which nothing could have used them either: their tokens were the server's).
    assert eventually(lambda: all(process_gone(pid) for pid in pids))
    assert find_marked_processes(tag) == {}


def test_sigterm_while_vms_are_being_created_leaves_none_running(server: LiveServer) -> None:
    tag = engine_tag(server.data_dir)
    h = {"Authorization": f"Bearer {server.admin_token}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
        for provider in ("codex", "gemini_cli"):  # one run per credential
            assert c.put(f"/api/credentials/{provider}/api-key", json={"api_key": "not-a-real-key"}).is_success
            r = c.post("/api/runs", json={"provider": provider, "prompt": "hello"})
            assert r.status_code == 202, r.text
    # A fresh data directory: the first VM makes the snapshot, so both are being created for a while, one
    # with its snapshot's template running.
    assert eventually(lambda: bool(find_marked_processes(tag))
                      and any(status == "creating" for _, status in vm_rows(server)))
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=600)  # (uvicorn ends by raising the signal again once it has shut down)
    assert "Application shutdown complete" in server.log.read_text()
    assert find_marked_processes(tag) == {}
    rows = vm_rows(server)
    assert rows and all(status in ("failed", "destroyed") for _, status in rows), rows
