"""The flows' async view of one VM's guest agent.

The agent client is synchronous (httpx, one connection per call); the flows are asyncio tasks that must
never block the server's event loop, so every call here runs in a worker thread. A running process's event
stream is pumped by its own thread into an asyncio queue, and a watch (a long-poll of up to a minute) waits in
a thread of its own pool: in the event loop's default pool (a handful of threads on a small machine) a few
logins waiting for their URL or credential files held every thread, and every other blocking call of the
server (VM creation, file puts) queued behind them (tests/reliability/test_load.py: 20 logins and 50 runs
at once took minutes to get their VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from polydev import protocol as p
from polydev.providers.base import Command, GuestEnv, GuestFile
from polydev.vm.agent_client import AgentClient, AgentError

# Threads are made as watches need them (one per watch waiting at once), up to this many.
_WATCHES = ThreadPoolExecutor(max_workers=512, thread_name_prefix="guest-watch")


def base_files(env: GuestEnv, ca_pem: bytes | None) -> list[GuestFile]:
    """What every login and run puts in its guest first: the working directory (the CLI's cwd must exist
    before it starts) and the platform's extra CA, when there is one."""
    files = [GuestFile(f"{env.workdir}/.polydev", b"", 0o600)]
    if ca_pem and env.ca_cert_path:
        files.append(GuestFile(env.ca_cert_path, ca_pem, 0o644))
    return files


class GuestProcess:
    """A process started through the agent's exec: its output as lines, its input, its end."""

    def __init__(self, client: AgentClient, command: Command, timeout_s: float | None) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[p.ExecEvent | BaseException | None] = asyncio.Queue()
        self._started = asyncio.Event()
        self.exec_id: str | None = None
        self.exit_code: int | None = None
        self.timed_out = False
        self.stderr_tail = bytearray()
        self._thread = threading.Thread(target=self._pump, args=(command, timeout_s), daemon=True,
                                        name="guest-exec")
        self._thread.start()

    def _pump(self, command: Command, timeout_s: float | None) -> None:
        def put(*args: object) -> None:
            # The loop may have closed under a stream still draining (server shut down): nobody reads it.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(*args)  # type: ignore[arg-type]

        try:
            for ev in self._client.exec_stream(command.argv, env=command.env, cwd=command.cwd,
                                               stdin=command.stdin, pty=command.pty, timeout_s=timeout_s,
                                               keep_stdin_open=command.keep_stdin_open):
                put(self._queue.put_nowait, ev)
        except BaseException as exc:  # the VM died, the connection broke: the reader learns why
            put(self._queue.put_nowait, exc)
        finally:
            put(self._queue.put_nowait, None)

    async def events(self) -> AsyncIterator[p.ExecEvent]:
        """Every event once: start, output chunks, exit. Raises what broke the stream."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item.type == "start":
                self.exec_id = item.exec_id
                self._started.set()
            elif item.type == "exit":
                self.exit_code = item.code
                self.timed_out = item.timed_out
            elif item.type == "stderr":
                self.stderr_tail = (self.stderr_tail + item.bytes())[-4000:]
            yield item

    async def lines(self, *streams: str) -> AsyncIterator[str]:
        """Complete text lines of the given streams (default stdout; a PTY's output arrives as stdout),
        each stream split on its own so lines of one never interleave with the other's."""
        wanted = streams or ("stdout",)
        bufs = {name: b"" for name in wanted}
        async for ev in self.events():
            if ev.type not in bufs:
                continue
            *complete, bufs[ev.type] = (bufs[ev.type] + ev.bytes()).split(b"\n")
            for line in complete:
                yield line.decode("utf-8", "replace").rstrip("\r")
        for rest in bufs.values():
            if rest:
                yield rest.decode("utf-8", "replace")

    async def write(self, data: bytes, eof: bool = False) -> None:
        await self._started.wait()
        assert self.exec_id is not None
        await asyncio.to_thread(self._client.write_input, self.exec_id, data, eof)

    async def kill(self) -> None:
        """Kill the process group; harmless when it has already exited."""
        if self.exec_id is None:
            return
        with contextlib.suppress(AgentError, OSError, Exception):
            await asyncio.to_thread(self._client.signal, self.exec_id, "KILL")


class Guest:
    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def put(self, *files: GuestFile) -> None:
        for f in files:
            await asyncio.to_thread(self.client.put_file, f.path, f.data, f.mode)

    async def read(self, path: str) -> tuple[bytes, int] | None:
        """The file's bytes and mode, or None when it does not exist."""
        try:
            return await asyncio.to_thread(self.client.get_file, path)
        except AgentError as exc:
            if exc.status == 404:
                return None
            raise

    async def watch(self, paths: list[str], timeout: float) -> str | None:
        """The first of `paths` to exist complete (not still growing), or None after `timeout`."""
        return await asyncio.get_running_loop().run_in_executor(_WATCHES, self.client.watch, paths, timeout)

    async def run(self, argv: list[str], timeout_s: float = 60.0, **kw: object) -> int:
        result = await asyncio.to_thread(self.client.exec, argv, timeout_s=timeout_s, **kw)
        return result.exit_code

    def start(self, command: Command, timeout_s: float | None = None) -> GuestProcess:
        return GuestProcess(self.client, command, timeout_s)

    def close(self) -> None:
        self.client.close()
