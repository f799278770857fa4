"""The output of `detach` execs, kept in the guest so their client can go away and come back.

An ordinary exec dies with its connection: nothing leaks when the host gives up on it. A detach exec (an envd
background process) must outlive its connection, because that connection dies whenever the VM is paused and
woken again, or the server holding it restarts. So a thread of its own pumps its events into a Backlog (the
last DETACHED_BACKLOG_BYTES of them, with their seq numbers), and each POST /exec or POST /attach follows the
backlog from the seq its caller already has. The backlogs of the last MAX_FINISHED_DETACHED that ended stay
for a caller that comes back for the exit.
"""

from __future__ import annotations

import select
import socket
import threading
from collections import deque
from typing import Callable

from polydev.guest.http import client_gone
from polydev.protocol import DETACHED_BACKLOG_BYTES, MAX_FINISHED_DETACHED, DetachedExec

WAIT_SLICE_S = 1.0  # a follower waiting for output looks this often whether its client is still there


class Backlog:
    def __init__(self, exec_id: str, pid: int, meta: str | None) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self.meta = meta
        self._cond = threading.Condition()
        self._lines: deque[bytes] = deque()  # the events first_seq, first_seq + 1, ...
        self._first_seq = 0
        self._size = 0
        self.done = False

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._lines) - 1

    def add(self, line: bytes) -> None:
        """One event line, in seq order (the exec's events are numbered from 0, as this counts them)."""
        with self._cond:
            self._lines.append(line)
            self._size += len(line)
            # The newest line is always kept, so the exit is never dropped.
            while self._size > DETACHED_BACKLOG_BYTES and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())
                self._first_seq += 1
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def _after(self, seq: int) -> tuple[list[bytes], int, bool]:
        """Caller holds the condition: the lines above `seq` still held, the new last seq, and whether done."""
        start = max(seq + 1 - self._first_seq, 0)
        lines = [self._lines[i] for i in range(start, len(self._lines))]
        return lines, self.last_seq, self.done

    def follow(self, after: int, client: socket.socket, emit: Callable[[bytes], None]) -> None:
        """Send every event above `after` as it comes, until the exit is sent or the client leaves."""
        while True:
            with self._cond:
                lines, last, done = self._after(after)
                if not lines and not done:
                    self._cond.wait(WAIT_SLICE_S)
                    lines, last, done = self._after(after)
            for line in lines:
                emit(line)  # BrokenPipeError when the client left: the process runs on
            after = max(after, last)
            if done and not lines:
                return
            if not lines and _gone(client):
                return

    def describe(self) -> DetachedExec:
        with self._cond:
            return DetachedExec(exec_id=self.exec_id, pid=self.pid, running=not self.done, last_seq=self.last_seq,
                                first_seq=self._first_seq, meta=self.meta)


def _gone(client: socket.socket) -> bool:
    readable, _, _ = select.select([client], [], [], 0)
    return bool(readable) and client_gone(client)


DETACHED: dict[str, Backlog] = {}
_finished: deque[str] = deque()
_lock = threading.Lock()


def register(backlog: Backlog) -> None:
    with _lock:
        DETACHED[backlog.exec_id] = backlog


def finished(backlog: Backlog) -> None:
    """The exec ended: its backlog stays, as one of the last MAX_FINISHED_DETACHED."""
    backlog.finish()
    with _lock:
        _finished.append(backlog.exec_id)
        while len(_finished) > MAX_FINISHED_DETACHED:
            DETACHED.pop(_finished.popleft(), None)


def get(exec_id: str) -> Backlog | None:
    with _lock:
        return DETACHED.get(exec_id)


def listing() -> list[DetachedExec]:
    with _lock:
        backlogs = list(DETACHED.values())
    return [b.describe() for b in backlogs]
