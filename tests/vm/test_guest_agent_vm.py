"""What only a real VM shows: the CLIs in the image, the network restriction, cleanup after a failed boot,
and the full profile's Chromium."""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from polydev.cli.image import GEMINI_SETTINGS, QUIET_ENV, VERSION_CHECKS, reports_version
from polydev.config import Settings
from polydev.vm import images
from polydev.vm.backends.qemu.errors import VMError
from polydev.vm.backends.qemu.machine import QemuVM
from tests.support.required import skip_switches

pytest_plugins = ["tests.support.vm_fixtures"]  # fixtures: test_image, test_vm



def test_manifest_lists_debian_packages_and_pinned_clis(test_image: images.Image) -> None:
    manifest = test_image.manifest
    debs = manifest["debian_packages"]
    for name in ("python3", "git", "ca-certificates", "iproute2"):
        assert name in debs, name
    assert "chromium" not in debs
    assert manifest["clis"] == dict(images.CLI_PACKAGES)
    assert str(manifest["node"]).startswith("v22.")


def test_the_three_clis_run_inside_the_vm(test_vm: QemuVM) -> None:
    with test_vm.client(timeout=600) as agent:
        agent.put_file("/root/.gemini/settings.json", json.dumps(GEMINI_SETTINGS).encode(), 0o600)
        expected = dict(images.CLI_PACKAGES)  # VERSION_CHECKS is keyed by npm package, like the manifest
        assert set(VERSION_CHECKS) == set(expected)
        for package, argv in VERSION_CHECKS.items():
            result = agent.exec(argv, env=QUIET_ENV, timeout_s=600)
            assert result.exit_code == 0, (package, result.stderr[-2000:])
            assert reports_version(result.stdout.decode(), expected[package]), (package, result.stdout)


def test_token_stays_off_command_lines(test_vm: QemuVM) -> None:
    # Handed over as a fw_cfg file: neither the host's process list nor the guest's /proc/cmdline shows it,
    # and the file on the host is gone once the guest is up.
    assert test_vm.pid is not None
    host_cmdline = Path(f"/proc/{test_vm.pid}/cmdline").read_bytes()
    assert b"qemu-system" in host_cmdline and test_vm.token.encode() not in host_cmdline
    assert not test_vm.token_file.exists()
    with test_vm.client() as agent:
        guest_cmdline = agent.exec(["cat", "/proc/cmdline"]).stdout
    assert b"init=/sbin/polydev-init" in guest_cmdline and test_vm.token.encode() not in guest_cmdline


def test_paste_code_login_over_input_and_watch(test_vm: QemuVM) -> None:
    # The login flows' two calls in the real guest: a terminal prompt gets its code over POST /input, and
    # POST /watch reports the credential file the "CLI" writes once it has the code.
    home = "/root/.polydev-login-test"
    script = (f"printf 'Paste code here if prompted >'; read -r code; mkdir -p {home}; umask 077; "
              f"printf '{{\"code\":\"%s\"}}' \"$code\" > {home}/cred.tmp; mv {home}/cred.tmp {home}/cred.json")
    with test_vm.client(timeout=120) as agent:
        agent.exec(["rm", "-rf", home])
        # The terminal buffers the code until bash reads it, so it may be sent before the prompt shows.
        stream = agent.exec_stream(["bash", "-c", script], pty=True, timeout_s=300)
        start = next(stream)
        assert start.exec_id
        assert agent.watch([f"{home}/cred.json"], timeout=0) is None  # the CLI still waits for its code
        assert agent.write_input(start.exec_id, b"4/0Ab-code\n") == 11
        assert agent.watch([f"{home}/cred.json"], timeout=120) == f"{home}/cred.json"
        assert list(stream)[-1].code == 0
        assert agent.get_file(f"{home}/cred.json") == (b'{"code":"4/0Ab-code"}', 0o600)
        agent.exec(["rm", "-rf", home])


def test_guest_cannot_reach_the_host(test_vm: QemuVM) -> None:
    # A server on the host's loopback: with restrict=on, the guest's 10.0.2.2 (QEMU's alias for the host)
    # must not reach it. Only loopback is involved, so nothing leaves this machine whatever happens.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted: list[object] = []
    server.settimeout(20)
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    port = server.getsockname()[1]
    probe = ("import socket,sys\ns=socket.socket();s.settimeout(5)\n"
             f"try:\n s.connect(('10.0.2.2',{port}));print('connected')\nexcept OSError as e:\n print('blocked',e)")
    with test_vm.client(timeout=120) as agent:
        result = agent.exec(["python3", "-c", probe], timeout_s=60)
    server.close()
    assert result.stdout.startswith(b"blocked"), result.stdout
    assert accepted in ([], [None])


def _accept(server: socket.socket) -> object:
    try:
        return server.accept()
    except OSError:
        return None


def test_failed_boot_leaves_no_process_or_disk(tmp_path: Path) -> None:
    image_dir = tmp_path / "image"
    image_dir.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image_dir / images.ROOTFS)], check=True)
    (image_dir / images.KERNEL).write_bytes(b"not a kernel")
    (image_dir / images.INITRD).write_bytes(b"")
    (image_dir / images.MANIFEST).write_text("{}")
    image = images.Image.load(image_dir)
    assert image is not None
    vm = QemuVM(image, tmp_path / "vm", keep_console=True)
    with pytest.raises(VMError, match="QEMU exited"):
        vm.start(ready_timeout=60)
    assert not vm.alive()
    assert sorted(p.name for p in (tmp_path / "vm").iterdir()) == ["console.log"]  # the log is kept
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert out == ""


def test_full_profile_runs_chromium_headless() -> None:
    skip_switches("POLYDEV_SKIP_VM_TESTS", "POLYDEV_SKIP_FULL_IMAGE")  # refused under POLYDEV_REQUIRE_SERVERS=1
    image, _ = images.ensure(Settings().cache_dir, "full")
    assert "chromium" in image.manifest["debian_packages"]  # type: ignore[operator]
    with tempfile.TemporaryDirectory(prefix="polydev-test-full-") as tmp:
        with QemuVM(image, Path(tmp) / "vm", keep_console=False) as vm, vm.client(timeout=600) as agent:
            result = agent.exec(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update",
                                 "--disable-sync", "--dump-dom", "about:blank"], timeout_s=600)
            assert result.exit_code == 0, result.stderr[-3000:]
            assert b"<html><head></head><body></body></html>" in result.stdout
            assert agent.exec(["sh", "-c", "command -v Xtigervnc"]).exit_code == 0
