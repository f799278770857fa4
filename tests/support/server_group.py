"""N real servers on one PostgreSQL database and one Redis, each on a loopback port and a data directory of its
own, as a deployment of several hosts runs them: the same master key everywhere, a short heartbeat so a killed
server is noticed within seconds. For the scale-out tests and the several-server benchmark."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from polydev.core.cluster import SERVER_HEADER
from polydev.store.vault import generate_master_key
from tests.support import servers
from tests.support.live_server import LiveServer, start_server

# SERVER_HEARTBEAT_SECONDS: a killed server is taken for dead after 6 s without one, and a busy one (two cores
# shared by three servers, PostgreSQL, Redis and the tests) still heartbeats well within that.
HEARTBEAT_S = 2.0


def server_id(server: LiveServer) -> str:
    """The id the server registered under (each answer names the server that gave it)."""
    return httpx.get(f"{server.url}/health", timeout=10).headers[SERVER_HEADER]


@contextlib.contextmanager
def server_group(root: Path, postgres_admin_url: str, redis_url: str, envs: Sequence[dict[str, str]],
                 module: str = "tests.support.fake_vm_server",
                 heartbeat_s: float = HEARTBEAT_S) -> Iterator[list[LiveServer]]:
    """One server per entry of `envs` (its own extra settings) on a fresh database; the first bootstraps the
    admin, whose token every LiveServer carries. `module`: `polydev` for the real server, the default for the
    stand-in hypervisor (with POLYDEV_TEST_FAKE_CLI in an env, the scripted CLI). `heartbeat_s`: a benchmark
    that loads the machine passes the default (5 s)."""
    database = servers.create_database(postgres_admin_url, f"t_{uuid.uuid4().hex[:16]}")
    shared = {"DATABASE_URL": database, "REDIS_URL": redis_url, "CREDENTIAL_ENCRYPTION_KEY": generate_master_key(),
              "SERVER_HEARTBEAT_SECONDS": str(heartbeat_s)}
    with contextlib.ExitStack() as stack:
        started: list[LiveServer] = []
        for i, env in enumerate(envs):
            (root / f"s{i}").mkdir(parents=True, exist_ok=True)
            gen = start_server(root / f"s{i}", module, {**shared, **env},
                               admin_token=started[0].admin_token if started else None)
            started.append(next(gen))
            stack.callback(gen.close)
        yield started
