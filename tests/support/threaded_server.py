"""The app served by uvicorn on a loopback port from a thread of the test process, over an engine on the
stand-in hypervisor whose "guest" is the real agent on the host (tests/support/agent_backend.py): for clients
that speak real HTTP themselves (the e2b SDK) without booting a VM."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.services import build_vm_engine, open_services
from polydev.vm.engine import find_marked_processes
from tests.support.agent_backend import AgentBackend
from tests.support.e2b_checks import new_user
from tests.support.servers import free_port


@dataclass
class ThreadedServer:
    url: str
    admin_token: str

    def new_user(self, name: str) -> str:
        """A user and their API token, made through the API."""
        return new_user(self.url, self.admin_token, name)


@contextmanager
def threaded_server(settings: Settings) -> Iterator[ThreadedServer]:
    port = free_port()
    ready: dict[str, object] = {}
    started = threading.Event()
    server_box: dict[str, uvicorn.Server] = {}

    async def main() -> None:
        svc = await open_services(settings)
        try:
            issued = await svc.users.bootstrap_admin()
            assert issued is not None
            svc.engine = build_vm_engine(svc, lambda _settings: AgentBackend())
            ready["token"], ready["tag"] = issued.secret, svc.engine.tag
            app = create_app(services=svc)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                   lifespan="off"))
            server_box["server"] = server
            serving = asyncio.create_task(server.serve())
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            started.set()
            await serving
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            raise
        finally:
            await svc.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(60)
    if "error" in ready:
        raise RuntimeError(f"the server did not start: {ready['error']!r}")
    try:
        yield ThreadedServer(f"http://127.0.0.1:{port}", str(ready["token"]))
    finally:
        server_box["server"].should_exit = True
        thread.join(60)
        assert find_marked_processes(str(ready["tag"])) == {}
