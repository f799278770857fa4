"""A stand-in hypervisor whose "guest" is the real guest agent, run as a host process on a loopback port with
the token the engine handed over: exec goes through the engine's agent client end to end, and no VM boots."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import polydev
from polydev import protocol as p
from polydev.vm.engine import Started, VMSpec
from tests.support.engine_fakes import FakeBackend
from tests.support.servers import free_port

AGENT_START_S = 60.0  # for the agent process to print its READY line

SRC = Path(polydev.__file__).resolve().parents[1]
# The guest agent as a host process; the VM's marker rides along as an argument reconcile can find.
_AGENT = "import sys; from polydev.guest.agent import main; main(sys.argv[2:])"


class AgentBackend(FakeBackend):
    """The stand-in hypervisor, with the real guest agent as its "guest": on a loopback port, holding the
    token the engine handed over, so exec runs through the engine's agent client end to end."""

    name = "agent"

    def __init__(self, vnc_endpoint: tuple[str, int] | None = None) -> None:
        super().__init__()
        # Where a `browser` VM's VNC server is: a fake RFB server the test runs (no X server on the host).
        self.vnc_endpoint = vnc_endpoint

    async def start(self, spec: VMSpec) -> Started:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(SRC), "POLYDEV_AGENT_TOKEN": spec.token}
        with open(self.console_log(spec.workdir), "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", _AGENT, spec.marker, "--host", "127.0.0.1", "--port",
                                     str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started.append(spec)
        # The agent prints its READY line once it listens: a Python start, which on a loaded 2-core machine
        # (load 20+) took longer than the 10 s once allowed here.
        deadline = time.monotonic() + AGENT_START_S
        while time.monotonic() < deadline:
            if p.READY_MARKER.encode() in self.console_log(spec.workdir).read_bytes():
                vnc = self.vnc_endpoint if spec.purpose == "browser" else None
                return Started(pid=proc.pid, agent_url=f"http://127.0.0.1:{port}", agent_port=port,
                               vnc_address=vnc)
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        await self.stop(proc.pid, spec.workdir)
        raise RuntimeError("agent did not start")
