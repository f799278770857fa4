"""A VM's lifetime as its supervisor sees it: the deadline file in its work directory, and the command line
that starts a hypervisor under a supervisor (polydev.vm.supervisor, which says why and how).

The deadline file, `<work directory>/deadline`, is written by the engine before anything starts and again
whenever the VM's expiry moves (a pooled VM handed out, `engine.assign`): empty while the VM has no expiry (a
pooled one), else the Unix time it expires. Past, or gone (`withdraw`, or the work directory removed): the
supervisor kills the VM, or refuses to start it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from polydev.vm import supervisor

DEADLINE = "deadline"


def deadline_file(workdir: Path) -> Path:
    return workdir / DEADLINE


def set_deadline(path: Path, expires: datetime | None) -> None:
    """Let the VM run until `expires` (None: no expiry yet). Atomic: a supervisor never reads half a file.
    FileNotFoundError when the work directory is gone."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("" if expires is None else f"{expires.timestamp():.3f}\n")
    os.replace(tmp, path)


def withdraw(path: Path) -> None:
    """End the VM now: its supervisor kills it within a tick, or refuses to start it."""
    path.unlink(missing_ok=True)


def hold(workdir: Path) -> Path:
    """A deadline file without expiry, for a VM no engine keeps one for (a snapshot template, a test's VM):
    it runs until its work directory or the process that started it is gone."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = deadline_file(workdir)
    set_deadline(path, None)
    return path


def supervised(argv: Sequence[str], workdir: Path, deadline: Path, *, nice: int = 0) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `argv` under a supervisor bound to `deadline`, `workdir`
    and this process; `nice` > 0 runs it at that lower CPU priority."""
    args = [str(a) for a in argv]
    if any(supervisor.SEP in a for a in args):
        raise ValueError(f"a command line for the supervisor cannot hold {supervisor.SEP!r}")
    script = str(Path(supervisor.__file__).resolve())
    return ([sys.executable or "python3", "-I", "-S", script, str(workdir.absolute()), str(deadline.absolute()),
             str(os.getpid())], {**os.environ, supervisor.ARGV_ENV: supervisor.SEP.join(args),
                                 **({supervisor.NICE_ENV: str(nice)} if nice > 0 else {})})
