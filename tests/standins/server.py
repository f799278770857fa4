"""Run stand-ins on a background event loop, optionally inside a network namespace.

The loop's thread joins the namespace (``setns``) before it creates any socket, so every listening socket
and every connection the stand-ins open live in that namespace; the rest of the test process stays where it
is. Tests make a loopback-only namespace with :class:`LoopbackNetns`, start the stand-ins in it, and run the
CLI there with ``ip netns exec`` — the CLI then physically reaches nothing but 127.0.0.1 in that namespace.

VM tests can reuse the same pieces without a namespace: ``StandinLoop()`` + ``serve_asgi(app, host, port)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, Self

import uvicorn

CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class LoopbackNetns:
    """A network namespace with nothing but a loopback interface (made with ``ip netns add``, needs root)."""

    def __init__(self, prefix: str = "pdsi") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        try:
            subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True,
                           timeout=30)
            links = subprocess.run(["ip", "-n", self.name, "-o", "link"], check=True, capture_output=True,
                                   text=True, timeout=30).stdout
            names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line.strip()]
            if names != ["lo"]:
                raise RuntimeError(f"namespace {self.name} has interfaces other than lo: {names}")
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True, timeout=30)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StandinLoop:
    """An asyncio loop on a daemon thread (inside ``netns`` when given) for stand-in servers."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"standins-{netns or 'host'}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("stand-in loop did not start")
        if self._error is not None:
            raise self._error
        self._servers: list[uvicorn.Server] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._closers: list[Any] = []

    def _main(self) -> None:
        try:
            if self.netns:
                _setns(self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}")
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self._error = e
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve_asgi(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve an ASGI app on host:port (0 = any free port); returns the port once it accepts."""
        return self.run(self._serve_asgi(app, host, port))

    async def _serve_asgi(self, app: Any, host: str, port: int) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        self._servers.append(server)
        self._tasks.append(asyncio.get_running_loop().create_task(server.serve(sockets=[sock])))
        for _ in range(1000):
            if server.started:
                return bound
            await asyncio.sleep(0.01)
        raise RuntimeError(f"uvicorn did not start on {host}:{bound}")

    def add_closer(self, closer: Any) -> None:
        """An ``async def close()`` callable run on :meth:`close`."""
        self._closers.append(closer)

    def close(self) -> None:
        async def _shutdown() -> None:
            for s in self._servers:
                s.should_exit = True
            for c in self._closers:
                await c()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)

        if self.loop.is_running():
            with contextlib.suppress(Exception):  # best effort on teardown
                self.run(_shutdown(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
