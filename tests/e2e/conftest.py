"""A real `polydev serve` process on a free loopback port, started the way the README starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port


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
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"polydev serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"polydev serve not healthy after 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        token = (root / "data" / "admin.token").read_text().strip()
        yield LiveServer(url, token, root / "data", log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
