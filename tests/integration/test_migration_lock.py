"""Two servers starting at once against one PostgreSQL both migrate it (every start does): the advisory lock in
store/db.py makes one wait for the other, so both end on the head revision and neither fails on a table the
other has just made. The servers are two processes running the start's migration step; the test holds the
lock first, so both are seen waiting before either may go."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from polydev.store import db
from tests.support import servers

pytestmark = pytest.mark.postgres

# What a server's start does to its database (services.open_services), and nothing else.
START = """
import asyncio
from polydev.config import Settings
from polydev.store import db

async def main() -> None:
    engine = db.create_engine(Settings().effective_database_url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()

asyncio.run(main())
"""
WAIT_S = 120  # a bound on a hang, not a measurement


async def _connect(url: str) -> asyncpg.Connection:
    u = make_url(url)
    return await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)


async def _until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_two_servers_migrating_at_once_wait_for_each_other(postgres_server: str) -> None:
    url = await asyncio.to_thread(servers.create_database, postgres_server, f"t_{uuid.uuid4().hex[:16]}")
    lock_id = db._MIGRATION_LOCK_ID
    holder, watcher = await _connect(url), await _connect(url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", lock_id)  # a migration in progress elsewhere
        env = {**os.environ, "DATABASE_URL": url}
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", START, env=env,
                                                      stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                 for _ in range(2)]

        async def both_waiting() -> bool:
            for proc in procs:
                if proc.returncode is not None:
                    _, err = await proc.communicate()
                    pytest.fail(f"a server's migration did not wait for the lock: {err.decode()[-3000:]}")
            # A bigint advisory key appears as classid (high 32 bits) and objid (low 32 bits).
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 "
                "AND NOT granted", lock_id)
            return waiting == 2
        await _until(both_waiting, "both servers to wait on the migration lock")
        # While they wait, neither has touched the schema.
        assert await watcher.fetchval("SELECT to_regclass('alembic_version')") is None

        await holder.execute("SELECT pg_advisory_unlock($1)", lock_id)
        results = [await asyncio.wait_for(proc.communicate(), WAIT_S) for proc in procs]
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()[-3000:]
        head = ScriptDirectory.from_config(db.alembic_config()).get_current_head()
        assert [r["version_num"] for r in await watcher.fetch("SELECT version_num FROM alembic_version")] == [head]
        assert await watcher.fetchval("SELECT to_regclass('runs')") is not None
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await holder.close()
        await watcher.close()
