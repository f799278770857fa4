"""Run a provider adapter's own `Command` inside the stand-ins' namespace, as the guest agent would.

The adapters build guest commands (`claude` on PATH under /usr/local/bin, files at guest paths). Here the
same command runs on the host: argv[0] becomes the CLI installed by `clis.install`, a Node >= 20 goes on PATH,
and the declared files are written first — everything else (argv, environment, cwd, stdin) is the adapter's.
Tests make the adapter's paths host paths by building `GuestEnv` with `home`/`workdir`/`login_dir` under
their temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from polydev.providers.base import Command, GuestEnv, GuestFile, LoginPlan, hook_files
from tests.standins import clis
from tests.standins.harness import Standins, kill_group

CLI_OF_PROVIDER = {"claude_code": clis.CLAUDE, "codex": clis.CODEX, "gemini_cli": clis.GEMINI}


def guest_env(si: Standins, root: Path) -> GuestEnv:
    """A GuestEnv whose paths are under `root` and whose network is the stand-ins'."""
    env = GuestEnv(home=str(root / "home"), workdir=str(root / "work"), login_dir=str(root / "login"),
                   https_proxy=si.proxy_url, ca_cert_path=str(si.ca.cert_path), api_base_url=si.api_url)
    for d in (env.home, env.workdir, env.login_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    return env


def write_files(files: Iterable[GuestFile]) -> None:
    for f in files:
        path = Path(f.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)
        os.chmod(path, f.mode)


def host_argv_env(cmd: Command, exe: Path) -> tuple[list[str], dict[str, str]]:
    parts = cmd.env.get("PATH", "").split(":")
    # A login's hook directory stays first on PATH (that is how `xdg-open` is caught); Node comes next.
    parts.insert(1 if parts[0] != "/usr/local/bin" else 0, str(clis.node_dir()))
    return [str(exe), *cmd.argv[1:]], {**cmd.env, "PATH": ":".join(parts)}


def run(si: Standins, cmd: Command, exe: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run an adapter command to completion in the namespace (files written first)."""
    write_files(cmd.files)
    argv, env = host_argv_env(cmd, exe)
    Path(cmd.cwd).mkdir(parents=True, exist_ok=True)
    stdin = cmd.stdin.decode() if cmd.stdin is not None else None
    return si.run(argv, env, cwd=Path(cmd.cwd), timeout=timeout, input=stdin)


def popen(si: Standins, cmd: Command, exe: Path, **kwargs: object) -> subprocess.Popen[str]:
    write_files(cmd.files)
    argv, env = host_argv_env(cmd, exe)
    Path(cmd.cwd).mkdir(parents=True, exist_ok=True)
    return si.popen(argv, env, cwd=Path(cmd.cwd), **kwargs)


class Running:
    """An adapter command started in the namespace the way the guest agent starts it: under a PTY when the
    command asks for one (output and input both go through it), else with pipes (stderr merged into the
    output). `cmd.stdin` is written first; stdin is closed afterwards unless `keep_stdin_open`."""

    def __init__(self, si: Standins, cmd: Command, exe: Path) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        if cmd.pty:
            master, slave = os.openpty()
            self.proc = popen(si, cmd, exe, stdin=slave, stdout=slave, stderr=slave)
            os.close(slave)
            self._out_fd, self._in_fd = master, master
        else:
            self.proc = popen(si, cmd, exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert self.proc.stdout is not None and self.proc.stdin is not None
            self._out_fd, self._in_fd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if cmd.stdin:
            self.write(cmd.stdin)
        if not cmd.keep_stdin_open and not cmd.pty:
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._out_fd, 65536)
            except OSError:  # EIO on a PTY once the last writer has gone
                return
            if not chunk:
                return
            with self._lock:
                self._buf.extend(chunk)

    def write(self, data: bytes) -> None:
        os.write(self._in_fd, data)

    def output(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        kill_group(self.proc)
        self._reader.join(timeout=10)
        if self.proc.stdout is None:
            os.close(self._out_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_login(si: Standins, plan: LoginPlan, env: GuestEnv, exe: Path) -> Running:
    """A login as the login flow starts it: the platform's URL-recording hook first, then the plan."""
    write_files(hook_files(env))
    return Running(si, plan.command, exe)
