"""A real `polydev serve` (or a stand-in server module) as a process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import free_port, stop_process, wait_http_ok


@dataclass
class LiveServer:
    url: str
    admin_token: str
    data_dir: Path
    log: Path
    # The server process, for tests that stop it their own way (a SIGKILL, a SIGTERM mid-way); stopping it at
    # the end copes with one already gone.
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


ROOT = Path(__file__).resolve().parents[2]  # the repository


def crash(server: LiveServer) -> None:
    """SIGKILL the server, as a crash would: nothing of its own gets to end what it was driving."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


def start_server(root: Path, module: str, extra_env: dict[str, str] | None = None,
                 admin_token: str | None = None, stop_timeout: float = 20) -> Iterator[LiveServer]:
    """`admin_token`: the admin's token when the database is another server's (which bootstrapped the admin).
    `stop_timeout`: how long its stop may take before it is killed (pausing big VMs to disk takes a while)."""
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
        token = admin_token or (root / "data" / "admin.token").read_text().strip()
        yield LiveServer(url, token, root / "data", log, proc)
    finally:
        stop_process(proc, stop_timeout)
