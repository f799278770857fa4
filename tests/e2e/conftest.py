"""A real `polydev serve` process on a free loopback port, started the way the README starts it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port, stop_process, wait_http_ok


@dataclass
class LiveServer:
    url: str
    admin_token: str
    data_dir: Path
    log: Path


ROOT = Path(__file__).resolve().parents[2]


def start_server(root: Path, module: str, extra_env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    port = free_port()
    # An empty image cache: whatever images this machine has built, the server finds none, so its VM engine
    # is unavailable (with the reason) and nothing here boots a real VM.
    env = {**os.environ, "POLYDEV_DATA_DIR": str(root / "data"), "POLYDEV_CACHE_DIR": str(root / "cache"),
           "PORT": str(port), "HOST": "127.0.0.1"}
    for name in ("DATABASE_URL", "REDIS_URL", "CREDENTIAL_ENCRYPTION_KEY", "VM_BACKEND", "NETWORK_MODE"):
        env.pop(name, None)  # the embedded default
    env.update(extra_env or {})
    log = root / "server.log"
    out = root / "server.out"
    with open(log, "wb") as err, open(out, "wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", module, *(["serve"] if module == "polydev" else [])],
                                env=env, stdout=stdout, stderr=err, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ok(f"{url}/health", proc, module)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text()}") from None
        token = (root / "data" / "admin.token").read_text().strip()
        yield LiveServer(url, token, root / "data", log)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`polydev serve` as the README starts it."""
    yield from start_server(tmp_path_factory.mktemp("live"), "polydev")


@pytest.fixture(scope="session")
def fake_vm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The same server with a VM engine on the stand-in hypervisor: VM routes work, no VM boots."""
    yield from start_server(tmp_path_factory.mktemp("fakevm"), "tests.e2e.fake_vm_server")


@pytest.fixture(scope="session")
def fake_flow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The stand-in-hypervisor server whose claude_code adapter is the scripted CLI of tests/flow_fakes.py:
    the login and run flows work end to end over real HTTP in seconds."""
    root = tmp_path_factory.mktemp("fakeflow")
    yield from start_server(root, "tests.e2e.fake_vm_server", {"POLYDEV_TEST_FAKE_CLI": str(root / "guest")})
