"""Shared fixtures: real servers once per run, a fresh database and session store per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from polydev.config import Settings
from polydev.services import Services, open_services
from tests.support import servers
from tests.support.app import Api, make_settings

# A closed world: every gateway a test starts (in process or as a server process, which inherits this) answers
# only the names the test pinned in EGRESS_HOSTS and asks no DNS server anything.
os.environ.setdefault("EGRESS_RESOLVE", "pinned")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    server = servers.start_postgres()
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    server = servers.start_redis()
    yield server.url
    server.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'polydev.db'}"
    admin = request.getfixturevalue("postgres_server")
    return servers.create_database(admin, f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    svc = await open_services(make_settings(tmp_path, database_url=database_url))
    yield svc
    await svc.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The two deployments users run: embedded (SQLite + memory) and production (PostgreSQL + Redis)."""
    if request.param == "memory":
        return make_settings(tmp_path)
    pg = servers.create_database(request.getfixturevalue("postgres_server"), f"t_{uuid.uuid4().hex[:16]}")
    redis_url = request.getfixturevalue("redis_server")
    # Tests share one Redis; session ids are random UUIDs, so they never collide.
    return make_settings(tmp_path, database_url=pg, redis_url=redis_url)


@pytest.fixture
async def api(stack: Settings) -> AsyncIterator[Api]:
    from polydev.api.app import create_app

    svc = await open_services(stack)
    issued = await svc.users.bootstrap_admin()
    assert issued is not None
    app = create_app(services=svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://polydev.test") as client:
        yield Api(svc, client, issued.secret)
    await svc.close()


# tests/reliability/ boots real VMs too (under load and faults), in a folder of its own so it runs as one suite.
VM_TESTS = (Path(__file__).resolve().parent / "vm", Path(__file__).resolve().parent / "reliability")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that boots a real VM lives in tests/vm/ (or tests/reliability/) and carries the `vm` marker,
    so `-m vm` and the folders name the same set: the marker is given here, and a `vm` test elsewhere is an
    error."""
    for item in items:
        if any(folder in item.path.parents for folder in VM_TESTS):
            item.add_marker(pytest.mark.vm)
        elif item.get_closest_marker("vm") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked vm (it boots a real VM): move it to tests/vm/")

