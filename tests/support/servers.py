"""Real PostgreSQL and Redis servers for the tests, started in temporary directories on free ports.

POLYDEV_TEST_POSTGRES_URL / POLYDEV_TEST_REDIS_URL point the tests at servers you already run instead.
When the server binaries are missing the tests that need them skip, unless POLYDEV_REQUIRE_SERVERS=1
(set by scripts/test.sh and CI), in which case they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.required import unmet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(what: str) -> None:
    unmet(f"{what} is not installed (scripts/test.sh installs it)")


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60,
                 ready: Callable[[], bool] = lambda: True) -> None:
    """Poll `url` until it answers 200 (and `ready()` holds); fail fast if the process dies."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if ready() and httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not answering {url} after {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class Server:
    url: str
    stop: list = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None  # a server this run started (None: one given by URL)
    launch: Callable[[], subprocess.Popen[bytes]] | None = None  # starts it again on its port and data

    def close(self) -> None:
        for fn in reversed(self.stop):
            fn()

    def halt(self) -> None:
        """Stop the server process, keeping its port and data, as an outage would (see `resume`)."""
        assert self.proc is not None, "only a server this run started can be stopped"
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave), Redis's shutdown.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def resume(self) -> None:
        """Start the halted server again, on the same port and data."""
        assert self.launch is not None
        self.proc = self.launch()


def start_redis(private: bool = False) -> Server:
    """Redis for the tests: the one POLYDEV_TEST_REDIS_URL names, or (always, when `private`: a test that will
    stop it) one of its own."""
    if not private and (url := os.environ.get("POLYDEV_TEST_REDIS_URL")):
        return Server(url)
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="polydev-redis-")

    def launch() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(port, proc, "redis-server")
        return proc

    server = Server(f"redis://127.0.0.1:{port}/0", [], launch(), launch)

    def stop() -> None:
        assert server.proc is not None
        stop_process(server.proc)
        shutil.rmtree(workdir, ignore_errors=True)

    server.stop.append(stop)
    return server


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def start_postgres(private: bool = False) -> Server:
    """PostgreSQL for the tests: the one POLYDEV_TEST_POSTGRES_URL names, or (always, when `private`: a test that
    will stop it) a cluster of its own."""
    if not private and (url := os.environ.get("POLYDEV_TEST_POSTGRES_URL")):
        return Server(url)
    bindir = _pg_bindir()
    if bindir is None:
        _missing("PostgreSQL server (initdb)")
    # PostgreSQL refuses to run as root: as root, run it as the `postgres` system user.
    run_as = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            _missing("the postgres system user")
    workdir = Path(tempfile.mkdtemp(prefix="polydev-pg-"))
    datadir = workdir / "data"
    if run_as is not None:
        os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
    user = run_as.pw_name if run_as else None
    port = free_port()
    subprocess.run([str(bindir / "initdb"), "-D", str(datadir), "-U", "polydev", "--auth=trust",
                    "--encoding=UTF8", "--no-sync"],
                   check=True, user=user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir)

    def launch() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(datadir), "-p", str(port), "-k", str(workdir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            user=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
        )
        _wait_port(port, proc, "postgres")
        return proc

    server = Server(f"postgresql://polydev@127.0.0.1:{port}/postgres", [], launch(), launch)

    def stop() -> None:
        assert server.proc is not None
        stop_process(server.proc)  # SIGTERM is PostgreSQL's smart shutdown; every client is gone by now
        shutil.rmtree(workdir, ignore_errors=True)

    server.stop.append(stop)
    return server


def create_database(admin_url: str, name: str) -> str:
    """A fresh, empty database on the test server, so each test starts from nothing."""
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)

    async def create() -> None:
        conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return url.set(database=name).render_as_string(hide_password=False)


def serve_connections(server: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on a listening socket in a daemon thread until the socket is closed, handing each connection to
    `handle` in turn and closing it afterwards: a small scripted peer for a test."""
    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    threading.Thread(target=serve, daemon=True).start()

