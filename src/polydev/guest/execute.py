"""Run one command for POST /exec and stream its output as ordered events.

Each command runs in its own session (process group), so a timeout, a client that went away or a
POST /signal reaches the whole tree it started, not only the first process. POST /input writes to a running
command's terminal or stdin pipe from another connection's thread, so each command's input side is an `Exec`
guarded by its own lock.
"""

from __future__ import annotations

import base64
import fcntl
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
import uuid
from typing import Callable

from polydev.guest import accounts, backlog, warm
from polydev.guest.http import client_gone
from polydev.protocol import INPUT_WAIT_S, ExecEvent, ExecRequest

READ_SIZE = 64 * 1024
WRITE_SLICE_S = 0.2  # a blocked writer looks this often whether its exec is ending
EOT = b"\x04"  # the terminal's default EOF character (Ctrl-D)
DRAIN_READS = 256  # at most 16 MiB per stream read after the process exited
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LANG": "C.UTF-8",
    "TERM": "xterm-256color",
}
# Warmed during the image build: Gemini CLI compiles its bundle from this cache instead of from scratch.
if os.path.isdir("/var/cache/node-compile-cache"):
    DEFAULT_ENV["NODE_COMPILE_CACHE"] = "/var/cache/node-compile-cache"



class SpawnError(Exception):
    """The program could not be started (missing, not executable, bad cwd)."""


class NoSuchExec(LookupError):
    """No exec with that id is running (never was, or it has finished)."""


class InputClosed(Exception):
    """The exec runs, but its stdin was never kept open or has been closed."""


class Exec:
    """A started process and its input side, shared by the thread streaming its output and /input's threads."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: int | None, pty: bool) -> None:
        self.proc = proc
        self.pty = pty
        # The PTY master or the stdin pipe's write end; None once closed. Guarded by `lock`: the stream thread
        # closes it when the process ends, and a number closed under a writer could be reused by another file.
        self.stdin = stdin
        self.lock = threading.Lock()
        # Set once the request's own stdin is written, so /input bytes never overtake it.
        self.fed = threading.Event()
        self.ending = False  # set by the stream thread before it closes stdin: blocked writers give up

    def close_stdin(self) -> None:
        """Caller holds `lock`."""
        if self.stdin is None:
            return
        if self.pty:
            os.close(self.stdin)
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # closes the fd we wrote to; Popen's file object never buffered anything
        self.stdin = None

    def write(self, data: bytes, wait_s: float | None) -> int:
        """Caller holds `lock` and has checked `stdin`. Returns how much was written before the process stopped
        reading for wait_s (None: for as long as it runs); OSError (EPIPE, EIO) when the reader is gone."""
        fd = self.stdin
        assert fd is not None
        deadline = None if wait_s is None else time.monotonic() + wait_s
        done = 0
        while done < len(data) and not self.ending:
            try:
                done += os.write(fd, data[done:])
            except BlockingIOError:
                left = WRITE_SLICE_S if deadline is None else min(WRITE_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    break
                select.select([], [fd], [], left)
        return done


# exec_id -> Exec, for POST /signal, POST /input and /health's count.
RUNNING: dict[str, Exec] = {}
_lock = threading.Lock()


def _make_controlling_tty() -> None:
    # Runs in the child after setsid() (start_new_session): fd 0 is the PTY slave; make it the session's
    # terminal so job control, Ctrl-C and isatty() behave as in a real terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn(req: ExecRequest) -> tuple[str, Exec]:
    """Start the process and register it under a new exec id."""
    env, cwd, ids = {**DEFAULT_ENV, **req.env}, req.cwd, {}
    master = None
    try:
        if req.user is not None:
            account = accounts.lookup(req.user)
            env = {**DEFAULT_ENV, **account.env(), **req.env}
            cwd = cwd or (account.home if os.path.isdir(account.home) else "/")
            if account.uid != os.geteuid():  # (the agent's own account needs no switch, and keeps vfork)
                ids = {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}
        warm_key = warm.key_of(req, env, cwd, ids)
        proc = None if warm_key is None else warm.take(warm_key, req.args[3])
        if warm_key is not None:
            warm.prepare(warm_key, env, cwd, ids)  # the next one like it
        if proc is not None:
            stdin = None
        elif req.pty:
            master, slave = os.openpty()
            if req.pty_size is not None:
                _set_size(master, *req.pty_size)
            try:
                proc = subprocess.Popen(req.args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                        start_new_session=True, preexec_fn=_make_controlling_tty, **ids)
            finally:
                os.close(slave)
            stdin = master
        else:
            piped = req.stdin is not None or req.keep_stdin_open
            proc = subprocess.Popen(req.args, stdin=subprocess.PIPE if piped else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                    start_new_session=True, **ids)
            stdin = proc.stdin.fileno() if proc.stdin is not None else None
    except (OSError, ValueError, subprocess.SubprocessError, accounts.NoSuchUser) as exc:
        if master is not None:
            os.close(master)
        raise SpawnError(str(exc)) from None
    if stdin is not None:
        os.set_blocking(stdin, False)  # writers wait in select, so a process that does not read cannot hang them
    ex = Exec(proc, stdin, req.pty)
    if req.stdin is None:
        ex.fed.set()
    exec_id = uuid.uuid4().hex[:16]
    with _lock:
        RUNNING[exec_id] = ex
    return exec_id, ex


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(exec_id: str) -> Exec | None:
    with _lock:
        ex = RUNNING.get(exec_id)
    return None if ex is None or ex.proc.returncode is not None else ex


def discard(exec_id: str, ex: Exec) -> None:
    """For an exec whose stream never started (the response could not be sent): kill it and free it."""
    kill_group(ex.proc)
    _release(exec_id, ex)


def _release(exec_id: str, ex: Exec) -> None:
    """Once the process has exited or been killed: close its fds, reap it, forget it."""
    ex.ending = True  # a writer blocked on this process gives up within WRITE_SLICE_S and frees the lock
    with ex.lock:
        ex.close_stdin()
    ex.fed.set()  # wakes /input calls waiting for the initial stdin; they find the exec ending
    ex.proc.wait()
    for pipe in (ex.proc.stdout, ex.proc.stderr):
        if pipe is not None:
            pipe.close()
    with _lock:
        RUNNING.pop(exec_id, None)


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def resize(exec_id: str, rows: int, cols: int) -> bool:
    """Set a running PTY exec's window size (the kernel sends its process group SIGWINCH)."""
    ex = _running(exec_id)
    if ex is None or not ex.pty:
        return False
    with ex.lock:
        if ex.stdin is None:
            return False
        _set_size(ex.stdin, rows, cols)
    return True


def send_signal(exec_id: str, sig: int) -> bool:
    ex = _running(exec_id)
    if ex is None:
        return False
    kill_group(ex.proc, sig)
    return True


def write_input(exec_id: str, data: bytes, eof: bool) -> int:
    """POST /input: write to a running exec's terminal or kept-open stdin pipe; returns the bytes written."""
    ex = _running(exec_id)
    if ex is None:
        raise NoSuchExec(exec_id)
    if not ex.fed.wait(INPUT_WAIT_S):
        return 0  # the request's own stdin is still not read; this input may not jump ahead of it
    with ex.lock:
        if ex.ending:
            raise NoSuchExec(exec_id)
        if ex.stdin is None:
            raise InputClosed(exec_id)
        try:
            written = ex.write(data, INPUT_WAIT_S)
            if eof and written == len(data):
                # Closing a PTY master would hang up the terminal and lose its output; type EOF instead.
                if ex.pty:
                    ex.write(EOT, INPUT_WAIT_S)
                else:
                    ex.close_stdin()
        except OSError:  # EPIPE or EIO: the process, or every holder of its terminal, is gone
            raise NoSuchExec(exec_id) from None
    return written


def _feed_stdin(ex: Exec, data: bytes, close: bool) -> None:
    # In a thread: a large stdin must not deadlock against a child that writes before it reads.
    with ex.lock:
        try:
            if ex.stdin is not None:
                ex.write(data, None)
                if close:
                    ex.close_stdin()
        except OSError:  # the reader is gone: nothing more can be written
            ex.close_stdin()
    ex.fed.set()


def detach(req: ExecRequest, exec_id: str, ex: Exec) -> backlog.Backlog:
    """Pump a detach exec's events into a backlog of its own, in a thread, with no client to watch."""
    log = backlog.Backlog(exec_id, ex.proc.pid, req.meta)
    backlog.register(log)

    def pump() -> None:
        try:
            stream(req, exec_id, ex, None, log.add)
        finally:
            backlog.finished(log)

    threading.Thread(target=pump, name=f"exec-{exec_id}", daemon=True).start()
    return log


def stream(req: ExecRequest, exec_id: str, ex: Exec, client: socket.socket | None,
           emit: Callable[[bytes], None]) -> None:
    """Pump output into `emit` as NDJSON lines until the process exits; kill it if time runs out, or if the
    client leaves (without a client, as for a detach exec, only the process's end or its timeout stop it)."""
    started = time.monotonic()
    seq = 0
    proc = ex.proc

    def event(**kw: object) -> None:
        nonlocal seq
        emit(ExecEvent(seq=seq, **kw).to_line())  # type: ignore[arg-type]
        seq += 1

    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(proc.pid)
    try:
        event(type="start", exec_id=exec_id, pid=proc.pid)
        if ex.pty:
            assert ex.stdin is not None
            sel.register(ex.stdin, selectors.EVENT_READ, "stdout")  # the master: output is read where input goes
        else:
            assert proc.stdout is not None and proc.stderr is not None
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe.fileno(), selectors.EVENT_READ, name)
        if req.stdin is not None:
            # A pipe is closed after it (EOF) unless kept open; a terminal stays open for /input anyway.
            close = not (ex.pty or req.keep_stdin_open)
            threading.Thread(target=_feed_stdin, args=(ex, base64.b64decode(req.stdin), close), daemon=True).start()
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        if client is not None:
            sel.register(client, selectors.EVENT_READ, "client")
        deadline = None if req.timeout_s is None else started + req.timeout_s
        timed_out = False
        exited = False
        # Streams may close before the process ends (it closed stdout); keep waiting for its exit.
        while not exited:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = sel.select(wait)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                kill_group(proc)
                break
            for key, _ in ready:
                if key.data == "exit":
                    exited = True
                elif key.data == "client":
                    if client is not None and client_gone(client):
                        kill_group(proc)
                        raise BrokenPipeError("client disconnected")
                    sel.unregister(client)  # it sent bytes we do not expect; stop watching rather than spin
                elif not _pump(key.fd, key.data, event):
                    sel.unregister(key.fd)
        # The process has exited (or was killed): drain what is already in the pipes, without waiting for
        # grandchildren that may keep them open.
        for key in list(sel.get_map().values()):
            if key.data in ("stdout", "stderr"):
                # Bounded: a daemon that escaped the process group could otherwise keep us here forever.
                for _ in range(DRAIN_READS):
                    if not _pump(key.fd, key.data, event, drain=True):
                        break
        code = proc.wait()
        event(type="exit", code=code, timed_out=timed_out, duration_s=round(time.monotonic() - started, 3))
    except BaseException:
        kill_group(proc)
        raise
    finally:
        sel.close()
        os.close(pidfd)
        _release(exec_id, ex)


def _pump(fd: int, name: str, event: Callable[..., None], drain: bool = False) -> bool:
    """Read once from fd and emit; False at end of stream (or, when draining, when nothing is left)."""
    try:
        data = os.read(fd, READ_SIZE)
    except BlockingIOError:
        return not drain
    except OSError:  # EIO: a PTY whose last slave holder closed it
        return False
    if not data:
        return False
    event(type=name, data=base64.b64encode(data).decode("ascii"))
    return True
