"""Login shells started ahead of the command they will run: E2B's `bash -l -c CMD` without bash's start-up.

E2B's SDK runs every command as `/bin/bash -l -c CMD`. Under an emulated CPU starting that shell (fork, exec,
the dynamic loader, the login files) costs 120-170 ms, several times the rest of a command's round trip
(bench/README.md). So after each such exec the agent starts the next shell of the same kind (account,
environment, cwd) at the lowest CPU priority, and that shell reads the login files and waits for its command
on a pipe of its own. An exec that matches takes it: the command is written to the pipe (which holds it if the
shell is still in its login files: it has a head start either way), the shell gets its normal priority back,
and it `eval`s the command. The process, its pid, its output pipes and its exit status are those a fresh
`bash -l -c CMD` would have had; the login files simply ran earlier. An exec that matches none starts bash as
usual. A kind gets a shell started ahead only once it has been asked for twice: commands that each bring an
environment of their own would otherwise pay for two shells each.
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
FORK_WAIT_S = 2.0  # a match waits this long for a shell whose fork is under way (it is further along)
MAX_SEEN = 16  # kinds of shell remembered as asked for
# Another account's shell changes its ids through setpriv: Popen's own user= forks the agent instead of
# vforking it, and under TCG that copy slows the command running meanwhile by ~15 ms (measured).
SETPRIV = "/usr/bin/setpriv"
IDLE_NICE = 19  # while it waits: the command running now keeps the CPU
# The shell reads its command from the pipe (up to a NUL or the pipe's end), closes it, then runs it in the
# shell itself, as `bash -c` would. `{fd}` is the pipe's number, the same in the shell (pass_fds).
SCRIPT = 'IFS= read -r -d "" __polydev_command <&{fd}; exec {fd}<&-; eval "unset __polydev_command; $__polydev_command"'

Key = tuple[Any, ...]


def key_of(req: ExecRequest, env: dict[str, str], cwd: str | None, ids: dict[str, Any]) -> Key | None:
    """What a waiting shell must share with the request to stand in for it; None when none can."""
    if req.args[:3] != list(LOGIN_SHELL) or len(req.args) != 4 or req.pty or req.keep_stdin_open \
            or req.stdin is not None:
        return None
    return (tuple(sorted(env.items())), cwd, tuple(sorted((k, str(v)) for k, v in ids.items())))


class _Shell:
    def __init__(self, proc: subprocess.Popen[bytes], command_fd: int) -> None:
        self.proc = proc
        self.command_fd = command_fd  # our end of its command pipe


_ready: OrderedDict[Key, _Shell] = OrderedDict()
_starting: set[Key] = set()
_seen: OrderedDict[Key, None] = OrderedDict()
_lock = threading.Condition()


def take(key: Key, command: str) -> subprocess.Popen[bytes] | None:
    """The waiting shell for `key`, now running `command`; None if there is none (or it has died)."""
    with _lock:
        _lock.wait_for(lambda: key not in _starting, FORK_WAIT_S)
        shell = _ready.pop(key, None)
    if shell is None:
        return None
    try:
        if shell.proc.poll() is not None:
            raise OSError("the waiting shell has ended")
        os.setpriority(os.PRIO_PROCESS, shell.proc.pid, 0)
        # A command is at most the size of an exec request; the pipe takes 64 KiB before it blocks, and the
        # shell reads as it comes.
        os.write(shell.command_fd, command.encode() + b"\0")
    except OSError:
        _end(shell)
        return None
    finally:
        os.close(shell.command_fd)
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
    argv = [*LOGIN_SHELL, SCRIPT.format(fd=read_end)]
    if ids and os.path.exists(SETPRIV):
        groups = ",".join(str(g) for g in ids["extra_groups"])
        argv = [SETPRIV, f"--reuid={ids['user']}", f"--regid={ids['group']}",
                f"--groups={groups}" if groups else "--clear-groups", "--", *argv]
        ids = {}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, pass_fds=(read_end,), **ids)
        os.setpriority(os.PRIO_PROCESS, proc.pid, IDLE_NICE)  # (a preexec_fn would cost vfork)
    except (OSError, ValueError, subprocess.SubprocessError):
        os.close(write_end)
        with _lock:
            _starting.discard(key)
            _lock.notify_all()
        return
    finally:
        os.close(read_end)
    evicted: list[_Shell] = []
    with _lock:
        _starting.discard(key)
        _ready[key] = _Shell(proc, write_end)
        _lock.notify_all()
        while len(_ready) > MAX_WARM:
            evicted.append(_ready.popitem(last=False)[1])
    for shell in evicted:
        os.close(shell.command_fd)
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
