"""Database engine, sessions and migrations (SQLAlchemy 2 async; SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, event, false, or_, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: serialises migrations when several replicas start against one PostgreSQL.
_MIGRATION_LOCK_ID = 0x706F6C79

R = TypeVar("R")
log = structlog.get_logger(__name__)

# A database that cannot be reached for a moment (restarting, a network fault): what the driver raises then.
# asyncpg raises the socket's own OSError when it cannot connect; SQLAlchemy wraps the rest.
UNREACHABLE = (OSError, OperationalError, InterfaceError, DisconnectionError)
STORE_RETRY_S = 180.0


async def when_reachable(op: Callable[[], Awaitable[R]], what: str, within: float = STORE_RETRY_S) -> R:
    """`op()`, tried again (backing off, up to `within` seconds) while the database cannot be reached: a
    write a flow cannot do without (a run's events, its end) waits out a database restart instead of failing
    the run, or leaving its row unended, for an outage of seconds."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + within, 0.2
    while True:
        try:
            return await op()
        except UNREACHABLE as exc:
            if loop.time() + delay > deadline:
                raise
            log.warning("database_unreachable_retrying", what=what, error_type=type(exc).__name__,
                        retry_in_s=round(delay, 1))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the API read while a writer commits; foreign keys are off by default in SQLite.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(conn: Connection, revision: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision`. Runs on every start; a no-op when already there."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


async def ping(engine: AsyncEngine, timeout: float = 2.0) -> bool:
    async def _once() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    try:
        await asyncio.wait_for(_once(), timeout)
        return True
    except Exception:
        return False


@asynccontextmanager
async def session_scope(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A unit of work: commits on success, rolls back on any error."""
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def add_unique(factory: async_sessionmaker[AsyncSession], row: R, conflict: Exception) -> R:
    """Insert `row` in its own unit of work; `conflict` is raised instead of the driver's IntegrityError when
    a unique constraint refuses it (the database, not a read before the write, decides: no race)."""
    try:
        async with session_scope(factory) as s:
            s.add(row)
            await s.flush()
            return row
    except IntegrityError:
        raise conflict from None



def hosted_by(column: ColumnElement[uuid.UUID | None], servers: Collection[uuid.UUID | None]) -> ColumnElement[bool]:
    """A `server_id` column's filter: rows of one of `servers`, None standing for rows that name no server."""
    ids = [s for s in servers if s is not None]
    terms = [column.in_(ids)] if ids else []
    if None in servers:
        terms.append(column.is_(None))
    return or_(*terms) if terms else false()
