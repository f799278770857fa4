"""Run one command for POST /exec and stream its output as ordered events.

Each command runs in its own session (process group), so a timeout, a client that went away or a
POST /signal reaches the whole tree it started, not only the first process.
"""

from __future__ import annotations

import base64
import fcntl
import os
import selectors
import signal
import socket
import subprocess
import termios
import threading
import time
import uuid
from typing import Callable

from polydev.protocol import ExecEvent, ExecRequest

READ_SIZE = 64 * 1024
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

# exec_id -> Popen, for POST /signal and /health's count.
RUNNING: dict[str, subprocess.Popen[bytes]] = {}
_lock = threading.Lock()


class SpawnError(Exception):
    """The program could not be started (missing, not executable, bad cwd)."""


def _make_controlling_tty() -> None:
    # Runs in the child after setsid() (start_new_session): fd 0 is the PTY slave; make it the session's
    # terminal so job control, Ctrl-C and isatty() behave as in a real terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn(req: ExecRequest) -> tuple[str, subprocess.Popen[bytes], int | None]:
    """Start the process. Returns (exec_id, process, pty master fd or None)."""
    env = {**DEFAULT_ENV, **req.env}
    master = None
    try:
        if req.pty:
            master, slave = os.openpty()
            try:
                proc = subprocess.Popen(req.args, stdin=slave, stdout=slave, stderr=slave, cwd=req.cwd, env=env,
                                        start_new_session=True, preexec_fn=_make_controlling_tty)
            finally:
                os.close(slave)
        else:
            proc = subprocess.Popen(req.args, stdin=subprocess.PIPE if req.stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=req.cwd, env=env,
                                    start_new_session=True)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        if master is not None:
            os.close(master)
        raise SpawnError(str(exc)) from None
    exec_id = uuid.uuid4().hex[:16]
    with _lock:
        RUNNING[exec_id] = proc
    return exec_id, proc, master


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def send_signal(exec_id: str, sig: int) -> bool:
    with _lock:
        proc = RUNNING.get(exec_id)
    if proc is None or proc.returncode is not None:
        return False
    kill_group(proc, sig)
    return True


def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    # In a thread: a large stdin must not deadlock against a child that writes before it reads.
    try:
        assert proc.stdin is not None
        proc.stdin.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass


def stream(req: ExecRequest, exec_id: str, proc: subprocess.Popen[bytes], master: int | None,
           client: socket.socket, emit: Callable[[bytes], None]) -> None:
    """Pump output into `emit` as NDJSON lines until the process exits; kill it if the client leaves or time runs out."""
    started = time.monotonic()
    seq = 0

    def event(**kw: object) -> None:
        nonlocal seq
        emit(ExecEvent(seq=seq, **kw).to_line())  # type: ignore[arg-type]
        seq += 1

    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(proc.pid)
    try:
        event(type="start", exec_id=exec_id, pid=proc.pid)
        stdin = base64.b64decode(req.stdin) if req.stdin else b""
        if master is not None:
            os.set_blocking(master, False)
            sel.register(master, selectors.EVENT_READ, "stdout")
            if stdin:
                os.write(master, stdin)  # the terminal's input queue takes a few KB; plenty for prompts
        else:
            assert proc.stdout is not None and proc.stderr is not None
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe.fileno(), selectors.EVENT_READ, name)
            if proc.stdin is not None:
                threading.Thread(target=_feed_stdin, args=(proc, stdin), daemon=True).start()
        sel.register(pidfd, selectors.EVENT_READ, "exit")
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
                    if _client_gone(client):
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
        if master is not None:
            os.close(master)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        with _lock:
            RUNNING.pop(exec_id, None)


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


def _client_gone(client: socket.socket) -> bool:
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
