"""Shared fixtures: real servers once per run, a fresh database and session store per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from polydev.config import Settings
from polydev.services import Services, open_services
from tests import servers


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


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"POLYDEV_DATA_DIR": tmp_path / "data", "POLYDEV_CACHE_DIR": tmp_path / "cache"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


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


class Api:
    """An in-process client for one app plus helpers to act as different users."""

    def __init__(self, services: Services, client: httpx.AsyncClient, admin_token: str) -> None:
        self.services = services
        self.client = client
        self.admin_token = admin_token

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def new_user(self, name: str | None = None) -> tuple[str, str]:
        """Create a user through the API; returns (user id, token)."""
        name = name or f"u{uuid.uuid4().hex[:10]}"
        r = await self.client.post("/api/users", json={"name": name}, headers=self.auth(self.admin_token))
        assert r.status_code == 201, r.text
        uid = r.json()["id"]
        r = await self.client.post(f"/api/users/{uid}/tokens", json={"name": "t"}, headers=self.auth(self.admin_token))
        assert r.status_code == 201, r.text
        return uid, r.json()["token"]


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
