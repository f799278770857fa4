"""The egress gateway with a real VM: the guest's proxy address reaches the gateway through QEMU's guestfwd
to that VM's own socket, an allowed name is tunnelled to its (pinned, loopback) stand-in, a name off the
allow-list is refused with the reason, the tunnel is accounted to the VM's user, and the socket goes with
the VM."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev.api.app import create_app
from polydev.vm import images
from tests.support.app import make_settings
from tests.support.echo_stand_in import echo_stand_in as echo_stand_in_at
from tests.support.egress_probe import CONNECT_PROBE, PING

pytest_plugins = ["tests.support.vm_fixtures"]

STAND_IN = ("127.0.0.57", 443)  # a loopback address of its own: port 443 is the one the gateway dials



@pytest.fixture
def echo_stand_in() -> Iterator[None]:
    with echo_stand_in_at(STAND_IN):
        yield


async def test_a_guest_reaches_an_allowed_host_through_the_gateway_only(tmp_path: Path, test_image: images.Image,
                                                                        echo_stand_in: None) -> None:
    settings = make_settings(tmp_path, POLYDEV_CACHE_DIR=test_image.dir.parent.parent, vm_image_profile="test",
                             vm_cli_memory_mb=1024, vm_cli_vcpu=1, egress_allow="api.stand.test",
                             egress_hosts=json.dumps({"api.stand.test": [STAND_IN[0]]}))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        services = app.state.services
        assert services.engine is not None, services.engine_unavailable
        assert services.egress is not None
        user = (await services.users.create(f"u{uuid.uuid4().hex[:8]}")).id
        engine = services.engine
        vm = await engine.create(user, "cli")
        socket_path = services.egress.gateway.socket_path(vm.id)
        assert socket_path.exists()
        engine.label(vm.id, purpose="run", provider="claude_code")
        with engine.agent(vm.id, timeout=120) as agent:  # (synchronous: in a thread, the gateway shares this loop)
            allowed, refused = [await asyncio.to_thread(agent.exec, ["python3", "-c", CONNECT_PROBE, "10.0.2.99",
                                                                     "3128", f"{name}:443"])
                                for name in ("api.stand.test", "evil.example")]
        lines = allowed.stdout.decode().splitlines()
        assert lines[0] == "HTTP/1.1 200 Connection Established" and lines[1] == "echo: ping from the guest", allowed
        assert refused.stdout.decode().startswith("HTTP/1.1 403"), refused
        assert "evil.example refused: not on the allow-list for claude_code runs" in refused.stdout.decode()
        assert engine.egress_refusal(vm.id) == "evil.example refused: not on the allow-list for claude_code runs"
        await asyncio.sleep(0.2)
        await services.egress.flush()  # (the service flushes every few seconds by itself; now, for the test)
        usage = {u.host: u for u in await services.egress.repo.usage(user)}
        assert usage["api.stand.test"].connections == 1
        assert usage["api.stand.test"].bytes_up == len(PING)
        assert usage["evil.example"].refusals == 1
        await engine.destroy(vm.id)
        assert not socket_path.exists()
