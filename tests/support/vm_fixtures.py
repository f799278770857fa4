"""Fixtures for tests that need the golden image or a booted VM, and a local agent for fast runs.

Use from a test module with `pytest_plugins = ["tests.support.vm_fixtures"]` (tests/conftest.py belongs to the control
plane); registered once as a plugin, the session-scoped VM is shared by every module that uses it.

`test_image` builds the test-profile image into the configured cache directory (POLYDEV_CACHE_DIR, default
/var/cache/polydev as root) or reuses it: CI on a machine that has built it once pays nothing; a new machine
pays one build. It fails rather than skips when the build cannot be done, so a green run means the VM tests
ran; POLYDEV_SKIP_VM_TESTS=1 skips them explicitly (developer machines without root; refused under
POLYDEV_REQUIRE_SERVERS=1).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev import protocol as p
from polydev.config import Settings
from polydev.vm import build_steps, images
from polydev.vm.agent_client import AgentClient
from polydev.vm.backends.qemu.machine import QemuVM, free_port
from tests.support.required import skip_switches

SRC = Path(images.__file__).resolve().parents[2]


def _skip_if_asked() -> None:
    skip_switches("POLYDEV_SKIP_VM_TESTS")  # a failure under POLYDEV_REQUIRE_SERVERS=1: CI runs the VM tests


@pytest.fixture(scope="session")
def test_image() -> images.Image:
    _skip_if_asked()
    # Settings() here, not the cached get_settings(): other fixtures point POLYDEV_CACHE_DIR at tmp dirs.
    cache_dir = Settings().cache_dir
    progress = lambda stage, line: print(f"[image {stage}] {line}", file=sys.stderr)  # noqa: E731
    # QEMU and the build tools, installed when missing (as root); a cached image still needs QEMU.
    build_steps.host_tools(progress)
    image, _ = images.ensure(cache_dir, "test", progress)
    return image


@pytest.fixture(scope="session")
def test_vm(test_image: images.Image) -> Iterator[QemuVM]:
    """One VM booted for the whole session: a TCG boot costs seconds, and the agent tests do not interfere."""
    with tempfile.TemporaryDirectory(prefix="polydev-test-vm-") as tmp:
        vm = QemuVM(test_image, Path(tmp) / "vm", keep_console=False)
        vm.start()
        try:
            yield vm
        finally:
            vm.stop()


@pytest.fixture(scope="session")
def local_agent() -> Iterator[tuple[str, str]]:
    """The same agent code as a host process on loopback: exercises the protocol in a second, no VM."""
    token = secrets.token_urlsafe(24)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "POLYDEV_AGENT_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "polydev.guest.agent", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the READY line: printed once the socket listens
        assert p.READY_MARKER in line, f"agent did not start: {line!r}"
        yield f"http://127.0.0.1:{port}", token
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def agent(local_agent: tuple[str, str]) -> Iterator[AgentClient]:
    """An authenticated client of the local agent. tests/vm/test_guest_agent_in_vm.py runs the same tests
    with this fixture overridden by the agent inside a real VM."""
    client = AgentClient(*local_agent, timeout=60)
    yield client
    client.close()
