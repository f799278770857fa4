"""Login shells started ahead of the command they will run: E2B's `bash -l -c CMD` without bash's start-up.

E2B's SDK runs every command as `/bin/bash -l -c CMD`. Under an emulated CPU starting that shell (fork, exec,
the dynamic loader, the login files) costs 120-170 ms, several times the rest of a command's round trip
(bench/README.md). So after each such exec the agent starts the next shell of the same kind (account,
environment, cwd) at the lowest CPU priority, and that shell reads the login files, says it is ready on one
pipe and waits for its command on another. An exec that matches a ready shell takes it: the command is written
to the pipe, the shell gets its normal priority back, and it `eval`s the command. The process, its pid, its
output pipes and its exit status are those a fresh `bash -l -c CMD` would have had; the login files simply ran
earlier. An exec that finds none ready starts bash as usual: one still in its login files, starved by the
commands before it at nice 19, would be slower than a fresh start (measured back to back). A kind gets a
shell started ahead only once it has been asked for twice: commands that each bring an environment of their
own would otherwise pay for two shells each.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import OrderedDict
from typing import Any

from polydev.protocol import ExecRequest

LOGIN_SHELL = ("/bin/bash", "-l", "-c")
MAX_WARM = 2  # shells kept ready at once, the least recently asked-for ended first
MAX_SEEN = 16  # kinds of shell remembered as asked for
# Another account's shell changes its ids through setpriv: Popen's own user= forks the agent instead of
# vforking it, and under TCG that copy slows the command running meanwhile by ~15 ms (measured).
SETPRIV = "/usr/bin/setpriv"
IDLE_NICE = 19  # while it waits: the command running now keeps the CPU
# Once the login files have run, the shell writes a byte to the ready pipe and closes it, reads its command
# from the command pipe (up to a NUL or the pipe's end), closes that, and runs the command in the shell itself,
# as `bash -c` would. `{ready}` and `{fd}` are the pipes' numbers, the same in the shell (pass_fds).
SCRIPT = ('printf . >&{ready}; exec {ready}>&-; IFS= read -r -d "" __polydev_command <&{fd}; exec {fd}<&-; '
          'eval "unset __polydev_command; $__polydev_command"')

Key = tuple[Any, ...]


def key_of(req: ExecRequest, env: dict[str, str], cwd: str | None, ids: dict[str, Any]) -> Key | None:
    """What a waiting shell must share with the request to stand in for it; None when none can."""
    if req.args[:3] != list(LOGIN_SHELL) or len(req.args) != 4 or req.pty or req.keep_stdin_open \
            or req.stdin is not None:
        return None
    return (tuple(sorted(env.items())), cwd, tuple(sorted((k, str(v)) for k, v in ids.items())))


class _Shell:
    def __init__(self, proc: subprocess.Popen[bytes], command_fd: int, ready_fd: int) -> None:
        self.proc = proc
        self.command_fd = command_fd  # our end of its command pipe
        self.ready_fd = ready_fd  # our end of its ready pipe (non-blocking)

    def ready(self) -> bool | None:
        """True once its login files have run; False while they run; None if it ended before."""
        try:
            return bool(os.read(self.ready_fd, 1)) or None
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.command_fd)
        os.close(self.ready_fd)


_ready: OrderedDict[Key, _Shell] = OrderedDict()
_starting: set[Key] = set()
_seen: OrderedDict[Key, None] = OrderedDict()
_lock = threading.Lock()


def take(key: Key, command: str) -> subprocess.Popen[bytes] | None:
    """The ready shell for `key`, now running `command`; None if there is none ready (or it has died)."""
    with _lock:
        shell = _ready.get(key)
        ready = None if shell is None else shell.ready()
        if shell is None or ready is False:
            return None  # one still starting stays for a later exec
        del _ready[key]
    try:
        if not ready or shell.proc.poll() is not None:
            raise OSError("the waiting shell has ended")
        os.setpriority(os.PRIO_PROCESS, shell.proc.pid, 0)
        # A command is at most the size of an exec request; the pipe takes 64 KiB before it blocks, and the
        # shell reads as it comes.
        os.write(shell.command_fd, command.encode() + b"\0")
    except OSError:
        _end(shell)
        return None
    finally:
        shell.close()
    return shell.proc


def prepare(key: Key, env: dict[str, str], cwd: str | None, ids: dict[str, Any]) -> None:
    """Start a shell for `key` in a thread of its own (the fork costs tens of milliseconds under TCG), unless
    one is ready or starting, or `key` is asked for the first time."""
    with _lock:
        first = key not in _seen
        _seen[key] = None
        _seen.move_to_end(key)
        while len(_seen) > MAX_SEEN:
            _seen.popitem(last=False)
        if first:
            return
        if key in _ready or key in _starting:
            if key in _ready:
                _ready.move_to_end(key)
            return
        _starting.add(key)
    threading.Thread(target=_start, args=(key, env, cwd, ids), name="warm-shell", daemon=True).start()


def _start(key: Key, env: dict[str, str], cwd: str | None, ids: dict[str, Any]) -> None:
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    os.set_blocking(ready_read, False)
    argv = [*LOGIN_SHELL, SCRIPT.format(fd=read_end, ready=ready_write)]
    if ids and os.path.exists(SETPRIV):
        groups = ",".join(str(g) for g in ids["extra_groups"])
        argv = [SETPRIV, f"--reuid={ids['user']}", f"--regid={ids['group']}",
                f"--groups={groups}" if groups else "--clear-groups", "--", *argv]
        ids = {}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, pass_fds=(read_end, ready_write), **ids)
    except (OSError, ValueError, subprocess.SubprocessError):
        os.close(write_end)
        os.close(ready_read)
        with _lock:
            _starting.discard(key)
        return
    finally:
        os.close(read_end)
        os.close(ready_write)
    try:
        os.setpriority(os.PRIO_PROCESS, proc.pid, IDLE_NICE)  # (a preexec_fn would cost vfork)
    except OSError:  # it ended already: the first exec to find it sees so
        pass
    evicted: list[_Shell] = []
    with _lock:
        _starting.discard(key)
        _ready[key] = _Shell(proc, write_end, ready_read)
        while len(_ready) > MAX_WARM:
            evicted.append(_ready.popitem(last=False)[1])
    for shell in evicted:
        shell.close()
        _end(shell)


def _end(shell: _Shell) -> None:
    """A shell no request will take: its pipe's end makes `read` fail, and it is killed for certain."""
    try:
        os.killpg(shell.proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    shell.proc.wait()
    for pipe in (shell.proc.stdout, shell.proc.stderr):
        if pipe is not None:
            pipe.close()


def waiting() -> int:
    with _lock:
        return len(_ready)
