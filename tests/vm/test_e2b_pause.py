"""Pause and resume for real, through the unmodified e2b SDK against a live `polydev serve` on QEMU: a sandbox
paused (its VM's memory, devices and disk saved, its process gone, no host capacity held), the server stopped
and started again on the same data directory, and `Sandbox.connect` brings the same VM back: a background
process still counting from where it was (listed, and followed again by `commands.connect`), a file intact; pausing twice answers False. A sandbox made with
autoPause is paused, not killed, at its timeout."""

from __future__ import annotations

import time

import httpx
from e2b import Sandbox, SandboxQuery, SandboxState

from polydev.vm import images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.support.e2b_checks import new_user
from tests.support.live_server import start_server
from tests.support.waits import eventually

pytest_plugins = ["tests.support.vm_fixtures"]

# Written to a side file and renamed, so a read never finds the file truncated but not yet rewritten.
COUNTER = "sh -c 'i=0; while true; do i=$((i+1)); echo $i > $HOME/count.new; mv $HOME/count.new $HOME/count; echo $i; sleep 0.2; done'"


def _count(sbx: Sandbox) -> int:
    return int(sbx.files.read("count").strip() or 0)


def test_pause_a_server_restart_and_resume_bring_the_same_vm_back(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    env = {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
           "VM_CLI_MEMORY_MB": "512", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0"}
    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        user = {"api_key": new_user(server.url, server.admin_token, "pauser")}
        sbx = Sandbox.create(timeout=1800, request_timeout=900, api_url=server.url, sandbox_url=server.url, **user)
        sbx.files.write("kept.txt", "intact")
        counter = sbx.commands.run(COUNTER, background=True)
        boot = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        time.sleep(2)
        before = _count(sbx)
        assert before > 0
        assert sbx.pause(strict=True) is True  # (strict: its agent answered, so it was paused)
        assert Sandbox.pause(sbx.sandbox_id, api_url=server.url, **user) is False  # already paused
        [info] = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]), api_url=server.url, **user).next_items()
        assert info.sandbox_id == sbx.sandbox_id
        assert find_marked_processes(engine_tag(server.data_dir)) == {}  # no VM process while paused
        host = httpx.get(f"{server.url}/api/quotas/host", headers={"Authorization": f"Bearer {server.admin_token}"})
        assert host.json()["capacity"]["memory_mb"]["used"] == 0  # nor capacity held
    finally:
        running.close()

    running = start_server(tmp_path, "polydev", env)  # the same data directory: a restart
    server = next(running)
    try:
        same = Sandbox.connect(sbx.sandbox_id, timeout=600, api_url=server.url, sandbox_url=server.url,
                               request_timeout=300, **user)
        assert same.files.read("kept.txt") == "intact"
        assert same.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot  # the same boot, not a new one
        after = _count(same)
        assert after >= before  # counting on from where it was, not started again
        time.sleep(1.5)
        assert _count(same) > after  # and still counting
        # The process itself is still the sandbox's: listed, and a Connect streams its output on.
        assert counter.pid in [p.pid for p in same.commands.list()]
        followed = same.commands.connect(counter.pid, timeout=120)
        lines: list[int] = []
        for stdout, _, _ in followed:
            lines += [int(n) for n in (stdout or "").split()]
            if len(lines) >= 3:
                break
        assert lines[-1] > after and lines == list(range(lines[0], lines[0] + len(lines)))  # in order, none lost
        assert same.commands.kill(counter.pid) is True
        assert eventually(lambda: counter.pid not in [p.pid for p in same.commands.list()], timeout=30)
        assert same.get_info().state == "running"
        same.kill()
        assert find_marked_processes(engine_tag(server.data_dir)) == {}
        assert not any((server.data_dir / "vms").iterdir())  # its saved state and disk went with it

        # autoPause: the sandbox's timeout pauses it instead of killing it, and connect resumes it.
        conn = {"api_url": server.url, "sandbox_url": server.url, **user}
        napper = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"}, request_timeout=300, **conn)
        napper.files.write("nap.txt", "still here")
        sleeper = napper.commands.run("sleep 3600", background=True)
        assert eventually(lambda: Sandbox.get_info(napper.sandbox_id, **conn).state == "paused", timeout=120,
                          every=1.0)
        back = Sandbox.connect(napper.sandbox_id, timeout=600, request_timeout=300, **conn)
        assert back.files.read("nap.txt") == "still here"
        # Paused and resumed under the same server: the link its stream lost is made again.
        assert sleeper.pid in [p.pid for p in back.commands.list()]
        assert back.commands.kill(sleeper.pid) is True
        back.kill()
    finally:
        running.close()


def test_a_filesystem_pause_keeps_the_disk_and_boots_cold(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    env = {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
           "VM_CLI_MEMORY_MB": "512", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0"}
    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        conn = {"api_url": server.url, "sandbox_url": server.url,
                "api_key": new_user(server.url, server.admin_token, "cold")}
        sbx = Sandbox.create(timeout=600, request_timeout=900, **conn)
        sbx.files.write("notes/kept.txt", "on disk")
        sleeper = sbx.commands.run("sleep 3600", background=True)
        boot = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        assert sbx.pause(mode="filesystem") is True
        assert find_marked_processes(engine_tag(server.data_dir)) == {}
        [vm_dir] = list((server.data_dir / "vms").iterdir())
        assert not (vm_dir / "hibernated.state").exists()  # no memory saved: the disk only
        back = Sandbox.connect(sbx.sandbox_id, timeout=600, request_timeout=600, **conn)
        assert back.files.read("notes/kept.txt") == "on disk"
        assert sleeper.pid not in [p.pid for p in back.commands.list()]  # a cold boot: its processes are gone
        assert back.commands.run("cat /proc/sys/kernel/random/boot_id").stdout != boot  # booted again
        assert back.commands.run("echo alive").stdout == "alive\n"
        back.kill()
        assert not any((server.data_dir / "vms").iterdir())
    finally:
        running.close()
