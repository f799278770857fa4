"""A real `polydev serve` process on a free loopback port, started the way the README starts it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.live_server import LiveServer, start_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`polydev serve` as the README starts it."""
    yield from start_server(tmp_path_factory.mktemp("live"), "polydev")


@pytest.fixture(scope="session")
def fake_vm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The same server with a VM engine on the stand-in hypervisor: VM routes work, no VM boots."""
    yield from start_server(tmp_path_factory.mktemp("fakevm"), "tests.support.fake_vm_server")


@pytest.fixture(scope="session")
def fake_flow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The stand-in-hypervisor server whose claude_code adapter is the scripted CLI of tests/support/flow_fakes.py:
    the login and run flows work end to end over real HTTP in seconds."""
    root = tmp_path_factory.mktemp("fakeflow")
    yield from start_server(root, "tests.support.fake_vm_server", {"POLYDEV_TEST_FAKE_CLI": str(root / "guest")})
