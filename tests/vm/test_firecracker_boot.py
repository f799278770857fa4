"""Real boots under Firecracker. They run where all of these exist, and skip naming the missing one elsewhere:
- FIRECRACKER_BINARY: an executable firecracker (default /usr/local/bin/firecracker);
- a /dev/kvm that answers the KVM API (Firecracker has no software emulation);
- FIRECRACKER_GOLDEN_KERNEL: an uncompressed ELF vmlinux built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y
  and virtio-blk/ext4 built in (Debian's kernel is a bzImage with modules, so it cannot serve);
- FIRECRACKER_GOLDEN_ROOTFS: the golden ext4 image (`polydev image build`), whose init starts the agent.

What a run proves: the guest boots from our requests to the agent's READY line on the serial console; the API
reports the machine we asked for; pause/resume work; a snapshot taken with the agent running restores in a
fresh Firecracker process; and after stop() no process or socket is left. Those VMs have no NIC, so they run
without root. The engine test (root and nftables too, for tap mode) boots through `VMEngine` with
`FirecrackerBackend` in network slots of a namespace it creates: a template boot, a snapshot, two restores in
two slots, each agent answering its own token through its slot, and nothing left after destroy and reconcile.
Without a firecracker binary (as on the development machine) everything here skips, saying which piece is
missing; tests/integration/test_firecracker_engine.py runs the same engine paths against the fake binary.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from polydev import protocol as p
from polydev.config import Settings
from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm.backends.firecracker.backend import FirecrackerBackend
from polydev.vm.backends.firecracker.checks import kernel_problem, unavailable_reason
from polydev.vm.backends.firecracker.config import (
    DEFAULT_BOOT_ARGS,
    SnapshotFiles,
    VMConfig,
)
from polydev.vm.backends.firecracker.process import FirecrackerProcess
from polydev.vm.engine import VMEngine, find_marked_processes
from polydev.vm.network import SlotNetwork
from tests.support.netns import POOL, agent_health, host_namespace, require_root_netns

READY_TIMEOUT_S = 60.0  # generous: a KVM boot takes about a second, but CI machines can be slow


def _requirements() -> tuple[Path, Path, Path]:
    settings = Settings()
    reason = unavailable_reason(settings.firecracker_binary)
    if reason:
        pytest.skip(f"no real Firecracker run here: {reason}")
    kernel, rootfs = settings.firecracker_golden_kernel, settings.firecracker_golden_rootfs
    if kernel is None:
        pytest.skip("FIRECRACKER_GOLDEN_KERNEL is not set (an uncompressed vmlinux with virtio-mmio cmdline devices)")
    if (problem := kernel_problem(kernel)) is not None:
        pytest.skip(problem)
    if rootfs is None or not rootfs.is_file():
        pytest.skip(f"FIRECRACKER_GOLDEN_ROOTFS is not set or missing ({rootfs})")
    return settings.firecracker_binary, kernel, rootfs


@pytest.fixture
def real(tmp_path: Path) -> tuple[Path, VMConfig]:
    binary, kernel, golden = _requirements()
    from polydev.vm.images import INIT_PATH  # only where a boot will happen

    rootfs = tmp_path / "rootfs.ext4"
    # A per-VM writable copy: a reflink where the file system has them, a sparse copy otherwise.
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(golden), str(rootfs)], check=True)
    boot_args = " ".join([DEFAULT_BOOT_ARGS, f"init={INIT_PATH}", f"{p.CMDLINE_TOKEN}={secrets.token_urlsafe(16)}"])
    return binary, VMConfig(kernel=kernel, rootfs=rootfs, vcpus=1, mem_mib=512, boot_args=boot_args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_boot_pause_resume_and_stop(real: tuple[Path, VMConfig], tmp_path: Path) -> None:
    binary, config = real
    vm = FirecrackerProcess(tmp_path / "vm", binary=binary)
    async with vm:
        await vm.boot(config)
        await vm.wait_ready(READY_TIMEOUT_S)
        info = await vm.client.describe_instance()
        assert info.state == "Running"
        machine = await vm.client.get_machine_config()
        assert (machine.vcpu_count, machine.mem_size_mib) == (1, 512)
        await vm.pause()
        assert (await vm.client.describe_instance()).state == "Paused"
        await vm.resume()
        assert (await vm.client.describe_instance()).state == "Running"
        pid = vm.pid
    assert pid is not None and not _alive(pid)
    assert not vm.socket_path.exists()
    assert p.READY_MARKER in vm.console_log.read_text(errors="replace")


async def test_snapshot_restores_in_a_fresh_process(real: tuple[Path, VMConfig], tmp_path: Path) -> None:
    binary, config = real
    snap = SnapshotFiles(tmp_path / "snap" / "vm.state", tmp_path / "snap" / "vm.mem")
    async with FirecrackerProcess(tmp_path / "a", binary=binary) as vm:
        await vm.boot(config)
        await vm.wait_ready(READY_TIMEOUT_S)
        await vm.snapshot(snap, resume=False)
    assert snap.memory.stat().st_size >= 512 * 1024 * 1024  # the whole guest memory was written
    async with FirecrackerProcess(tmp_path / "b", binary=binary) as clone:
        await clone.restore(snap, resume=True)
        assert (await clone.client.describe_instance()).state == "Running"
        assert (await clone.client.get_machine_config()).mem_size_mib == 512


async def test_engine_creates_firecracker_vms_from_one_snapshot(services: Services) -> None:
    _binary, kernel, rootfs = _requirements()
    require_root_netns()
    settings = services.settings.model_copy(update={
        "vm_backend": "firecracker", "network_mode": "tap", "firecracker_golden_kernel": kernel,
        "firecracker_golden_rootfs": rootfs})
    backend = FirecrackerBackend.from_settings(settings)
    with host_namespace() as prefix:
        host = f"{prefix}-host"
        engine = VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                          leases=LeaseRepo(services.factory), data_dir=settings.data_dir,
                          network=SlotNetwork(*POOL, prefix=prefix, host_netns=host),
                          vcpus={"cli": 1, "browser": 1}, memory_mb={"cli": 512, "browser": 512})
        try:
            first = await engine.create(None, "cli")  # boots the template, snapshots it, restores
            second = await engine.create(None, "cli")  # restores only
            assert (first.backend, first.slot_index != second.slot_index) == ("firecracker", True)
            for vm in (first, second):
                url, token = engine.agent_endpoint(vm.id)
                assert agent_health(url, token, host)["protocol"] == p.PROTOCOL_VERSION
            assert len(list(backend.snapshots_dir.glob("*/meta.json"))) == 1
        finally:
            await engine.close()
            await engine.reconcile()
        assert find_marked_processes(engine.tag) == {}
