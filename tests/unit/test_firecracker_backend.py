"""FirecrackerBackend (the engine's `Backend`) driving the fake Firecracker binary, which plays the guest too:
it runs the real guest agent on the slot's (loopback) address with the token the kernel command line carried.

Every request the backend sends is checked against both specifications by the fake (a violation is a 400,
so the start fails) and again here, with its method, path and body."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev import protocol as p
from polydev.config import Settings
from polydev.vm import network
from polydev.vm.agent_client import AgentClient, AgentError
from polydev.vm.backends import BackendUnavailable, create_backend
from polydev.vm.backends.firecracker import backend as fcb
from polydev.vm.backends.firecracker.backend import (
    FirecrackerBackend,
    Snapshot,
    boot_args,
)
from polydev.vm.backends.firecracker.checks import NEEDS_TAP, kvm_problem
from polydev.vm.backends.firecracker.errors import FirecrackerAPIError, FirecrackerError
from polydev.vm.backends.firecracker.jailer import JailerConfig
from polydev.vm.engine import VMSpec, find_marked_processes, marker_for
from tests.support.firecracker_fake import (
    LoopbackSlot,
    LoopbackSlots,
    Request,
    write_fake_binary,
)
from tests.support.firecracker_spec import Spec, load_specs

ELF_KERNEL = b"\x7fELF" + b"\0" * 60
TAG = "fcunit00"


@pytest.fixture(scope="session")
def specs() -> list[Spec]:
    return load_specs()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcb-", dir="/tmp"))
    yield path
    for pid in find_marked_processes(TAG).values():  # a failed test must not leave fakes running
        subprocess.run(["kill", "-9", str(pid)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def slots() -> LoopbackSlots:
    return LoopbackSlots(net=random.randint(100, 250))


def files(directory: Path) -> tuple[Path, Path, Path]:
    binary = write_fake_binary(directory / "firecracker", "--record", str(directory / "requests.jsonl"))
    kernel = directory / "vmlinux"
    kernel.write_bytes(ELF_KERNEL)
    rootfs = directory / "rootfs.ext4"
    with open(rootfs, "wb") as f:  # 64 MiB, almost all of it a hole
        f.write(b"golden")
        f.truncate(64 * 1024 * 1024)
    return binary, kernel, rootfs


def make_backend(directory: Path, **kw: object) -> FirecrackerBackend:
    binary, kernel, rootfs = files(directory)
    return FirecrackerBackend(binary=binary, kernel=kernel, rootfs=rootfs, snapshots_dir=directory / "snapshots",
                              kvm_device=None, **kw)  # type: ignore[arg-type]


def spec_for(directory: Path, slot: LoopbackSlot | None, memory_mb: int = 256) -> VMSpec:
    vm_id = uuid.uuid4()
    workdir = directory / "vms" / str(vm_id)
    workdir.mkdir(parents=True)
    return VMSpec(vm_id, "cli", 1, memory_mb, workdir, f"tok-{uuid.uuid4().hex}", marker_for(TAG, vm_id), slot)


def recorded(directory: Path) -> list[Request]:
    return [Request(**json.loads(line)) for line in (directory / "requests.jsonl").read_text().splitlines()]


def calls(requests: list[Request]) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests]


def assert_conforms(specs: list[Spec], requests: list[Request]) -> None:
    assert requests
    for spec in specs:
        for r in requests:
            assert spec.violations(r.method, r.path, r.body) == [], (spec.version, r)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def health(url: str, token: str) -> p.Health:
    def call() -> p.Health:
        with AgentClient(url, token, timeout=5) as agent:
            return agent.health()

    return await asyncio.to_thread(call)


async def refused(url: str, token: str) -> int:
    try:
        await health(url, token)
    except AgentError as exc:
        return exc.status
    return 200


BOOT_CALLS = ["PUT /logger", "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
              "PUT /network-interfaces/eth0", "PUT /actions"]


async def test_cold_boot_start_and_stop(short_dir: Path, specs: list[Spec], slots: LoopbackSlots) -> None:
    backend = make_backend(short_dir, snapshots=False)
    spec = spec_for(short_dir, slots.create(0))
    started = await backend.start(spec)

    assert started.agent_url == f"http://{slots.address(0).ns_ip}:{p.AGENT_PORT}"
    assert alive(started.pid) and find_marked_processes(TAG) == {spec.vm_id: started.pid}
    assert (await health(started.agent_url, spec.token)).protocol == p.PROTOCOL_VERSION
    requests = recorded(short_dir)
    assert calls(requests) == BOOT_CALLS
    bodies = [r.body for r in requests]
    assert bodies[0] == {"log_path": "firecracker.log", "level": "Warning"}
    assert bodies[1] == {"vcpu_count": 1, "mem_size_mib": 256}
    assert bodies[2] == {"kernel_image_path": str(backend.kernel.resolve()), "boot_args": boot_args(spec.token)}
    assert f"{p.CMDLINE_TOKEN}={spec.token}" in bodies[2]["boot_args"] and " quiet " in bodies[2]["boot_args"]
    # Relative to the work directory (Firecracker's cwd): the same name in every VM, so snapshots carry over.
    assert bodies[3] == {"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": True,
                         "is_read_only": False}
    assert bodies[4] == {"iface_id": "eth0", "host_dev_name": network.TAP, "guest_mac": network.GUEST_MAC}
    assert bodies[5] == {"action_type": "InstanceStart"}
    assert_conforms(specs, requests)
    disk = spec.workdir / "rootfs.ext4"
    assert disk.read_bytes()[:6] == b"golden" and disk.stat().st_blocks * 512 < 1024 * 1024  # a sparse copy

    await backend.stop(started.pid, spec.workdir)
    assert not alive(started.pid) and find_marked_processes(TAG) == {}
    await backend.stop(started.pid, spec.workdir)  # idempotent
    console = backend.console_log(spec.workdir).read_text()
    assert p.READY_MARKER in console and "Kernel command line:" in console
    assert spec.token not in console and "[redacted]" in console  # the chatty fake kernel printed it


async def test_snapshot_once_then_every_vm_restores_with_its_own_token(
        short_dir: Path, specs: list[Spec], slots: LoopbackSlots) -> None:
    backend = make_backend(short_dir)
    first, second = spec_for(short_dir, slots.create(0)), spec_for(short_dir, slots.create(1))
    a = await backend.start(first)
    snapshot = Snapshot(backend.snapshot_dir(1, 256))
    template_token = snapshot.token
    b = await backend.start(second)
    try:
        requests = recorded(short_dir)
        # The template: a cold boot, paused and frozen, never resumed. Then one fresh process per VM that
        # only loads the snapshot: nothing is configured before a load.
        assert calls(requests) == [*BOOT_CALLS, "PATCH /vm", "PUT /snapshot/create",
                                   "PUT /logger", "PUT /snapshot/load", "PUT /logger", "PUT /snapshot/load"]
        assert requests[6].body == {"state": "Paused"}
        work = snapshot.directory.with_name(snapshot.directory.name + ".tmp")  # renamed once complete
        assert requests[7].body == {"snapshot_path": str(work / "vm.state"), "mem_file_path": str(work / "vm.mem"),
                                    "snapshot_type": "Full"}
        load = {"snapshot_path": str(snapshot.files.state), "resume_vm": True,
                "mem_backend": {"backend_type": "File", "backend_path": str(snapshot.files.memory)}}
        assert requests[9].body == load and requests[11].body == load
        assert f"{p.CMDLINE_TOKEN}={template_token}" in requests[2].body["boot_args"]
        assert_conforms(specs, requests)

        # Each restored agent took its own token over POST /token; the template's no longer opens either.
        assert (await health(a.agent_url, first.token)).protocol == p.PROTOCOL_VERSION
        assert (await health(b.agent_url, second.token)).protocol == p.PROTOCOL_VERSION
        assert await refused(a.agent_url, template_token) == 401
        assert await refused(b.agent_url, first.token) == 401
        # No VM's token is in the snapshot, and the snapshot's secrets are private.
        for path in snapshot.directory.iterdir():
            content = path.read_bytes()
            assert first.token.encode() not in content and second.token.encode() not in content, path
        assert (snapshot.directory / "template.token").stat().st_mode & 0o777 == 0o600
        assert snapshot.disk.stat().st_mode & 0o777 == 0o400
        assert (second.workdir / "rootfs.ext4").read_bytes()[:6] == b"golden"
        for spec in (first, second):
            assert spec.token not in backend.console_log(spec.workdir).read_text()
        assert set(find_marked_processes(TAG)) == {first.vm_id, second.vm_id}
    finally:
        await backend.stop(a.pid, first.workdir)
        await backend.stop(b.pid, second.workdir)
    assert not alive(a.pid) and not alive(b.pid) and find_marked_processes(TAG) == {}


async def test_a_failed_restore_leaves_no_process(short_dir: Path, slots: LoopbackSlots) -> None:
    backend = make_backend(short_dir)
    ok = spec_for(short_dir, slots.create(0))
    started = await backend.start(ok)  # makes the snapshot
    await backend.stop(started.pid, ok.workdir)
    backend.binary = write_fake_binary(short_dir / "firecracker-faulty", "--fault",
                                       "PUT /snapshot/load=400:Cannot restore: bad memory file")
    bad = spec_for(short_dir, slots.create(1))
    snapshot = Snapshot(backend.snapshot_dir(1, 256))
    assert snapshot.files.memory.exists()
    with pytest.raises(FirecrackerAPIError, match="bad memory file"):
        await backend.start(bad)
    assert find_marked_processes(TAG) == {}
    assert not snapshot.directory.exists()  # refused by Firecracker: made afresh by the next start
    await backend.stop(None, bad.workdir)  # what the engine does next: harmless


async def test_a_restored_agent_that_refuses_the_handover_fails_the_start(short_dir: Path,
                                                                         slots: LoopbackSlots) -> None:
    backend = make_backend(short_dir)
    ok = spec_for(short_dir, slots.create(0))
    started = await backend.start(ok)
    await backend.stop(started.pid, ok.workdir)
    # A template token the frozen agent does not hold: the handover is refused (401), and that is final.
    (Snapshot(backend.snapshot_dir(1, 256)).directory / "template.token").write_text("wrong")
    spec = spec_for(short_dir, slots.create(1))
    with pytest.raises(FirecrackerError, match="refused its new token .*401"):
        await backend.start(spec)
    assert find_marked_processes(TAG) == {}


async def test_start_needs_a_network_slot(short_dir: Path) -> None:
    backend = make_backend(short_dir)
    with pytest.raises(BackendUnavailable, match="NETWORK_MODE=tap"):
        await backend.start(spec_for(short_dir, None))
    assert not (short_dir / "requests.jsonl").exists()  # nothing was started


async def test_stop_of_a_vm_from_an_earlier_engine_process(short_dir: Path, slots: LoopbackSlots) -> None:
    spec = spec_for(short_dir, slots.create(0))
    started = await make_backend(short_dir, snapshots=False).start(spec)
    fresh = make_backend(short_dir, snapshots=False)  # knows nothing of the VM: only its pid and work directory
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],  # noqa: ASYNC220
                                start_new_session=True)
    try:
        await fresh.stop(stranger.pid, short_dir / "vms" / str(uuid.uuid4()))
        assert stranger.poll() is None  # a pid that is not that VM's (stale, reused) is left alone
        await fresh.stop(started.pid, spec.workdir)
        assert not alive(started.pid) and find_marked_processes(TAG) == {}
    finally:
        stranger.kill()
        stranger.wait()


async def test_under_the_jailer_every_vm_names_its_disk_from_the_jail_root(
        short_dir: Path, specs: list[Spec], slots: LoopbackSlots) -> None:
    jailer_bin = write_fake_binary(short_dir / "jailer", sub_command="jailer")
    jail_base = short_dir / "j"
    # As root, a uid of its own, as in production (the fake jailer does not drop privileges, so it still works).
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    jailer = JailerConfig(binary=jailer_bin, uid=uid, gid=uid, chroot_base_dir=jail_base, new_pid_ns=True)
    backend = make_backend(short_dir, jailer=jailer)
    spec = spec_for(short_dir, slots.create(0))
    started = await backend.start(spec)
    assert (await health(started.agent_url, spec.token)).protocol == p.PROTOCOL_VERSION
    assert find_marked_processes(TAG)[spec.vm_id] == started.pid  # the VMM the jailer left running
    jailed_disk = jail_base / "firecracker" / spec.marker / "root" / "rootfs.ext4"
    assert jailed_disk.samefile(spec.workdir / "rootfs.ext4")  # a link, not a copy
    assert jailed_disk.stat().st_uid == uid  # the restored VMM opens it as the jail's user
    await backend.stop(started.pid, spec.workdir)
    assert not alive(started.pid) and find_marked_processes(TAG) == {}
    assert list((jail_base / "firecracker").iterdir()) == []  # template's and VM's jails are gone

    requests = recorded(short_dir)
    drives = [r.body["path_on_host"] for r in requests if r.path == "/drives/rootfs"]
    assert drives == ["/rootfs.ext4"]
    create = next(r.body for r in requests if r.path == "/snapshot/create")
    assert create == {"snapshot_path": "/snapshot.state", "mem_file_path": "/snapshot.mem", "snapshot_type": "Full"}
    assert Snapshot(backend.snapshot_dir(1, 256)).files.memory.exists()  # moved out of the template's jail
    assert_conforms(specs, requests)


# -- create_backend --------------------------------------------------------------------------------------


def settings(directory: Path, **kw: object) -> Settings:
    values: dict[str, object] = {"POLYDEV_DATA_DIR": directory / "data", "POLYDEV_CACHE_DIR": directory / "cache",
                                 "vm_backend": "firecracker"}
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


def test_create_backend_names_everything_missing(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fcb, "kvm_problem", lambda: "cannot open /dev/kvm: No such file or directory")
    with pytest.raises(BackendUnavailable) as caught:
        create_backend(settings(short_dir, firecracker_binary=short_dir / "nope", network_mode="user"))
    message = str(caught.value)
    assert "no firecracker binary at" in message and "FIRECRACKER_GOLDEN_KERNEL is not set" in message
    assert "no full image in" in message and NEEDS_TAP in message
    assert "cannot open /dev/kvm" in message  # beside a missing binary, not hidden by it

    bzimage = short_dir / "vmlinuz"
    bzimage.write_bytes(b"MZ" + b"\0" * 62)
    with pytest.raises(BackendUnavailable, match="not an uncompressed ELF vmlinux"):
        create_backend(settings(short_dir, firecracker_golden_kernel=bzimage, network_mode="tap"))


def test_create_backend_selects_firecracker(short_dir: Path) -> None:
    binary, kernel, rootfs = files(short_dir)
    config = settings(short_dir, firecracker_binary=binary, firecracker_golden_kernel=kernel,
                      firecracker_golden_rootfs=rootfs, network_mode="tap")
    kvm = kvm_problem()
    if kvm is not None:  # a machine without KVM: that is then the one reason given
        with pytest.raises(BackendUnavailable, match=re.escape(kvm)):
            create_backend(config)
        return
    backend = create_backend(config)
    assert isinstance(backend, FirecrackerBackend) and backend.name == "firecracker"
    assert (backend.binary, backend.kernel, backend.rootfs, backend.jailer) == (binary, kernel, rootfs, None)

    with pytest.raises(BackendUnavailable, match="needs FIRECRACKER_JAILER_UID and FIRECRACKER_JAILER_GID"):
        create_backend(config.model_copy(update={"firecracker_jailer": binary}))
    jailed = create_backend(config.model_copy(update={"firecracker_jailer": binary, "firecracker_jailer_uid": 123,
                                                      "firecracker_jailer_gid": 124}))
    assert isinstance(jailed, FirecrackerBackend) and jailed.jailer is not None
    assert (jailed.jailer.uid, jailed.jailer.gid, jailed.jailer.chroot_base_dir) == (123, 124, config.firecracker_base)
