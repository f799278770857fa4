"""The guest agent's protocol tests (tests/integration/test_guest_agent.py), against the agent inside a real VM:
every test there that takes the `agent` fixture runs here again with `agent` bound to the session's VM."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest

from polydev.vm.agent_client import AgentClient
from polydev.vm.backends.qemu.machine import QemuVM
from tests.integration import test_guest_agent as shared
from tests.integration.test_guest_agent import scratch  # noqa: F401  (fixture)

pytest_plugins = ["tests.support.vm_fixtures"]  # fixtures: test_image, test_vm (one VM per session)


@pytest.fixture
def agent(test_vm: QemuVM) -> Iterator[AgentClient]:
    client = AgentClient(test_vm.agent_url, test_vm.token, timeout=60)
    yield client
    client.close()


globals().update({name: test for name, test in vars(shared).items()
                  if name.startswith("test_") and "agent" in inspect.signature(test).parameters})
