"""Short-lived, single-use tickets that authorise one VNC WebSocket.

Why tickets: a browser cannot set an `Authorization` header on a WebSocket, and an API token in a URL would
end up in proxies' and browsers' histories. So an authenticated call (`POST …/vnc-ticket`) mints a random
ticket bound to the user and the session, and the WebSocket presents it in its query string once.

The tickets live in the session store (Redis when configured), so a ticket minted through one replica is
redeemed on any other. Only a SHA-256 of the ticket is used as the key: the store never holds a redeemable
secret, and nothing here logs one. Single use: redeeming deletes the key, and only the caller whose delete
removed it proceeds (Redis DEL and the in-process store's pop are atomic), so two racing redemptions of one
ticket cannot both win. Expiry is the store's TTL.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from polydev.store.sessions import SessionStore

TICKET_PREFIX = "vnc-ticket:"
MAX_TTL_SECONDS = 60  # a ticket is for connecting right now, not for bookmarking


@dataclass(frozen=True)
class Ticket:
    secret: str
    expires_in: int


class VncTickets:
    def __init__(self, store: SessionStore, ttl_seconds: int = 30, prefix: str = TICKET_PREFIX) -> None:
        """`prefix` keeps each kind of ticket (VNC, a workspace's terminal) its own: one is never the other."""
        if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"VNC ticket lifetime must be 1..{MAX_TTL_SECONDS} s")
        self.store = store
        self.ttl = ttl_seconds
        self.prefix = prefix

    def _key(self, secret: str) -> str:
        return self.prefix + hashlib.sha256(secret.encode()).hexdigest()

    async def issue(self, user_id: uuid.UUID, session_id: uuid.UUID) -> Ticket:
        secret = secrets.token_urlsafe(32)
        await self.store.create(self._key(secret), {"user_id": str(user_id), "session_id": str(session_id)},
                                ttl=self.ttl)
        return Ticket(secret, self.ttl)

    async def redeem(self, secret: str, session_id: uuid.UUID) -> uuid.UUID | None:
        """The user the ticket was issued to, if it is live, unused and for this session; else None. A
        ticket presented for another session is used up all the same: whoever holds it is probing."""
        if not secret or len(secret) > 200:
            return None
        key = self._key(secret)
        data = await self.store.get(key)
        if data is None or not await self.store.delete(key):
            return None  # unknown, expired, or redeemed by someone else first
        if data.get("session_id") != str(session_id):
            return None
        return uuid.UUID(data["user_id"])
