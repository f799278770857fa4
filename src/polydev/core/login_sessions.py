"""The read side of the login flow: live state from the session store, durable record from the database.

A session that has gone from the store before reaching a terminal status has expired when it saw no activity
for the store's TTL; it is marked `timeout` in the database so it reads the same way from every replica
afterwards. One that had activity within the TTL was lost by the store (a Redis restarted without its data):
its state is published again from the row, and the login goes on.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import structlog

from polydev.core.errors import SessionExpired, SessionNotFound
from polydev.store.auth_sessions import AuthSessionRepo
from polydev.store.models import AUTH_SESSION_TERMINAL, AuthSession, utcnow
from polydev.store.sessions import SessionStore

log = structlog.get_logger(__name__)

EXPIRED_MESSAGE = "session expired after {ttl} s without activity"
_ROW_COLUMNS = ("status", "auth_url", "vnc_url", "vm_ip")

def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _from_row(row: AuthSession) -> dict[str, Any]:
    return {
        "session_id": str(row.session_id),
        "user_id": str(row.user_id),
        "provider": row.provider,
        "method": row.method,
        "status": row.status,
        "vm_id": str(row.browser_vm_id) if row.browser_vm_id else None,
        "auth_url": row.auth_url,
        "vnc_url": row.vnc_url,
        "error_message": row.error_message,
        "started_at": _iso(row.started_at),
        "completed_at": _iso(row.completed_at),
    }


class LoginSessions:
    def __init__(self, store: SessionStore, repo: AuthSessionRepo) -> None:
        self.store = store
        self.repo = repo

    async def start(self, user_id: uuid.UUID, provider: str, method: str | None = None) -> dict[str, Any]:
        """Record a new session and publish its live state; the login flow drives it from here."""
        row = await self.repo.create(user_id, provider, method=method)
        live = _from_row(row) | {"updated_at": utcnow().isoformat()}
        await self.store.create(live["session_id"], live)
        return live

    async def update(self, session_id: uuid.UUID, **changes: Any) -> dict[str, Any] | None:
        """Publish progress of a live session: the store gets everything, the row its own columns."""
        columns = {k: v for k, v in changes.items() if k in _ROW_COLUMNS}
        if "vm_id" in changes:
            columns["browser_vm_id"] = uuid.UUID(changes["vm_id"]) if changes["vm_id"] else None
        if columns:
            await self.repo.update(session_id, **columns)
        return await self.store.update(str(session_id), changes | {"updated_at": utcnow().isoformat()})

    async def finish(self, session_id: uuid.UUID, status: str, error: str | None = None) -> bool:
        """End a session (terminal status); False if it had already ended. The store keeps the final state
        until its TTL so every replica reads the same outcome."""
        ended = await self.repo.finish(session_id, status, error)
        if ended:
            await self.store.update(str(session_id), {"status": status, "error_message": error,
                                                      "completed_at": utcnow().isoformat(),
                                                      "updated_at": utcnow().isoformat()})
        return ended

    async def read(self, user_id: uuid.UUID, session_id: uuid.UUID) -> dict[str, Any]:
        live = await self.store.get(str(session_id))
        if live is not None:
            if live.get("user_id") != str(user_id):
                raise SessionNotFound(session_id)
            return live
        row = await self.repo.get_owned(user_id, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        if row.status == "timeout":  # expired earlier: keep telling the client to start over
            raise SessionExpired(session_id)
        if row.status in AUTH_SESSION_TERMINAL:
            return _from_row(row)
        active = row.last_heartbeat or row.started_at
        if (utcnow() - active).total_seconds() < self.store.default_ttl:
            live = _from_row(row) | {"updated_at": utcnow().isoformat()}
            await self.store.create(str(session_id), live)
            log.warning("login_state_republished", session_id=str(session_id),
                        reason="the session store had lost it (restarted without its data?)")
            return live
        await self.repo.finish(session_id, "timeout", EXPIRED_MESSAGE.format(ttl=self.store.default_ttl))
        raise SessionExpired(session_id)
