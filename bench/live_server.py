"""`polydev serve` for a bench: on a free loopback port, with a data directory of its own, stopped at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(tmp: str, cache: Path, env: dict[str, str], stop_timeout: float = 120) -> Iterator[tuple[str, str]]:
    """(its URL, the admin's token) while it runs; its log is `tmp`/server.log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {**os.environ, "POLYDEV_DATA_DIR": f"{tmp}/data", "POLYDEV_CACHE_DIR": str(cache), "PORT": str(port),
            "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT / "src"), **env}
    with open(f"{tmp}/server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "polydev", "serve"], env=full, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, Path(f"{tmp}/data/admin.token").read_text().strip()
    finally:
        server.terminate()
        server.wait(stop_timeout)
