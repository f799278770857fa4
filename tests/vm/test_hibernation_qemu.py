"""Hibernation with the real QEMU backend: a running VM saved to its work directory and ended, then woken by
the next engine on the same data directory (a server restart: a new server id, reconcile in between) as it
was: a background process still counting from where it stopped, a file intact, the same agent token."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import images
from polydev.vm.backends.qemu.backend import QemuBackend
from polydev.vm.engine import VMEngine, find_marked_processes
from polydev.vm.hibernation import HIBERNATED

pytest_plugins = ["tests.support.vm_fixtures"]

# The count is written to a side file and renamed: a reader never sees the file truncated but not yet written
# (a snapshot can be taken between the two, and then the first read after waking found it empty).
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /root/count.new; mv /root/count.new /root/count; sleep 0.2; done"


@pytest.fixture
def database_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'polydev.db'}"


def server_engine(services: Services, image: images.Image) -> VMEngine:
    """An engine as one start of a server makes it: its own server id."""
    backend = QemuBackend(image, services.settings.data_dir / "snapshots")
    return VMEngine(backend=backend, vms=VmRepo(services.factory, uuid.uuid4()),
                    cleanup=CleanupTaskRepo(services.factory), leases=LeaseRepo(services.factory),
                    data_dir=services.settings.data_dir, vcpus={"cli": 1}, memory_mb={"cli": 512})


@pytest.fixture
async def engines(services: Services, test_image: images.Image) -> AsyncIterator[list[VMEngine]]:
    made: list[VMEngine] = []
    yield made
    for engine in made:
        await engine.close()
    await server_engine(services, test_image).reconcile()


def count(engine: VMEngine, vm_id: uuid.UUID) -> int:
    with engine.agent(vm_id) as agent:
        return int(agent.exec(["cat", "/root/count"]).stdout.decode().strip() or 0)


async def test_a_hibernated_vm_wakes_in_the_next_server_as_it_was(services: Services, test_image: images.Image,
                                                                   engines: list[VMEngine]) -> None:
    first = server_engine(services, test_image)
    engines.append(first)
    vm = await first.create(None, "cli")
    with first.agent(vm.id) as agent:
        agent.put_file("/root/kept", b"intact")
        started = agent.exec(["sh", "-c", f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &"])
        assert started.exit_code == 0
    await asyncio.sleep(2)
    before = await asyncio.to_thread(count, first, vm.id)
    assert before > 0

    token = await first.hibernate(vm.id)
    row = await first.vms.get(vm.id)
    assert row is not None and row.status == HIBERNATED and row.backend_pid is None and row.expires_at is None
    assert vm.id not in find_marked_processes(first.tag)  # no process holds it now
    await first.close()  # a server stopping: the hibernated VM is not its to destroy

    second = server_engine(services, test_image)  # the next start, on the same data directory
    engines.append(second)
    found = await second.reconcile()
    assert found["adopted"] == 1 and found["disks"] == 0
    woken = await second.wake(vm.id, token, timedelta(minutes=10))
    assert woken.status == "running"
    with second.agent(vm.id) as agent:
        assert agent.get_file("/root/kept")[0] == b"intact"
    after = await asyncio.to_thread(count, second, vm.id)
    assert after >= before  # counting on from where it stopped, not started again
    await asyncio.sleep(1.5)
    assert await asyncio.to_thread(count, second, vm.id) > after  # and still counting
    assert await second.destroy(vm.id)
    assert not second.workdir(vm.id).exists()


async def test_a_vm_hibernated_before_an_image_switch_wakes_on_its_own_image(
        services: Services, test_image: images.Image, engines: list[VMEngine], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The engine switched to another image meanwhile (core/image_follow.py): the sleeping VM's disk and
    memory are of the old one, and its metadata names it. (The other image here is the same files under
    another name: the wake must take the one the VM's metadata names, not the backend's current one.)"""
    other_dir = tmp_path / "images" / "0ther1mage0000ff"
    other_dir.mkdir(parents=True)
    for name in (images.ROOTFS, images.KERNEL, images.INITRD, images.MANIFEST):
        (other_dir / name).symlink_to(test_image.dir / name)
    other = images.Image.load(other_dir)
    assert other is not None

    engine = server_engine(services, test_image)
    engines.append(engine)
    vm = await engine.create(None, "cli")
    with engine.agent(vm.id) as agent:
        agent.put_file("/root/kept", b"before the switch")
    token = await engine.hibernate(vm.id)
    await engine.switch_image(other)
    assert engine.describe().image_hash == other.hash
    await engine.wake(vm.id, token, timedelta(minutes=10))
    with engine.agent(vm.id) as agent:
        assert agent.get_file("/root/kept")[0] == b"before the switch"
    meta = json.loads((engine.workdir(vm.id) / "disk.json").read_text())
    assert meta["image"] == str(test_image.dir)  # its own image, not the one new VMs now get
    fresh = await engine.create(None, "cli")
    assert json.loads((engine.workdir(fresh.id) / "disk.json").read_text())["image"] == str(other.dir)
    assert await engine.destroy(vm.id) and await engine.destroy(fresh.id)
