"""Wiring: builds the store-layer objects from Settings once, for the API and the CLI alike."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from polydev.config import Settings
from polydev.core.login_sessions import LoginSessions
from polydev.store import db
from polydev.store.auth_sessions import AuthSessionRepo
from polydev.store.credentials import CredentialRepo
from polydev.store.sessions import SessionStore, create_session_store
from polydev.store.users import UserRepo
from polydev.store.vault import Vault, key_source_from_settings


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    factory: async_sessionmaker[AsyncSession]
    vault: Vault
    sessions: SessionStore
    users: UserRepo
    credentials: CredentialRepo
    auth_sessions: AuthSessionRepo
    login: LoginSessions

    async def close(self) -> None:
        await self.sessions.close()
        await self.engine.dispose()


def make_vault(settings: Settings) -> Vault:
    primary = settings.credential_encryption_key
    previous = settings.credential_encryption_previous_keys
    return Vault(key_source_from_settings(
        primary.get_secret_value() if primary else None,
        previous.get_secret_value() if previous else None,
        settings.master_key_file,
    ))


async def open_services(settings: Settings, *, migrate: bool = True) -> Services:
    # The data directory holds the database, the generated master key and the bootstrap token.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = db.create_engine(settings.effective_database_url)
    try:
        if migrate:
            await db.migrate(engine)
        vault = make_vault(settings)
    except BaseException:
        await engine.dispose()
        raise
    factory = db.sessionmaker(engine)
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    store = create_session_store(redis_url, settings.redis_session_ttl)
    auth_sessions = AuthSessionRepo(factory)
    return Services(
        settings=settings, engine=engine, factory=factory, vault=vault, sessions=store,
        users=UserRepo(factory), credentials=CredentialRepo(factory, vault), auth_sessions=auth_sessions,
        login=LoginSessions(store, auth_sessions),
    )
