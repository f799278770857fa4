"""A terminal on a workspace's VM: a login shell on a PTY through the VM's agent, bridged to one WebSocket.

The agent runs the shell as a PTY exec (its output streamed as events, input through POST /input, the
window through POST /resize); here a thread follows the stream and hands the bytes to the event loop, at
most a few chunks ahead of the reader (a slow page slows the shell, not the server's memory). Closing the
terminal kills the shell: a terminal lives as long as its page, the workspace as long as the user keeps it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

import structlog

from polydev.vm.agent_client import AgentClient

log = structlog.get_logger(__name__)

SHELL = ["bash", "-l"]
QUEUE_CHUNKS = 64


class TerminalError(Exception):
    pass


class Terminal:
    def __init__(self, agents: Callable[[], AgentClient], *, rows: int, cols: int, cwd: str,
                 env: dict[str, str]) -> None:
        """`agents` makes a client for the VM's agent (one follows the output, one sends input)."""
        self._agents = agents
        self._size = (rows, cols)
        self._cwd = cwd
        self._env = env
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self._stopped = threading.Event()
        self._exec_id: str | None = None
        self._control: AgentClient | None = None
        self._stream: AgentClient | None = None
        self.exit_code: int | None = None
        self.failure: str | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start the shell; TerminalError when the agent refuses or does not start it."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[str] = loop.create_future()
        self._stream, self._control = self._agents(), self._agents()
        stream = self._stream

        def on_start(exec_id: str) -> None:
            if not started.done():
                started.set_result(exec_id)

        def on_fail(reason: str) -> None:
            self.failure = reason
            if not started.done():
                started.set_exception(TerminalError(reason))

        def put(item: bytes | None) -> None:
            while not self._stopped.is_set():
                future = asyncio.run_coroutine_threadsafe(self._queue.put(item), loop)
                try:
                    future.result(timeout=1.0)
                    return
                except concurrent.futures.TimeoutError:
                    if not future.cancel():
                        return

        def pump() -> None:
            try:
                for event in stream.exec_stream(SHELL, pty=True, pty_size=self._size, cwd=self._cwd,
                                                env=self._env, keep_stdin_open=True):
                    if event.type == "start":
                        loop.call_soon_threadsafe(on_start, event.exec_id or "")
                    elif event.type in ("stdout", "stderr"):
                        put(event.bytes())
                    elif event.type == "exit":
                        self.exit_code = event.code
                        break
            except Exception as exc:  # noqa: BLE001 - the VM went away, or we closed the stream ourselves
                if not self._stopped.is_set():
                    loop.call_soon_threadsafe(on_fail, str(exc) or type(exc).__name__)
            finally:
                put(None)

        threading.Thread(target=pump, name="workspace-terminal", daemon=True).start()
        try:
            self._exec_id = await asyncio.wait_for(started, timeout)
        except BaseException:
            await self.close()
            raise

    async def read(self) -> bytes | None:
        """The next output; None once the shell has ended."""
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        assert self._control is not None and self._exec_id is not None
        while data:
            written = await asyncio.to_thread(self._control.write_input, self._exec_id, data)
            data = data[written:]

    async def resize(self, rows: int, cols: int) -> None:
        assert self._control is not None and self._exec_id is not None
        await asyncio.to_thread(self._control.resize, self._exec_id, rows, cols)

    async def close(self) -> None:
        """Kill the shell (and whatever runs in it) and let go of the agent."""
        self._stopped.set()
        control, stream = self._control, self._stream
        if control is not None and self._exec_id is not None and self.exit_code is None:
            with contextlib.suppress(Exception):  # it ended on its own meanwhile, or the VM is gone
                await asyncio.to_thread(control.signal, self._exec_id, "KILL")
        for client in (control, stream):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(client.close)
