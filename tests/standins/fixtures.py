"""Pytest plugin for stand-in tests: ``pytest_plugins = ["tests.standins.fixtures"]`` in a test module.

It registers the ``standins`` marker, puts it on every test of a module that loads this plugin (so
``-m standins`` / ``-m "not standins"`` select them), and provides the fixtures below.

Needs root (network namespaces), ``ip``, node >= 20 and npm. Without them the tests skip, unless
``POLYDEV_REQUIRE_SERVERS=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.standins import clis
from tests.standins.harness import Standins
from tests.support.required import unmet

__all__ = ["claude_exe", "cli_home", "codex_exe", "gemini_exe", "require_host", "standins", "workdir"]


MARKER = "standins: the real provider CLIs against local stand-ins (root, ip netns, node >= 20, npm)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and __name__ in getattr(module, "pytest_plugins", ()):
            item.add_marker("standins")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "stand-in tests need root (ip netns)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if shutil.which("npm") is None:
        return "npm is not installed"
    return None  # node >= 20 comes from the host or, failing that, from the npm registry (clis.node_dir)


def require_host() -> None:
    reason = _missing()
    if reason is not None:
        unmet(reason)


def _exe(cli: clis.CliSpec) -> Path:
    require_host()
    return clis.install(cli)


@pytest.fixture(scope="session")
def claude_exe() -> Path:
    return _exe(clis.CLAUDE)


@pytest.fixture(scope="session")
def codex_exe() -> Path:
    return _exe(clis.CODEX)


@pytest.fixture(scope="session")
def gemini_exe() -> Path:
    return _exe(clis.GEMINI)


@pytest.fixture
def standins(tmp_path: Path) -> Iterator[Standins]:
    require_host()
    si = Standins(tmp_path / "standins")
    try:
        yield si
    finally:
        si.close()


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work
