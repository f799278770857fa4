"""The processes envd clients start in a sandbox: followed by this server, kept running by the guest.

E2B's envd keeps a process running when the client that started it goes away, and a later `Connect` to its
pid streams its output from then on. The guest agent runs these as `detach` execs: they outlive the agent
connection that started them, and their output waits in the guest's backlog (guest/backlog.py). This server
follows each with a thread that reads the agent's event stream and fans every event out to whoever follows
it (the `Start` stream, any `Connect` streams).

That connection ends whenever the VM stops under it: a pause (the VM is saved to a file and its QEMU ends), a
restart of this server. The process is then `attached=False`; its followers get an end saying the link was
lost. The next envd call on the sandbox `sync`s: it reads the guest's list of detach execs and follows each
again from the last event this server had (after a restart, from the processes' current output), so after
resume `List` shows them and `Connect` streams them, as on E2B.

Events are (kind, payload): ("stdout" | "stderr" | "pty", bytes), then one ("end", Exit).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import structlog

from polydev.protocol import ExecEvent, ProtocolError
from polydev.vm.agent_client import AgentError

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient

    Agents = Callable[[], AgentClient]  # a new client of the sandbox VM's agent, as it runs now

log = structlog.get_logger(__name__)

# What a follower may fall behind by before it is cut off (it gets an end with an error): a client that
# stops reading must not hold the server's memory.
MAX_BACKLOG = 4096
LINK_LOST = "the link to the process was lost (its sandbox was paused or its VM stopped); connect to it again"


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
    user: str | None = None  # the guest account it runs as (None: the agent's own, root)

    def meta(self) -> str:
        """What the guest keeps beside the process, so a server that did not start it can list it. The env
        vars stay out: they may hold secrets, and List shows them only to the server that started it."""
        return json.dumps({**asdict(self), "envs": {}})

    @classmethod
    def from_meta(cls, meta: str | None) -> Command:
        try:
            data = json.loads(meta or "")
            size = data.get("pty_size")
            return cls(cmd=str(data["cmd"]), args=[str(a) for a in data["args"]], envs={}, cwd=data.get("cwd"),
                       tag=data.get("tag"), stdin=bool(data.get("stdin")), pty_size=tuple(size) if size else None,
                       user=data.get("user"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(cmd="", args=[], envs={}, cwd=None)  # not one of ours: listed by pid only


@dataclass
class Proc:
    pid: int
    exec_id: str
    command: Command
    followers: list[asyncio.Queue[tuple[str, Any]]] = field(default_factory=list)
    ended: bool = False
    last_seq: int = -1  # the newest event this server has had from the guest
    attached: bool = True  # a thread follows the guest's stream now

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

    def cut(self, reason: str) -> None:
        """End every follower's stream with `reason`; the process itself is not over."""
        followers, self.followers = self.followers, []
        for queue in followers:
            queue.put_nowait(("end", Exit(-1, reason)))


class StartFailed(Exception):
    """The agent refused the command (a bad cwd, a program that cannot start); the text says why."""


class ProcessTable:
    """The processes of every sandbox this server serves, by (sandbox id, pid)."""

    def __init__(self) -> None:
        self._procs: dict[tuple[str, int], Proc] = {}
        self._synced: set[str] = set()  # sandboxes whose every process is followed, as far as this server knows
        self._sync_lock = asyncio.Lock()

    def list(self, sandbox_id: str) -> list[Proc]:
        return [proc for (sid, _), proc in self._procs.items() if sid == sandbox_id and not proc.ended]

    def get(self, sandbox_id: str, pid: int) -> Proc | None:
        proc = self._procs.get((sandbox_id, pid))
        return None if proc is None or proc.ended else proc

    def by_tag(self, sandbox_id: str, tag: str) -> Proc | None:
        return next((p for p in self.list(sandbox_id) if p.command.tag == tag), None)

    async def start(self, sandbox_id: str, agents: Agents, command: Command) -> tuple[Proc, asyncio.Queue]:
        """Start the command in the guest; returns the process and a queue of its events from the first."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[Proc] = loop.create_future()
        # The first follower exists before any output can arrive, so the starter misses nothing.
        first: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_start(pid: int, exec_id: str) -> Proc:  # on the loop
            proc = Proc(pid=pid, exec_id=exec_id, command=command, followers=[first])
            self._procs[(sandbox_id, pid)] = proc
            started.set_result(proc)
            return proc

        def on_fail(exc: BaseException) -> None:  # on the loop, before the start event
            started.set_exception(exc)

        def events(agent: AgentClient) -> Iterator[ExecEvent]:
            return agent.exec_stream([command.cmd, *command.args], env=command.envs, cwd=command.cwd,
                                     pty=command.pty_size is not None, pty_size=command.pty_size,
                                     keep_stdin_open=command.stdin, detach=True, meta=command.meta(),
                                     user=command.user)

        self._follow(sandbox_id, None, command, agents, events, on_start, on_fail)
        return await started, first

    async def sync(self, sandbox_id: str, agents: Agents) -> None:
        """Follow again every process of the sandbox whose link was lost (a pause, a server restart), and
        list those this server has never seen. Cheap once done: the next lost link asks for it again."""
        if sandbox_id in self._synced:
            return
        async with self._sync_lock:
            if sandbox_id in self._synced:
                return

            def listing() -> list[Any]:
                with agents() as agent:
                    return agent.execs()
            try:
                execs = await asyncio.to_thread(listing)
            except (AgentError, ProtocolError, OSError) as exc:
                log.info("sandbox_procs_sync_failed", sandbox_id=sandbox_id, reason=str(exc))
                return
            mine = {proc.exec_id: proc for (sid, _), proc in self._procs.items() if sid == sandbox_id}
            for item in execs:
                proc = mine.pop(item.exec_id, None)
                if proc is None:
                    if not item.running:
                        continue  # ended before this server knew it: nothing to show
                    # Output from now on, as a Connect to a process started elsewhere gives.
                    proc = Proc(pid=item.pid, exec_id=item.exec_id, command=Command.from_meta(item.meta),
                                last_seq=item.last_seq, attached=False)
                    self._procs[(sandbox_id, item.pid)] = proc
                if not proc.attached and not proc.ended:
                    self._attach(sandbox_id, proc, agents)
            for proc in mine.values():  # the guest no longer has it: its end was lost with the link
                if not proc.attached and not proc.ended:
                    self._end(sandbox_id, proc, Exit(-1, "the process ended while nothing followed it"))
            self._synced.add(sandbox_id)

    def _attach(self, sandbox_id: str, proc: Proc, agents: Agents) -> None:
        proc.attached = True
        after = proc.last_seq

        def events(agent: AgentClient) -> Iterator[ExecEvent]:
            return agent.attach(proc.exec_id, after)

        def on_fail(exc: BaseException) -> None:
            self._lost(sandbox_id, proc)

        self._follow(sandbox_id, proc, proc.command, agents, events, lambda pid, exec_id: proc, on_fail)

    def _follow(self, sandbox_id: str, proc: Proc | None, command: Command, agents: Agents,
                events: Callable[[AgentClient], Iterator[ExecEvent]], on_start: Callable[[int, str], Proc],
                on_fail: Callable[[BaseException], None]) -> None:
        """A thread reads the guest's events (the agent client is synchronous) and hands each to the loop."""
        loop = asyncio.get_running_loop()
        holder: dict[str, Proc] = {} if proc is None else {"proc": proc}

        def deliver(seq: int, kind: str, payload: Any) -> None:  # on the loop
            current = holder["proc"]
            if seq <= current.last_seq:
                return  # already had (the backlog repeats what the attach asked from)
            current.last_seq = seq
            if kind == "end":
                self._end(sandbox_id, current, payload)
            else:
                current.push(kind, payload)

        def started(seq: int, pid: int, exec_id: str) -> None:  # on the loop
            holder["proc"] = on_start(pid, exec_id)
            holder["proc"].last_seq = max(holder["proc"].last_seq, seq)

        def broken(exc: BaseException) -> None:  # on the loop
            if "proc" in holder:
                self._lost(sandbox_id, holder["proc"])
            else:
                on_fail(exc)

        def pump() -> None:
            try:
                with agents() as agent:
                    for event in events(agent):
                        if event.type == "start":
                            if proc is None:
                                loop.call_soon_threadsafe(started, event.seq, event.pid or 0, event.exec_id or "")
                        elif event.type in ("stdout", "stderr"):
                            kind = "pty" if command.pty_size is not None else event.type
                            loop.call_soon_threadsafe(deliver, event.seq, kind, event.bytes())
                        elif event.type == "exit":
                            code = event.code if event.code is not None else -1
                            loop.call_soon_threadsafe(deliver, event.seq, "end", Exit(code))
                            return
            except AgentError as exc:
                failure: BaseException = StartFailed(exc.reason) if exc.status in (400, 422) else exc
                loop.call_soon_threadsafe(broken, failure)
                return
            except Exception as exc:  # ProtocolError, OSError, or no agent for the VM now (it was paused)
                loop.call_soon_threadsafe(broken, exc)
                return
            loop.call_soon_threadsafe(broken, RuntimeError("the agent's stream ended without the exit"))

        threading.Thread(target=pump, name=f"sandbox-proc-{sandbox_id}", daemon=True).start()

    def _end(self, sandbox_id: str, proc: Proc, exit: Exit) -> None:
        proc.push("end", exit)
        proc.attached = False
        if self._procs.get((sandbox_id, proc.pid)) is proc:
            del self._procs[(sandbox_id, proc.pid)]

    def _lost(self, sandbox_id: str, proc: Proc) -> None:
        """Its stream broke before its exit: it may run on in the guest; the next sync follows it again."""
        if proc.ended:
            return
        proc.attached = False
        proc.cut(LINK_LOST)
        self._synced.discard(sandbox_id)

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
        """A sandbox that ended: its processes went with its VM (their threads end as the agent's streams do)."""
        self._synced.discard(sandbox_id)
        for key in [k for k in self._procs if k[0] == sandbox_id]:
            proc = self._procs.pop(key)
            proc.attached = False
            proc.push("end", Exit(-1, "the sandbox was killed"))
