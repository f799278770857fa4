"""The VM engine with VM_BACKEND=firecracker, end to end but for KVM: VMEngine drives FirecrackerBackend, which
drives the fake firecracker binary (every request checked against both API specifications; the fake runs the
real guest agent on each slot's loopback address). Rows, markers, snapshot reuse, token handover, destroy,
crash reclaim and failure paths are the engine's real ones."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.backends.firecracker.api import socket_alias
from polydev.vm.backends.firecracker.backend import FirecrackerBackend
from polydev.vm.backends.firecracker.process import FirecrackerProcess
from polydev.vm.engine import VMCreateError, VMEngine, find_marked_processes
from polydev.vm.network import EgressPolicy, Slot, SlotNetwork
from tests.support.firecracker_fake import LoopbackSlots, write_fake_binary
from tests.support.netns import POOL, agent_health, host_namespace, require_root_netns

ELF_KERNEL = b"\x7fELF" + b"\0" * 60


def make_backend(base: Path, *fake_args: str) -> FirecrackerBackend:
    base.mkdir(parents=True, exist_ok=True)
    kernel, rootfs = base / "vmlinux", base / "rootfs.ext4"
    kernel.write_bytes(ELF_KERNEL)
    with open(rootfs, "wb") as f:
        f.write(b"golden")
        f.truncate(32 * 1024 * 1024)
    binary = write_fake_binary(base / "firecracker", "--record", str(base / "requests.jsonl"), *fake_args)
    return FirecrackerBackend(binary=binary, kernel=kernel, rootfs=rootfs, snapshots_dir=base / "snapshots",
                              kvm_device=None)


def make_engine(services: Services, backend: FirecrackerBackend, slots: LoopbackSlots | SlotNetwork) -> VMEngine:
    return VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                    leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir,
                    network=slots,  # type: ignore[arg-type]
                    vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 256, "browser": 512})


@pytest.fixture
def slots() -> LoopbackSlots:
    return LoopbackSlots(net=random.randint(100, 250))


@pytest.fixture
async def engine(services: Services, slots: LoopbackSlots) -> AsyncIterator[VMEngine]:
    eng = make_engine(services, make_backend(services.settings.data_dir / "fc"), slots)
    yield eng
    await eng.close()
    await make_engine(services, make_backend(services.settings.data_dir / "fc"), slots).reconcile()
    assert find_marked_processes(eng.tag) == {}  # the run leaves no fake behind


def calls(base: Path) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in map(json.loads, (base / "requests.jsonl").read_text().splitlines())]


async def engine_health(engine: VMEngine, vm_id: object) -> int:
    def call() -> int:
        with engine.agent(vm_id) as agent:  # type: ignore[arg-type]
            return agent.health().protocol

    return await asyncio.to_thread(call)


async def test_vms_restore_from_one_snapshot_and_answer_with_their_own_tokens(
        engine: VMEngine, services: Services, slots: LoopbackSlots) -> None:
    a, b = await asyncio.gather(engine.create(None, "cli"), engine.create(None, "cli"))
    assert (a.status, a.backend, b.status) == ("running", "firecracker", "running")
    base = services.settings.data_dir / "fc"
    made = calls(base)
    assert made.count("PUT /snapshot/create") == 1 and made.count("PUT /actions") == 1  # one template boot
    assert made.count("PUT /snapshot/load") == 2
    assert {a.slot_index, b.slot_index} == slots.live == {0, 1}
    assert a.agent_url == f"http://{slots.address(a.slot_index).ns_ip}:8080"  # type: ignore[arg-type]
    assert await engine_health(engine, a.id) == await engine_health(engine, b.id) == 1

    procs = find_marked_processes(engine.tag)
    assert set(procs) == {a.id, b.id}
    rows = {r.vm_id: r for r in await engine.vms.list()}
    assert rows[a.id].backend_pid == procs[a.id]  # the pid the engine keeps is the marked process

    assert await engine.destroy(a.id) is True
    assert set(find_marked_processes(engine.tag)) == {b.id}
    assert not engine.workdir(a.id).exists() and slots.live == {b.slot_index}
    assert await engine_health(engine, b.id) == 1  # the other VM is untouched


async def test_reconcile_after_a_crash_kills_what_the_old_engine_left(
        engine: VMEngine, services: Services, slots: LoopbackSlots) -> None:
    vm = await engine.create(None, "cli")
    pid = find_marked_processes(engine.tag)[vm.id]
    # A new engine process: a fresh backend that never started this VM, as after SIGKILL and a restart.
    restarted = make_engine(services, make_backend(services.settings.data_dir / "fc"), slots)
    counts = await restarted.reconcile()
    assert counts["processes"] == 1 and counts["rows"] == 1 and counts["disks"] == 1
    assert vm.id not in find_marked_processes(engine.tag) and not Path(f"/proc/{pid}/cmdline").exists()
    alias = socket_alias(engine.workdir(vm.id) / FirecrackerProcess.SOCKET_NAME)
    assert alias is None or not alias.is_symlink()  # a deep data directory's socket alias went too
    row = await restarted.get(vm.id)
    assert row is not None and row.status == "failed"


async def test_a_failed_restore_is_a_clean_failure_with_its_console_kept(
        services: Services, slots: LoopbackSlots) -> None:
    base = services.settings.data_dir / "fc-bad"
    backend = make_backend(base, "--fault", "PUT /snapshot/load=400:Failed to restore: bad snapshot")
    eng = make_engine(services, backend, slots)
    try:
        with pytest.raises(VMCreateError, match="bad snapshot") as caught:
            await eng.create(None, "cli")
        err = caught.value
        assert err.console_log is not None and "fake firecracker" in err.console_log.read_text()
        assert find_marked_processes(eng.tag) == {} and slots.live == set()
        assert not eng.workdir(err.vm_id).exists()
        row = await eng.get(err.vm_id)
        assert row is not None and row.status == "failed" and "bad snapshot" in (row.error or "")
    finally:
        await eng.close()


async def test_a_failed_template_boot_keeps_the_templates_console(services: Services, slots: LoopbackSlots) -> None:
    backend = make_backend(services.settings.data_dir / "fc-tpl", "--fault", "PUT /actions=400:Kernel loader: bad ELF")
    eng = make_engine(services, backend, slots)
    try:
        with pytest.raises(VMCreateError, match="bad ELF") as caught:
            await eng.create(None, "cli")
        assert caught.value.console_log is not None
        kept = caught.value.console_log.read_text()
        assert "=== snapshot template boot ===" in kept and "fake firecracker" in kept
        assert find_marked_processes(eng.tag) == {} and list(backend.snapshots_dir.iterdir()) == [
            backend.snapshots_dir / f".lock-{backend.snapshot_dir(1, 256).name}"]  # no half-made snapshot
    finally:
        await eng.close()


class EmulatedGuestSlots(SlotNetwork):
    """Real slots whose guest is a namespace (a veth named like the TAP leads to it), where the fake runs the
    agent: the whole tap-mode path (namespaces, nftables DNAT, handover from the host's namespace) but KVM."""

    def create(self, index: int, egress: EgressPolicy | None = None, guest: str = "tap") -> Slot:  # type: ignore[override]
        return super().create(index, egress, guest="emulated")


async def test_tap_mode_in_real_network_slots(services: Services) -> None:
    require_root_netns()
    backend = make_backend(services.settings.data_dir / "fc-tap", "--agent-host", "0.0.0.0", "--guest-netns")
    with host_namespace() as prefix:
        host = f"{prefix}-host"
        network = EmulatedGuestSlots(*POOL, prefix=prefix, host_netns=host)
        eng = make_engine(services, backend, network)
        try:
            a, b = await eng.create(None, "cli"), await eng.create(None, "cli")
            for vm in (a, b):
                url, token = eng.agent_endpoint(vm.id)
                assert agent_health(url, token, host)["protocol"] == 1  # through the slot, its own token
                # Firecracker ran inside its slot's namespace (where the TAP is), by the slot's prefix.
                pid = find_marked_processes(eng.tag)[vm.id]
                slot_ns = f"/run/netns/{network.names(vm.slot_index)[0]}"  # type: ignore[arg-type]
                assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(slot_ns).st_ino
            made = calls(services.settings.data_dir / "fc-tap")
            assert made.count("PUT /snapshot/create") == 1 and made.count("PUT /snapshot/load") == 2
        finally:
            await eng.close()
            await eng.reconcile()
        assert find_marked_processes(eng.tag) == {} and await asyncio.to_thread(network.existing) == set()
