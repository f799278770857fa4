"""The `flows` fixture: the app with the real guest agent as the "VM" (on the host) and a scripted CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.providers import ADAPTERS
from polydev.services import build_vm_engine, open_services
from polydev.vm.engine import find_marked_processes
from tests.support.agent_backend import AgentBackend
from tests.support.app import Api
from tests.support.flow_fakes import FakeAdapter, host_guest_paths


@pytest.fixture
async def flows(stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter())
    stack = stack.model_copy(update={"login_timeout_seconds": 60})
    svc = await open_services(stack)
    svc.guest_paths = host_guest_paths(str(tmp_path / "guest"))
    svc.login_flow.timeout = 60
    issued = await svc.users.bootstrap_admin()
    assert issued is not None
    svc.engine = build_vm_engine(svc, lambda _settings: AgentBackend())
    app = create_app(services=svc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://polydev.test",
                                 timeout=60) as client:
        yield Api(svc, client, issued.secret)
    tag = svc.engine.tag
    await svc.close()
    assert find_marked_processes(tag) == {}
