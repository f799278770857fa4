"""Users and API tokens. Tokens are shown once and stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import add_unique, session_scope
from polydev.store.models import ApiToken, User, utcnow

TOKEN_PREFIX = "pd_"
# Recording every use would turn each authenticated read into a write; once a minute is enough to audit.
_LAST_USED_GRANULARITY = timedelta(minutes=1)


class NameTaken(Exception):
    pass


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str  # the only time the plaintext exists outside the caller's hands


class UserRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], auth_cache_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        # token hash -> (user, valid until). Every API call authenticates; without this each one is a
        # database round trip. Revocations in this process take effect at once; another replica's
        # revocation within `auth_cache_seconds` (AUTH_CACHE_SECONDS, 0 turns the cache off).
        self._auth_ttl = auth_cache_seconds
        self._auth_cache: dict[str, tuple[User, float]] = {}
        self._clock = clock

    async def count(self) -> int:
        async with self._factory() as s:
            return int(await s.scalar(select(func.count()).select_from(User)) or 0)

    async def create(self, name: str, role: str = "user") -> User:
        return await add_unique(self._factory, User(name=name, role=role), NameTaken(name))

    async def get(self, user_id: uuid.UUID) -> User | None:
        async with self._factory() as s:
            return await s.get(User, user_id)

    async def list(self) -> list[User]:
        async with self._factory() as s:
            return list(await s.scalars(select(User).order_by(User.created_at, User.name)))

    async def issue_token(self, user_id: uuid.UUID, name: str) -> IssuedToken:
        secret = new_token()
        async with session_scope(self._factory) as s:
            token = ApiToken(user_id=user_id, name=name, token_hash=hash_token(secret), prefix=secret[:10])
            s.add(token)
            await s.flush()
        return IssuedToken(token, secret)

    async def list_tokens(self, user_id: uuid.UUID) -> list[ApiToken]:
        async with self._factory() as s:
            q = select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at)
            return list(await s.scalars(q))

    async def revoke_token(self, user_id: uuid.UUID, token_id: uuid.UUID) -> bool:
        async with session_scope(self._factory) as s:
            result = await s.execute(
                update(ApiToken)
                .where(ApiToken.id == token_id, ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            revoked = result.rowcount == 1
        if revoked:
            self._auth_cache.clear()  # rare: simpler than keeping a token id -> hash index
        return revoked

    async def authenticate(self, secret: str) -> User | None:
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
            return None
        digest = hash_token(secret)
        cached = self._auth_cache.get(digest)
        if cached is not None:
            if cached[1] > self._clock():
                return cached[0]
            del self._auth_cache[digest]
        user = await self._authenticate(digest)
        if user is not None and self._auth_ttl > 0:
            if len(self._auth_cache) > 10_000:  # bounded: drop everything rather than track recency
                self._auth_cache.clear()
            self._auth_cache[digest] = (user, self._clock() + self._auth_ttl)
        return user

    async def _authenticate(self, digest: str) -> User | None:
        async with self._factory() as s:
            row = (await s.execute(
                select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                .where(ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None))
            )).first()
            if row is None:
                return None
            token, user = row
            if user.disabled:
                return None
            now = utcnow()
            last = token.last_used_at
            if last is None or now - last > _LAST_USED_GRANULARITY:
                await s.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
                await s.commit()
            return user

    async def bootstrap_admin(self) -> IssuedToken | None:
        """On the first start (no users at all) create `admin` and its first token."""
        if await self.count() > 0:
            return None
        try:
            admin = await self.create("admin", role="admin")
        except NameTaken:  # another replica won the race
            return None
        return await self.issue_token(admin.id, "bootstrap")
