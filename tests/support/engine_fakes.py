"""A stand-in hypervisor for engine tests: a real, detached process carrying the VM's marker in its
command line (exactly what reconcile looks for), a console log, and configurable failures."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from polydev.vm.types import BackendInfo, Started, VMSpec

_SLEEPER = "import sys, time\nprint('booted', sys.argv[1], flush=True)\ntime.sleep(1e6)\n"


class FakeBackend:
    name = "fake"
    accel: str | None = None  # what describe() reports (tests set it)

    def __init__(self) -> None:
        self.fail_next: str | None = None
        self.block: asyncio.Event | None = None  # hold start() mid-way, to test interruptions
        self.started: list[VMSpec] = []

    def console_log(self, workdir: Path) -> Path:
        return workdir / "console.log"

    def describe(self) -> BackendInfo:
        return BackendInfo(accel=self.accel)  # no image manifest

    async def start(self, spec: VMSpec) -> Started:
        with open(self.console_log(spec.workdir), "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", _SLEEPER, spec.marker], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        (spec.workdir / "disk.qcow2").write_bytes(b"overlay")
        self.started.append(spec)
        try:
            for _ in range(1000):  # "the agent is ready": its line is on the console
                if b"booted" in self.console_log(spec.workdir).read_bytes():
                    break
                await asyncio.sleep(0.01)
            if self.block is not None:
                await self.block.wait()
            if self.fail_next:
                reason, self.fail_next = self.fail_next, None
                raise RuntimeError(reason)
        except BaseException:
            await self.stop(proc.pid, spec.workdir)
            raise
        return Started(pid=proc.pid, agent_url="http://127.0.0.1:9", agent_port=9)

    async def stop(self, pid: int | None, workdir: Path) -> None:
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Reap it if it is our child; otherwise wait until the kernel has it gone.
        for _ in range(200):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    return
            await asyncio.sleep(0.01)
