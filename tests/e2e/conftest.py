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


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("live")
    port = free_port()
    env = {**os.environ, "POLYDEV_DATA_DIR": str(root / "data"), "PORT": str(port), "HOST": "127.0.0.1"}
    for name in ("DATABASE_URL", "REDIS_URL", "CREDENTIAL_ENCRYPTION_KEY"):
        env.pop(name, None)  # the embedded default
    log = root / "server.log"
    out = root / "server.out"
    with open(log, "wb") as err, open(out, "wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "polydev", "serve"], env=env, stdout=stdout, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ok(f"{url}/health", proc, "polydev serve")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text()}") from None
        token = (root / "data" / "admin.token").read_text().strip()
        yield LiveServer(url, token, root / "data", log)
    finally:
        stop_process(proc)
