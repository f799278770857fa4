"""The unmodified e2b SDK against a live `polydev serve` on real QEMU VMs (the test image): the control plane,
processes (foreground, streamed, background + connect, stdin, kill), a PTY, the file calls, and two users who
cannot see or touch each other's sandboxes."""

from __future__ import annotations

import io
import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import (
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    SandboxQuery,
)

from polydev.vm import images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.support.e2b_checks import invisible_to, pty_sizes, stdin_and_kill
from tests.support.e2b_checks import new_user as make_user
from tests.support.echo_stand_in import echo_stand_in as echo_stand_in_at
from tests.support.egress_probe import CONNECT_PROBE
from tests.support.live_server import LiveServer, start_server

pytest_plugins = ["tests.support.vm_fixtures"]


# A loopback address of its own (test_egress_vm.py has .57, the stand-ins .58, the VNC login .60): the gateway
# dials port 443.
STAND_IN = ("127.0.0.61", 443)
SANDBOX_DOMAIN = "sbx.polydev.test"


@pytest.fixture(scope="module")
def echo_stand_in() -> Iterator[None]:
    with echo_stand_in_at(STAND_IN):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, test_image: images.Image, echo_stand_in: None
           ) -> Iterator[LiveServer]:
    env = {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
           "VM_CLI_MEMORY_MB": "1024", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0",
           "SANDBOX_DOMAIN": SANDBOX_DOMAIN, "EGRESS_ALLOW": "api.stand.test", "EGRESS_HOSTS": json.dumps({"api.stand.test": [STAND_IN[0]]})}
    running = start_server(tmp_path_factory.mktemp("e2b-vm"), "polydev", env)
    live = next(running)
    try:
        yield live
    finally:
        running.close()
        assert find_marked_processes(engine_tag(live.data_dir)) == {}


def new_user(server: LiveServer, name: str) -> dict[str, str]:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": make_user(server.url, server.admin_token, name)}


@pytest.fixture(scope="module")
def alice(server: LiveServer) -> dict[str, str]:
    return new_user(server, "alice")


@pytest.fixture(scope="module")
def sandbox(alice: dict[str, str]) -> Iterator[Sandbox]:
    # The first VM of the server boots cold and makes the snapshot: minutes under TCG.
    sbx = Sandbox.create(envs={"GREETING": "hi from polydev"}, metadata={"suite": "vm"}, timeout=1800,
                         request_timeout=900, **alice)
    yield sbx
    sbx.kill()


def test_commands_run_in_the_vm(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("uname -s; echo $GREETING; cat /proc/1/comm >&2")
    assert result.stdout == "Linux\nhi from polydev\n" and result.exit_code == 0
    assert result.stderr.strip() != ""  # the guest's PID 1, not the host's
    seen: list[str] = []
    streamed = sandbox.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == streamed.stdout == "line1\nline2\nline3\n"
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo nope >&2; exit 4")
    assert failed.value.exit_code == 4 and failed.value.stderr == "nope\n"


def test_background_stdin_connect_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("echo ready; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo $((6*7))",
                                  background=True)
    for stdout, _, _ in handle:
        if stdout and "ready" in stdout:
            break
    handle.disconnect()
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    follower = sandbox.commands.connect(handle.pid)
    sandbox.files.write("/tmp/go", "")
    assert follower.wait().stdout == "42\n"

    stdin_and_kill(sandbox)


def test_a_pty_session(sandbox: Sandbox) -> None:
    assert b"50 132" in pty_sizes(sandbox, (25, 90), (50, 132))


def test_files(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/work/hello.txt", "hello")
    assert sandbox.commands.run("cat /home/user/work/hello.txt").stdout == "hello"
    sandbox.commands.run("mkdir -p /home/user/work/d/e && printf 12345 > /home/user/work/d/e/f")
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sandbox.files.write("work/blob.bin", io.BytesIO(payload))  # relative to home, octet-stream
    assert sandbox.files.read("/home/user/work/blob.bin", format="bytes") == payload
    names = {e.path for e in sandbox.files.list("/home/user/work", depth=3)}
    assert {"/home/user/work/hello.txt", "/home/user/work/blob.bin", "/home/user/work/d/e/f"} <= names
    assert sandbox.files.get_info("/home/user/work/d/e/f").size == 5
    assert sandbox.files.exists("/home/user/work/hello.txt") and not sandbox.files.exists("/home/user/work/none")
    assert sandbox.files.make_dir("/home/user/work/new/dir") is True and sandbox.files.make_dir("/home/user/work/new/dir") is False
    assert sandbox.files.rename("/home/user/work/hello.txt", "/home/user/work/new/hi.txt").path == "/home/user/work/new/hi.txt"
    sandbox.files.remove("/home/user/work/d")
    assert not sandbox.files.exists("/home/user/work/d")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/work/hello.txt")


def test_calls_run_as_e2b_user_unless_they_ask_for_root(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("id -un; pwd; echo $HOME").stdout == "user\n/home/user\n/home/user\n"
    assert sandbox.commands.run("id -un; pwd", user="root").stdout == "root\n/root\n"
    assert sandbox.commands.run("sudo -n id -un").stdout == "root\n"  # as in E2B: sudo without a password
    sandbox.files.write("notes/a.txt", "mine")  # relative: in the user's home, and theirs
    assert sandbox.commands.run("stat -c %U notes notes/a.txt; cat notes/a.txt").stdout == "user\nuser\nmine"
    assert sandbox.files.make_dir("notes/sub") and sandbox.files.get_info("notes/sub").owner == "user"
    sandbox.files.write("/root/only-root.txt", "r", user="root")
    with pytest.raises(CommandExitException) as denied:
        sandbox.commands.run("cat /root/only-root.txt")  # root's home is root's alone
    assert "Permission denied" in denied.value.stderr
    assert sandbox.commands.run("cat /root/only-root.txt", user="root").stdout == "r"
    with pytest.raises(InvalidArgumentException) as refused:
        sandbox.commands.run("true", user="nosuchaccount")  # type: ignore[arg-type]
    assert "does not exist" in str(refused.value)


def test_get_metrics_is_sampled_in_the_vm(sandbox: Sandbox) -> None:
    [now] = sandbox.get_metrics()
    assert now.cpu_count == 1  # VM_CLI_VCPU, not the host's CPUs
    assert 0 < now.mem_used < now.mem_total <= 1024 * 1024 * 1024  # VM_CLI_MEMORY_MB
    assert 0 < now.disk_used < now.disk_total


def test_list_info_timeout_and_kill(alice: dict[str, str], sandbox: Sandbox) -> None:
    info = sandbox.get_info()
    assert (info.sandbox_id, info.template_id, info.metadata) == (sandbox.sandbox_id, "base", {"suite": "vm"})
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": "vm"}), **alice).next_items()
    assert [s.sandbox_id for s in found] == [sandbox.sandbox_id]
    sandbox.set_timeout(3000)
    assert sandbox.get_info().end_at > info.end_at
    short = Sandbox.create(timeout=300, request_timeout=900, **alice)  # a snapshot restore by now
    assert short.commands.run("echo second").stdout == "second\n"
    assert short.kill() is True
    assert not short.is_running()
    with pytest.raises(SandboxException):
        short.commands.run("echo gone")


def test_two_users_cannot_see_or_touch_each_others_sandboxes(server: LiveServer, sandbox: Sandbox) -> None:
    bob = new_user(server, "bob")
    assert Sandbox.list(**bob).next_items() == []
    invisible_to(sandbox, bob)
    # The sandbox's VM is alice's, and shows in the admin's VM list as such.
    h = {"Authorization": f"Bearer {server.admin_token}"}
    vms = httpx.get(f"{server.url}/api/vms", headers=h, timeout=30).json()
    assert any(vm["status"] == "running" for vm in vms)


def test_the_guest_agent_is_not_reachable_from_the_sandbox_url(server: LiveServer, sandbox: Sandbox) -> None:
    # Without the sandbox's access token the runtime answers as for a missing sandbox.
    r = httpx.get(f"{server.url}/files", params={"path": "/etc/hostname"}, timeout=30,
                  headers={"E2b-Sandbox-Id": sandbox.sandbox_id})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    assert Path("/etc/hostname").exists()  # (the host file the request named is not what answered)


def test_internet_goes_through_the_egress_gateway_and_can_be_off(alice: dict[str, str], sandbox: Sandbox) -> None:
    probe = f"python3 -c {shlex.quote(CONNECT_PROBE)} 10.0.2.99 3128 api.stand.test:443"
    assert sandbox.commands.run("echo $HTTPS_PROXY").stdout == "http://10.0.2.99:3128\n"
    lines = sandbox.commands.run(probe).stdout.splitlines()
    assert lines == ["HTTP/1.1 200 Connection Established", "echo: ping from the guest"]
    offline = Sandbox.create(allow_internet_access=False, timeout=300, request_timeout=900, **alice)
    try:
        assert offline.commands.run("echo $HTTPS_PROXY").stdout == "\n"
        refused = offline.commands.run(probe).stdout
        assert refused.startswith("HTTP/1.1 403") and "without internet access" in refused
    finally:
        offline.kill()


def test_get_host_reaches_an_http_server_in_the_vm(server: LiveServer, sandbox: Sandbox) -> None:
    sandbox.files.write("www/index.html", "hello from the VM")  # in the home of E2B's `user`
    web = sandbox.commands.run("cd www && exec python3 -m http.server 8000 --bind 127.0.0.1", background=True)
    host = sandbox.get_host(8000)
    assert host == f"8000-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"
    try:
        with httpx.Client(base_url=server.url, headers={"Host": host}, timeout=60) as c:
            for _ in range(1200):  # until the server listens: a closed port answers 502 until then
                r = c.get("/index.html")
                if r.status_code != 502:
                    break
                assert "port is not open" in r.json()["message"]
                time.sleep(0.1)
            assert (r.status_code, r.text) == (200, "hello from the VM")
            assert c.get("/", headers={"Host": f"8001-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"}).status_code == 502
    finally:
        sandbox.commands.kill(web.pid)
