"""Run build tools as child processes: argument lists only, output streamed line by line, and the child
killed (with its process group) if the caller fails or is interrupted, so nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
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
