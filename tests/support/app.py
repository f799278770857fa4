"""The app under test: settings in a temporary directory, and an in-process API client that acts as users."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from polydev.config import Settings
from polydev.services import Services


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"POLYDEV_DATA_DIR": tmp_path / "data", "POLYDEV_CACHE_DIR": tmp_path / "cache"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


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


async def idle_login(api: Api, session_id: str, seconds: float) -> None:
    """Make a login session's row say its last activity was `seconds` ago (for the session store's TTL)."""
    from datetime import timedelta

    from sqlalchemy import update

    from polydev.store.models import AuthSession, utcnow

    async with api.services.factory() as s, s.begin():
        await s.execute(update(AuthSession).where(AuthSession.session_id == uuid.UUID(session_id))
                        .values(started_at=utcnow() - timedelta(seconds=seconds),
                                last_heartbeat=utcnow() - timedelta(seconds=seconds)))
