"""guest/backlog.py: a detach exec's output kept for the next attach, bounded, the exit never dropped."""

from __future__ import annotations

import socket

from polydev.guest import backlog
from polydev.protocol import DETACHED_BACKLOG_BYTES, MAX_FINISHED_DETACHED, ExecEvent


def _line(seq: int, kind: str = "stdout", size: int = 1000) -> bytes:
    return ExecEvent(seq=seq, type=kind, data="A" * size if kind == "stdout" else None).to_line()


def test_backlog_drops_the_oldest_output_past_its_bound_and_keeps_the_exit() -> None:
    log = backlog.Backlog("e1", 42, None)
    count = DETACHED_BACKLOG_BYTES // 1000 + 200
    for seq in range(count):
        log.add(_line(seq))
    log.add(_line(count, "exit"))
    log.finish()
    d = log.describe()
    assert d.first_seq > 0 and d.last_seq == count and not d.running
    a, b = socket.socketpair()
    got: list[bytes] = []
    log.follow(-1, a, got.append)  # from the start: what is left, ending with the exit
    assert ExecEvent.from_json(got[0]).seq == d.first_seq
    assert ExecEvent.from_json(got[-1]).type == "exit"
    assert sum(len(line) for line in got) <= DETACHED_BACKLOG_BYTES
    got.clear()
    log.follow(count - 1, a, got.append)
    assert [ExecEvent.from_json(line).type for line in got] == ["exit"]
    a.close()
    b.close()


def test_follow_returns_when_its_client_leaves() -> None:
    log = backlog.Backlog("e2", 43, None)
    log.add(_line(0, "start"))
    a, b = socket.socketpair()
    b.close()  # the client is gone before anything more comes
    got: list[bytes] = []
    log.follow(0, a, got.append)  # returns within a wait slice, though the exec runs on
    assert got == []
    a.close()


def test_only_the_last_finished_are_remembered() -> None:
    ids = [f"f{i}" for i in range(MAX_FINISHED_DETACHED + 3)]
    for exec_id in ids:
        log = backlog.Backlog(exec_id, 1, None)
        backlog.register(log)
        backlog.finished(log)
    assert backlog.get(ids[0]) is None and backlog.get(ids[2]) is None
    assert backlog.get(ids[3]) is not None and backlog.get(ids[-1]) is not None
