"""Contract tests of the Firecracker backend: every request it sends must conform to BOTH published API
specifications (v1.13.2, the seed's release, and v1.16.1, the newest stable one).

The client talks to a fake Firecracker on a Unix socket (tests/support/firecracker_fake.py) that records each request
and answers like Firecracker, including its 400s with a fault_message. The driver tests run the same fake as
a `firecracker` binary (and a fake `jailer`), so spawning, the socket wait, cleanup and jail paths are real.
No test here needs KVM or a real Firecracker; tests/vm/test_firecracker_boot.py does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pydantic
import pytest

from polydev.vm.backends.firecracker.api import (
    UNIX_PATH_MAX,
    BootSource,
    Drive,
    DriveUpdate,
    FirecrackerClient,
    Logger,
    MachineConfig,
    MemoryBackend,
    Metrics,
    NetworkInterface,
    NetworkOverride,
    SnapshotCreate,
    SnapshotLoad,
    Vsock,
)
from polydev.vm.backends.firecracker.checks import check_available, kernel_problem, unavailable_reason
from polydev.vm.backends.firecracker.config import (
    DEFAULT_BOOT_ARGS,
    DriveSpec,
    SnapshotFiles,
    VMConfig,
)
from polydev.vm.backends.firecracker.errors import (
    FirecrackerAPIError,
    FirecrackerError,
    FirecrackerProcessError,
    FirecrackerUnavailable,
)
from polydev.vm.backends.firecracker.jailer import JailerConfig
from polydev.vm.backends.firecracker.process import FirecrackerProcess
from tests.support.firecracker_fake import (
    CONSOLE_LINE,
    FakeFirecracker,
    Request,
    write_fake_binary,
)
from tests.support.firecracker_spec import SPEC_FILES, Spec, load_specs

ELF_KERNEL = b"\x7fELF" + b"\0" * 60


@pytest.fixture(scope="session")
def specs() -> list[Spec]:
    try:
        return load_specs()
    except FileNotFoundError as exc:
        # Not a skip: without the specs these tests would prove nothing, and a green run must mean they ran.
        pytest.fail(f"Firecracker API specifications not found: {exc}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets: sun_path holds 107 bytes and pytest's tmp_path can be long."""
    path = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(specs: list[Spec], short_dir: Path) -> AsyncIterator[FakeFirecracker]:
    async with FakeFirecracker(short_dir / "api.sock", specs) as server:
        yield server
    # Every request any test sent through the fake must have conformed, whatever the test asserted.
    assert server.violations == []


@pytest.fixture
async def client(fake: FakeFirecracker) -> AsyncIterator[FirecrackerClient]:
    async with FirecrackerClient(fake.socket_path) as c:
        yield c


@pytest.fixture
def vm_files(tmp_path: Path) -> VMConfig:
    kernel, rootfs, data = tmp_path / "vmlinux", tmp_path / "rootfs.ext4", tmp_path / "data.ext4"
    kernel.write_bytes(ELF_KERNEL)
    rootfs.write_bytes(b"\0" * 1024)
    data.write_bytes(b"\0" * 1024)
    return VMConfig(kernel=kernel, rootfs=rootfs, rootfs_read_only=True, vcpus=2, mem_mib=1024,
                       boot_args=DEFAULT_BOOT_ARGS + " init=/sbin/polydev-init",
                       extra_drives=(DriveSpec("data", data, read_only=False),),
                       tap="tap-slot3", guest_mac="06:00:ac:10:00:02")


def assert_conforms(specs: list[Spec], requests: list[Request]) -> None:
    """Validate recorded requests against both specs here too, independently of what the fake answered."""
    assert requests, "no request was recorded"
    for spec in specs:
        for r in requests:
            assert spec.violations(r.method, r.path, r.body) == [], (spec.version, r)


def calls(requests: list[Request]) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests]


# -- the validator itself --------------------------------------------------------------------------------


def test_both_specifications_are_found_and_parsed(specs: list[Spec]) -> None:
    assert [s.version for s in specs] == ["1.13.2", "1.16.1"]
    assert [s.path.name for s in specs] == list(SPEC_FILES)
    for spec in specs:
        assert {"PUT /boot-source", "PUT /snapshot/load", "PATCH /vm", "GET /"} <= {
            f"{op.method} {op.template}" for op in spec.operations}


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 512}, "'2' is not of type 'integer'"),
    ("PUT", "/machine-config", {"vcpu_count": 2}, "'mem_size_mib' is a required property"),
    ("PUT", "/machine-config", {"vcpu_count": 64, "mem_size_mib": 512}, "64 is greater than the maximum"),
    ("PATCH", "/vm", {"state": "Stopped"}, "'Stopped' is not one of"),
    ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": "yes"}, "'yes' is not of type 'boolean'"),
    ("PUT", "/drives/rootfs", {"drive_id": "other", "is_root_device": True}, "path drive_id='rootfs'"),
    ("PUT", "/boot-source", {"kernel_image_path": "/k", "kernel_args": "x"}, "'kernel_args' was unexpected"),
    ("PUT", "/snapshot/restore", {"snapshot_path": "/s"}, "no such operation"),
    ("DELETE", "/drives/rootfs", None, "no such operation"),
    ("PUT", "/drives", {"drive_id": "rootfs", "is_root_device": True}, "no such operation"),
    ("PUT", "/actions", None, "needs a body"),
    ("GET", "/", {"x": 1}, "takes no body"),
])
def test_validator_rejects_nonconforming_requests(specs: list[Spec], method: str, path: str, body: object,
                                                  expected: str) -> None:
    for spec in specs:
        problems = spec.violations(method, path, body)
        assert any(expected in problem for problem in problems), (spec.version, problems)


def test_validator_tells_the_versions_apart(specs: list[Spec]) -> None:
    # `mtu` exists only from 1.16 on: a body using it must fail the 1.13 contract and pass the 1.16 one,
    # which is why the client never sends fields that only one release knows.
    body = {"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1500}
    old, new = specs
    assert "'mtu' was unexpected" in " ".join(old.violations("PUT", "/network-interfaces/eth0", body))
    assert new.violations("PUT", "/network-interfaces/eth0", body) == []
    assert "no such operation" in " ".join(old.violations("PUT", "/serial", {"serial_out_path": "/x"}))
    assert new.violations("PUT", "/serial", {"serial_out_path": "/x"}) == []


def test_fake_server_answers_a_spec_violation_like_firecracker(fake: FakeFirecracker) -> None:
    status, answer = fake.handle("PUT", "/machine-config", b'{"vcpu_count": "two", "mem_size_mib": 512}')
    assert status == 400 and "'two' is not of type 'integer'" in answer["fault_message"]
    assert len(fake.violations) == 2  # one per specification
    fake.violations.clear()  # deliberate: the fixture asserts none are left


# -- the client ------------------------------------------------------------------------------------------


async def test_full_boot_sequence_conforms(client: FirecrackerClient, fake: FakeFirecracker,
                                           specs: list[Spec], vm_files: VMConfig, tmp_path: Path) -> None:
    log_file = tmp_path / "fc.log"
    log_file.touch()
    await client.put_logger(Logger(log_path=str(log_file), level="Info", show_level=True))
    await client.put_machine_config(MachineConfig(vcpu_count=2, mem_size_mib=1024, smt=False))
    await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel),
                                               boot_args=vm_files.boot_args))
    await client.put_drive(Drive(drive_id="rootfs", path_on_host=str(vm_files.rootfs), is_root_device=True,
                                    is_read_only=True, cache_type="Unsafe", io_engine="Sync"))
    await client.put_network_interface(NetworkInterface(iface_id="eth0", host_dev_name="tap0",
                                                           guest_mac="06:00:ac:10:00:02"))
    await client.instance_start()

    info = await client.describe_instance()
    assert info.state == "Running" and info.app_name == "Firecracker"
    assert calls(fake.requests) == ["PUT /logger", "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
                                    "PUT /network-interfaces/eth0", "PUT /actions", "GET /"]
    assert fake.requests[5].body == {"action_type": "InstanceStart"}
    assert fake.requests[3].body == {"drive_id": "rootfs", "path_on_host": str(vm_files.rootfs),
                                     "is_root_device": True, "is_read_only": True, "cache_type": "Unsafe",
                                     "io_engine": "Sync"}
    assert_conforms(specs, fake.requests)


async def test_snapshot_create_then_load_in_a_fresh_process(client: FirecrackerClient, fake: FakeFirecracker,
                                                          specs: list[Spec], vm_files: VMConfig,
                                                          short_dir: Path, tmp_path: Path) -> None:
    await client.put_machine_config(MachineConfig(vcpu_count=1, mem_size_mib=256, track_dirty_pages=True))
    await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel)))
    await client.instance_start()
    await client.pause()
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    await client.create_snapshot(SnapshotCreate(snapshot_path=str(state), mem_file_path=str(memory),
                                                   snapshot_type="Full"))
    await client.resume()
    assert state.exists() and memory.exists()
    assert calls(fake.requests)[-3:] == ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]

    async with FakeFirecracker(short_dir / "api2.sock", specs) as fresh, \
            FirecrackerClient(fresh.socket_path) as restored:
        await restored.load_snapshot(SnapshotLoad(
            snapshot_path=str(state), mem_backend=MemoryBackend(backend_type="File", backend_path=str(memory)),
            resume_vm=True, network_overrides=[NetworkOverride(iface_id="eth0", host_dev_name="tap7")]))
        assert (await restored.describe_instance()).state == "Running"
        assert (await restored.get_machine_config()).mem_size_mib == 256  # the snapshot's, not the default
        assert fresh.requests[0].body["mem_backend"] == {"backend_type": "File", "backend_path": str(memory)}
        assert "mem_file_path" not in fresh.requests[0].body  # deprecated in 1.13, not what we send
        assert fresh.violations == []
        assert_conforms(specs, fresh.requests)
    assert_conforms(specs, fake.requests)


async def test_pause_and_resume(client: FirecrackerClient, fake: FakeFirecracker, vm_files: VMConfig) -> None:
    await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel)))
    await client.instance_start()
    await client.pause()
    assert (await client.describe_instance()).state == "Paused"
    await client.resume()
    assert (await client.describe_instance()).state == "Running"
    assert [r.body for r in fake.requests if r.path == "/vm"] == [{"state": "Paused"}, {"state": "Resumed"}]


async def test_every_client_method_conforms(client: FirecrackerClient, fake: FakeFirecracker,
                                            specs: list[Spec], vm_files: VMConfig, tmp_path: Path) -> None:
    """The methods the boot and snapshot tests do not use, so nothing the client can send goes unchecked."""
    metrics = tmp_path / "metrics.fifo"
    assert (await client.get_machine_config()).vcpu_count == 1
    assert await client.version() == "1.13.2"
    await client.put_metrics(Metrics(metrics_path=str(metrics)))
    await client.patch_machine_config(MachineConfig(vcpu_count=2, mem_size_mib=512, huge_pages="None"))
    await client.put_vsock(Vsock(guest_cid=3, uds_path=str(tmp_path / "v.sock")))
    await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel),
                                               initrd_path=str(vm_files.rootfs)))
    await client.put_drive(Drive(drive_id="data", path_on_host=str(vm_files.rootfs), is_root_device=False,
                                    is_read_only=False, partuuid="0eaa91a0-01"))
    await client.instance_start()
    await client.patch_drive(DriveUpdate(drive_id="data", path_on_host=str(vm_files.kernel)))
    await client.flush_metrics()
    await client.send_ctrl_alt_del()
    assert len(fake.requests) == 11
    assert_conforms(specs, fake.requests)


# -- error mapping ---------------------------------------------------------------------------------------


async def test_a_400_carries_firecrackers_fault_message(client: FirecrackerClient, fake: FakeFirecracker,
                                                        vm_files: VMConfig) -> None:
    fake.faults[("PUT", "/boot-source")] = (400, "Invalid kernel path: /nowhere")
    with pytest.raises(FirecrackerAPIError) as caught:
        await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel)))
    err = caught.value
    assert (err.status, err.method, err.path) == (400, "PUT", "/boot-source")
    assert err.fault_message == "Invalid kernel path: /nowhere"
    assert "Invalid kernel path: /nowhere" in str(err)


async def test_firecrackers_own_refusals_surface(client: FirecrackerClient, vm_files: VMConfig,
                                                tmp_path: Path) -> None:
    with pytest.raises(FirecrackerAPIError, match="without kernel configuration"):
        await client.instance_start()
    await client.put_boot_source(BootSource(kernel_image_path=str(vm_files.kernel)))
    await client.instance_start()
    with pytest.raises(FirecrackerAPIError, match="not paused") as caught:  # a snapshot needs a pause
        await client.create_snapshot(SnapshotCreate(snapshot_path=str(tmp_path / "s"),
                                                       mem_file_path=str(tmp_path / "m")))
    assert caught.value.status == 400
    with pytest.raises(FirecrackerAPIError, match="after starting the microVM"):
        await client.put_machine_config(MachineConfig(vcpu_count=1, mem_size_mib=128))


async def test_error_without_json_body_and_unreachable_socket(short_dir: Path) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="internal failure")

    async with FirecrackerClient(short_dir / "x.sock", transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(FirecrackerAPIError, match="internal failure") as caught:
            await c.pause()
        assert caught.value.status == 500
    async with FirecrackerClient(short_dir / "nobody.sock") as c:
        with pytest.raises(FirecrackerError, match="did not answer GET /"):
            await c.describe_instance()


@pytest.mark.parametrize("build", [
    lambda: Drive(drive_id="../vm", path_on_host="/x", is_root_device=True, is_read_only=False),
    lambda: NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="not-a-mac"),
    lambda: NetworkInterface(iface_id="eth0", host_dev_name="a-name-longer-than-15"),
    lambda: MachineConfig(vcpu_count=0, mem_size_mib=128),
    lambda: Vsock(guest_cid=2, uds_path="/v"),
    lambda: BootSource(kernel_image_path="/k", kernel_args="x"),  # type: ignore[call-arg]
])
def test_bodies_refuse_what_firecracker_would(build: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        build()  # type: ignore[operator]


# -- availability ----------------------------------------------------------------------------------------


def test_unavailable_reasons(tmp_path: Path) -> None:
    missing = tmp_path / "firecracker"
    assert "no firecracker binary" in (unavailable_reason(missing, kvm_device=None) or "")
    missing.write_text("#!/bin/sh\n")
    missing.chmod(0o644)
    assert "not executable" in (unavailable_reason(missing, kvm_device=None) or "")
    missing.chmod(0o755)
    assert unavailable_reason(missing, kvm_device=None) is None
    assert "cannot open" in (unavailable_reason(missing, kvm_device=tmp_path / "kvm") or "")
    with pytest.raises(FirecrackerUnavailable) as caught:
        check_available(tmp_path / "absent")
    assert "no firecracker binary" in caught.value.reason


def test_kernel_must_be_an_uncompressed_elf(tmp_path: Path) -> None:
    bzimage, vmlinux = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    bzimage.write_bytes(b"MZ" + b"\0" * 62)
    vmlinux.write_bytes(ELF_KERNEL)
    assert kernel_problem(vmlinux) is None
    if os.uname().machine == "x86_64":
        assert "not an uncompressed ELF" in (kernel_problem(bzimage) or "")
    assert "cannot read" in (kernel_problem(tmp_path / "none") or "")


# -- the process driver, with a fake firecracker binary ---------------------------------------------------


def fake_binary(directory: Path, *extra: str) -> tuple[Path, Path]:
    record = directory / "requests.jsonl"
    return write_fake_binary(directory / "firecracker", "--record", str(record), *extra), record


def recorded(record: Path) -> list[Request]:
    return [Request(**json.loads(line)) for line in record.read_text().splitlines()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes (the driver reaps its own child).
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


async def test_driver_boots_a_vm_and_cleans_up(short_dir: Path, specs: list[Spec], vm_files: VMConfig) -> None:
    binary, record = fake_binary(short_dir)
    vm = FirecrackerProcess(short_dir / "vm", binary=binary, vm_id="vm-1", kvm_device=None,
                               ready_marker=CONSOLE_LINE)
    async with vm:
        await vm.boot(vm_files)
        await vm.wait_ready(timeout=30)
        assert vm.running and vm.socket_path.exists()
        assert (await vm.client.describe_instance()).state == "Running"
        pid = vm.pid
    assert pid is not None and not alive(pid)
    assert not vm.socket_path.exists()
    assert CONSOLE_LINE in vm.console_log.read_text()  # the console log outlives the VM

    requests = recorded(record)
    assert calls(requests) == ["PUT /logger", "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
                               "PUT /drives/data", "PUT /network-interfaces/eth0", "PUT /actions", "GET /"]
    assert requests[1].body == {"vcpu_count": 2, "mem_size_mib": 1024}
    assert requests[2].body == {"kernel_image_path": str(vm_files.kernel), "boot_args": vm_files.boot_args}
    assert requests[3].body["is_root_device"] is True and requests[3].body["is_read_only"] is True
    assert requests[4].body["is_root_device"] is False and requests[4].body["is_read_only"] is False
    assert requests[5].body == {"iface_id": "eth0", "host_dev_name": "tap-slot3", "guest_mac": "06:00:ac:10:00:02"}
    assert_conforms(specs, requests)


async def test_driver_snapshots_and_restores(short_dir: Path, specs: list[Spec], vm_files: VMConfig) -> None:
    binary, record = fake_binary(short_dir)
    snap = SnapshotFiles(short_dir / "snap" / "vm.state", short_dir / "snap" / "vm.mem")
    async with FirecrackerProcess(short_dir / "a", binary=binary, kvm_device=None) as vm:
        await vm.boot(vm_files)
        assert await vm.snapshot(snap) == snap
        assert (await vm.client.describe_instance()).state == "Running"  # resumed after the snapshot
    assert snap.state.exists() and snap.memory.exists()
    async with FirecrackerProcess(short_dir / "b", binary=binary, kvm_device=None) as clone:
        await clone.restore(snap, network_overrides={"eth0": "tap-slot9"})
        assert (await clone.client.describe_instance()).state == "Running"

    requests = recorded(record)
    assert calls(requests)[-3:] == ["PUT /logger", "PUT /snapshot/load", "GET /"]  # a fresh process: no config
    snapshot_calls = [c for c in calls(requests) if c.startswith(("PATCH /vm", "PUT /snapshot"))]
    assert snapshot_calls == ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm", "PUT /snapshot/load"]
    load = next(r for r in requests if r.path == "/snapshot/load").body
    assert load == {"snapshot_path": str(snap.state.resolve()),
                    "mem_backend": {"backend_type": "File", "backend_path": str(snap.memory.resolve())},
                    "resume_vm": True, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-slot9"}]}
    assert_conforms(specs, requests)


async def test_driver_cleans_up_when_the_api_refuses(short_dir: Path, vm_files: VMConfig) -> None:
    binary, _ = fake_binary(short_dir, "--fault", "PUT /boot-source=400:Kernel loader: invalid ELF magic number")
    vm = FirecrackerProcess(short_dir / "vm", binary=binary, kvm_device=None)
    with pytest.raises(FirecrackerAPIError) as caught:
        await vm.boot(vm_files)
    assert caught.value.fault_message == "Kernel loader: invalid ELF magic number"
    assert vm.pid is not None and not alive(vm.pid)
    assert not vm.socket_path.exists() and not vm.running
    await vm.stop()  # a second stop is harmless
    with pytest.raises(FirecrackerError, match="already started"):
        await vm.boot(vm_files)  # a driver is used once


async def test_driver_reports_a_binary_that_exits_at_once(short_dir: Path, vm_files: VMConfig) -> None:
    binary = short_dir / "firecracker"
    binary.write_text("#!/bin/sh\necho 'Error: KVM: could not open /dev/kvm' >&2\nexit 1\n")
    binary.chmod(0o755)
    vm = FirecrackerProcess(short_dir / "vm", binary=binary, kvm_device=None)
    with pytest.raises(FirecrackerProcessError) as caught:
        await vm.boot(vm_files)
    assert "exited with code 1 before its API socket" in str(caught.value)
    assert "could not open /dev/kvm" in "\n".join(caught.value.console_tail)


async def test_driver_gives_up_on_a_socket_that_never_appears(short_dir: Path, vm_files: VMConfig) -> None:
    binary = short_dir / "firecracker"
    binary.write_text(f"#!{sys.executable}\nimport signal\nsignal.pause()\n")  # alive, never listening
    binary.chmod(0o755)
    vm = FirecrackerProcess(short_dir / "vm", binary=binary, kvm_device=None, socket_timeout=0.5)
    with pytest.raises(FirecrackerProcessError, match="did not appear within 0.5 s"):
        await vm.boot(vm_files)
    assert vm.pid is not None and not alive(vm.pid)


async def test_driver_refuses_when_firecracker_is_unavailable(tmp_path: Path, vm_files: VMConfig) -> None:
    vm = FirecrackerProcess(tmp_path / "vm", binary=tmp_path / "no-firecracker")
    with pytest.raises(FirecrackerUnavailable, match="no firecracker binary"):
        await vm.boot(vm_files)
    assert vm.pid is None
    bad_kernel = tmp_path / "bzImage"
    bad_kernel.write_bytes(b"MZ" + b"\0" * 62)
    if os.uname().machine == "x86_64":
        with pytest.raises(FirecrackerUnavailable, match="not an uncompressed ELF"):
            await vm.boot(VMConfig(kernel=bad_kernel, rootfs=vm_files.rootfs))


# -- the jailer --------------------------------------------------------------------------------------------


def test_jailer_argv(tmp_path: Path) -> None:
    jailer = JailerConfig(binary=Path("/usr/local/bin/jailer"), uid=123, gid=100,
                             chroot_base_dir=Path("/srv/jailer"), netns=Path("/var/run/netns/slot3"),
                             cgroup_version=2, cgroups=("cpuset.cpus=0-1",), parent_cgroup="polydev",
                             resource_limits=("no-file=1024",), new_pid_ns=True)
    assert jailer.argv("vm-1", Path("/usr/local/bin/firecracker"), ["--api-sock", "/firecracker.socket"]) == [
        "/usr/local/bin/jailer", "--id", "vm-1", "--exec-file", "/usr/local/bin/firecracker",
        "--uid", "123", "--gid", "100", "--chroot-base-dir", "/srv/jailer", "--netns", "/var/run/netns/slot3",
        "--cgroup-version", "2", "--cgroup", "cpuset.cpus=0-1", "--parent-cgroup", "polydev",
        "--resource-limit", "no-file=1024", "--new-pid-ns", "--", "--api-sock", "/firecracker.socket"]
    assert jailer.chroot_dir(Path("/usr/local/bin/firecracker"), "vm-1") == Path("/srv/jailer/firecracker/vm-1/root")
    with pytest.raises(ValueError, match="letters, digits and hyphens"):
        jailer.argv("vm_1/../x", Path("/usr/local/bin/firecracker"), [])
    with pytest.raises(ValueError, match="must be named"):
        jailer.argv("vm-1", Path("/usr/local/bin/qemu"), [])


@pytest.mark.parametrize("new_pid_ns", [False, True])
async def test_driver_under_the_jailer(short_dir: Path, specs: list[Spec], vm_files: VMConfig,
                                       new_pid_ns: bool) -> None:
    binary, record = fake_binary(short_dir)
    argv_file = short_dir / "jailer-argv.json"
    jailer_bin = write_fake_binary(short_dir / "jailer", "--record-argv", str(argv_file), sub_command="jailer")
    jailer = JailerConfig(binary=jailer_bin, uid=os.getuid(), gid=os.getgid(), chroot_base_dir=short_dir / "j",
                             new_pid_ns=new_pid_ns)
    vm = FirecrackerProcess(short_dir / "vm", binary=binary, vm_id="vm-7", jailer=jailer, kvm_device=None)
    snap = SnapshotFiles(short_dir / "snap.state", short_dir / "snap.mem")
    async with vm:
        await vm.boot(vm_files)
        assert vm.socket_path == short_dir / "j" / "firecracker" / "vm-7" / "root" / "firecracker.socket"
        assert (await vm.client.describe_instance()).state == "Running"
        await vm.snapshot(snap)
        assert vm.running
        vmm_pid = vm.vmm_pid
        assert vmm_pid is not None and alive(vmm_pid)
        assert (vmm_pid != vm.pid) == new_pid_ns  # handed off to the jailer's child, or exec'ed in place
    assert not (short_dir / "j" / "firecracker" / "vm-7").exists()  # the jail is gone
    assert snap.state.exists() and snap.memory.exists()  # moved out of the jail before it went
    assert vm_files.rootfs.exists() and vm_files.kernel.exists()  # only the links in the jail were removed
    assert not alive(vmm_pid) and not vm.running

    argv = json.loads(argv_file.read_text())
    assert argv[argv.index("--id") + 1] == "vm-7" and argv[argv.index("--exec-file") + 1] == str(binary)
    assert argv[argv.index("--") + 1:] == ["--api-sock", "/firecracker.socket"]
    requests = recorded(record)
    paths = {r.path: r.body for r in requests}
    # Inside the jail Firecracker sees its chroot as "/": every file is named from there.
    assert paths["/boot-source"]["kernel_image_path"] == "/1-vmlinux"
    assert paths["/drives/rootfs"]["path_on_host"] == "/2-rootfs.ext4"
    assert paths["/snapshot/create"] == {"snapshot_path": "/snapshot.state", "mem_file_path": "/snapshot.mem",
                                         "snapshot_type": "Full"}
    assert_conforms(specs, requests)


async def test_driver_deep_workdir_prefix_relative_paths_and_redaction(short_dir: Path, specs: list[Spec],
                                                                       vm_files: VMConfig) -> None:
    binary, record = fake_binary(short_dir)
    deep = short_dir / ("d" * 60) / ("e" * 60)  # too deep for a Unix socket address
    deep.mkdir(parents=True)
    disk = deep / "disk.ext4"
    shutil.copyfile(vm_files.rootfs, disk)
    vm = FirecrackerProcess(deep, binary=binary, vm_id="vm-secret42", kvm_device=None, ready_marker=CONSOLE_LINE,
                               command_prefix=["env", "POLYDEV_PREFIX_RAN=1"], redact=["secret42"])
    async with vm:
        await vm.boot(VMConfig(kernel=vm_files.kernel, rootfs=disk))
        await vm.wait_ready(timeout=30)
        assert len(os.fsencode(vm.api_socket)) > UNIX_PATH_MAX
        assert vm.socket_path.is_symlink() and vm.socket_path.resolve() == vm.api_socket
        assert len(os.fsencode(vm.socket_path)) <= UNIX_PATH_MAX
        assert vm.pid is not None and b"POLYDEV_PREFIX_RAN=1" in Path(f"/proc/{vm.pid}/environ").read_bytes()
    assert not vm.socket_path.is_symlink() and not vm.api_socket.exists()
    drive = next(r.body for r in recorded(record) if r.path == "/drives/rootfs")
    assert drive["path_on_host"] == "disk.ext4"  # in its work directory (its cwd): named relative to it
    console = vm.console_log.read_text()
    assert "vm-[redacted]" in console and "secret42" not in console
    assert_conforms(specs, recorded(record))
