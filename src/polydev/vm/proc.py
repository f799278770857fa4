"""Processes, the two kinds the vm package deals with.

- Build tools, run as child processes: argument lists only, output streamed line by line, and the child
  killed (with its process group) if the caller fails or is interrupted, so nothing is left behind.
- Hypervisor processes: each carries its engine's marker (`polydev-<tag>-<vm id>`) in its command line, so
  an engine finds its VMs on the machine after a crash, and kills one only when its command line still names
  that VM (a stale pid may have been reused by another process since). Each is started under a supervisor
  (polydev.vm.supervisor) that execs it, so its pid and marker are its own; the supervisor, in its process
  group and without a marker, goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

LineSink = Callable[[str], None]


class CommandError(RuntimeError):
    def __init__(self, args: Sequence[str], code: int, tail: list[str]) -> None:
        text = "\n".join(tail[-20:])
        super().__init__(f"{args[0]} exited with {code}:\n{text}")
        self.code = code
        self.tail = tail


def run(args: Sequence[str | os.PathLike[str]], *, on_line: LineSink | None = None,
        env: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """Run to completion; return the output lines (stdout and stderr merged). Raise CommandError on failure."""
    argv = [str(a) for a in args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=full_env, cwd=cwd, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            if len(lines) > 2000:  # keep memory bounded for chatty tools; the tail is what explains a failure
                del lines[:1000]
            if on_line and line:
                on_line(line)
        code = proc.wait()
    except BaseException:
        kill_tree(proc)
        raise
    finally:
        if proc.stdout:
            proc.stdout.close()
    if code:
        raise CommandError(argv, code, lines)
    return lines


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# -- hypervisor processes ---------------------------------------------------------------------------------


def engine_tag(data_dir: Path) -> str:
    """The engine's tag: one per data directory, so two engines on one machine never reclaim each other's VMs."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]


def marker_for(tag: str, vm_id: uuid.UUID) -> str:
    return f"polydev-{tag}-{vm_id}"


def template_marker(marker: str) -> str:
    """The marker of a snapshot template started for the VM `marker` names: the same engine's marker with an
    id of its own, so a crash mid-snapshot leaves nothing that reconcile misses."""
    return marker.rsplit("-", 5)[0] + "-" + str(uuid.uuid4())  # a UUID's text has four hyphens


def find_marked_processes(tag: str, proc_root: Path = Path("/proc")) -> dict[uuid.UUID, int]:
    """Hypervisor processes of this engine on the machine, found by the marker in their command line."""
    prefix = f"polydev-{tag}-".encode()
    found: dict[uuid.UUID, int] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        for arg in args:
            pos = arg.find(prefix)
            if pos < 0:
                continue
            text = arg[pos + len(prefix):pos + len(prefix) + 36].decode(errors="replace")
            with contextlib.suppress(ValueError):
                found[uuid.UUID(text)] = int(entry.name)
            break
    return found


def process_gone(pid: int) -> bool:
    """True when `pid` has exited: no such process, or a zombie its parent has yet to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


async def wait_gone(pid: int, timeout: float) -> None:
    """Wait (at most `timeout` s) until `pid`, which is not our child, has exited."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not process_gone(pid) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


def kill_vm_process(pid: int, vm_key: str, wait_s: float = 10.0) -> None:
    """SIGKILL the process group of `pid` if its command line names `vm_key` (a stale pid, reused by some
    other process since, is left alone), and wait until it is gone. For a VM of an earlier engine process:
    no driver of ours knows it, just its pid (from its row or its marker) and its id."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if vm_key.encode() not in cmdline:
        return
    try:
        group = os.getpgid(pid)
        if group == os.getpgrp():  # never our own group; VM processes are started in a session of their own
            os.kill(pid, signal.SIGKILL)
        else:
            os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if process_gone(pid):
                return
        time.sleep(0.01)
