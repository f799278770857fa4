"""Pytest fixtures for stand-in tests; import them into a test module (``from tests.standins.fixtures import *``).

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

__all__ = ["standins", "cli_home", "workdir", "claude_exe", "codex_exe", "gemini_exe", "require_host"]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "stand-in tests need root (ip netns)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if shutil.which("npm") is None:
        return "npm is not installed"
    major = clis.node_major()
    if major is None or major < clis.NODE_MIN_MAJOR:
        return f"node >= {clis.NODE_MIN_MAJOR} is needed (found {major})"
    return None


def require_host() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("POLYDEV_REQUIRE_SERVERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


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
