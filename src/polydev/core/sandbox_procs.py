"""The processes envd clients start in a sandbox, held by this server so they outlive their client's stream.

E2B's envd keeps a process running when the client that started it goes away, and a later `Connect` to its
pid streams its output from then on. The guest agent ties a process to its `/exec` connection (a dropped
connection kills it, so nothing leaks), so this server holds that connection: a thread per process reads the
agent's event stream and fans each event out to whoever follows it (the `Start` stream, any `Connect`
streams). A process therefore lives as long as it runs, or until it is killed, or until this server stops.

Events are (kind, payload): ("stdout" | "stderr" | "pty", bytes), then one ("end", Exit).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from polydev.protocol import ProtocolError
from polydev.vm.agent_client import AgentError

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient

log = structlog.get_logger(__name__)

# What a follower may fall behind by before it is cut off (it gets an end with an error): a client that
# stops reading must not hold the server's memory.
MAX_BACKLOG = 4096


@dataclass(frozen=True)
class Exit:
    code: int
    error: str | None = None


@dataclass(frozen=True)
class Command:
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None = None
    stdin: bool = False
    pty_size: tuple[int, int] | None = None  # (rows, cols): a terminal


@dataclass
class Proc:
    pid: int
    exec_id: str
    command: Command
    followers: list[asyncio.Queue[tuple[str, Any]]] = field(default_factory=list)
    ended: bool = False

    def follow(self) -> asyncio.Queue[tuple[str, Any]]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.followers.append(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        if queue in self.followers:
            self.followers.remove(queue)

    def push(self, kind: str, payload: Any) -> None:
        for queue in list(self.followers):
            if queue.qsize() >= MAX_BACKLOG and kind != "end":
                self.unfollow(queue)
                queue.put_nowait(("end", Exit(-1, "the client fell too far behind the output; reconnect")))
                continue
            queue.put_nowait((kind, payload))
        if kind == "end":
            self.ended = True


class StartFailed(Exception):
    """The agent refused the command (a bad cwd, a program that cannot start); the text says why."""


class ProcessTable:
    """The running processes of every sandbox this server serves, by (sandbox id, pid)."""

    def __init__(self) -> None:
        self._procs: dict[tuple[str, int], Proc] = {}

    def list(self, sandbox_id: str) -> list[Proc]:
        return [proc for (sid, _), proc in self._procs.items() if sid == sandbox_id and not proc.ended]

    def get(self, sandbox_id: str, pid: int) -> Proc | None:
        proc = self._procs.get((sandbox_id, pid))
        return None if proc is None or proc.ended else proc

    def by_tag(self, sandbox_id: str, tag: str) -> Proc | None:
        return next((p for p in self.list(sandbox_id) if p.command.tag == tag), None)

    async def start(self, sandbox_id: str, agent: AgentClient, command: Command) -> tuple[Proc, asyncio.Queue]:
        """Start the command in the guest; returns the process and a queue of its events from the first."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[Proc] = loop.create_future()
        # The first follower exists before any output can arrive, so the starter misses nothing.
        first: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        holder: dict[str, Proc] = {}

        def deliver(kind: str, payload: Any) -> None:  # on the loop
            proc = holder.get("proc")
            if proc is not None:
                proc.push(kind, payload)
                if kind == "end":
                    self._procs.pop((sandbox_id, proc.pid), None)

        def on_start(pid: int, exec_id: str) -> None:  # on the loop
            proc = Proc(pid=pid, exec_id=exec_id, command=command, followers=[first])
            holder["proc"] = proc
            self._procs[(sandbox_id, pid)] = proc
            if not started.done():
                started.set_result(proc)

        def on_fail(exc: BaseException) -> None:  # on the loop
            if not started.done():
                started.set_exception(exc)
            else:
                deliver("end", Exit(-1, str(exc)))

        def pump() -> None:  # in a thread: the agent client is synchronous
            seen_exit = False
            try:
                events = agent.exec_stream([command.cmd, *command.args], env=command.envs, cwd=command.cwd,
                                           pty=command.pty_size is not None, pty_size=command.pty_size,
                                           keep_stdin_open=command.stdin)
                for event in events:
                    if event.type == "start":
                        loop.call_soon_threadsafe(on_start, event.pid or 0, event.exec_id or "")
                    elif event.type in ("stdout", "stderr"):
                        kind = "pty" if command.pty_size is not None else event.type
                        loop.call_soon_threadsafe(deliver, kind, event.bytes())
                    elif event.type == "exit":
                        seen_exit = True
                        loop.call_soon_threadsafe(deliver, "end", Exit(event.code if event.code is not None else -1))
            except AgentError as exc:
                failure: BaseException = StartFailed(exc.reason) if exc.status in (400, 422) else exc
                loop.call_soon_threadsafe(on_fail, failure)
                return
            except (ProtocolError, OSError) as exc:
                loop.call_soon_threadsafe(on_fail, exc)
                return
            finally:
                agent.close()
            if not seen_exit:
                loop.call_soon_threadsafe(on_fail, RuntimeError("the agent's stream ended without the exit"))

        threading.Thread(target=pump, name=f"sandbox-proc-{sandbox_id}", daemon=True).start()
        proc = await started
        return proc, first

    async def events(self, proc: Proc, queue: asyncio.Queue[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
        """The events of `queue` up to and including the end; unfollows when the reader stops."""
        try:
            while True:
                kind, payload = await queue.get()
                yield kind, payload
                if kind == "end":
                    return
        finally:
            proc.unfollow(queue)

    def forget(self, sandbox_id: str) -> None:
        """A killed sandbox: its processes went with the VM (their threads end as the agent's streams close)."""
        for key in [k for k in self._procs if k[0] == sandbox_id]:
            del self._procs[key]
