"""What a server left behind once every login and run it drove has ended (or once it was killed and restarted):
hypervisor and supervisor processes of its data directory, VM work directories (overlay disks, consoles,
sockets), egress sockets, network leases, and rows still live in the database (VMs not destroyed or failed,
login sessions and runs not in a terminal state). Used by tests/reliability/ and bench/load.py."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from polydev.config.settings import normalize_database_url
from polydev.store.models import (
    AUTH_SESSION_TERMINAL,
    AuthSession,
    NetworkLease,
    Run,
    VmRecord,
)
from polydev.store.runs import RUN_TERMINAL
from polydev.vm.proc import engine_tag, find_marked_processes

VM_ENDED = ("destroyed", "failed")


def database_url(data_dir: Path, url: str | None = None) -> str:
    """The server's database: `url` (DATABASE_URL), or the embedded SQLite in its data directory."""
    return url or f"sqlite:///{data_dir / 'polydev.db'}"


async def _rows(url: str) -> dict[str, int]:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as c:
            async def count(stmt: object) -> int:
                return int((await c.execute(stmt)).scalar_one())  # type: ignore[call-overload]

            return {
                "vm rows live": await count(select(func.count()).select_from(VmRecord)
                                            .where(VmRecord.status.not_in(VM_ENDED))),
                "login rows live": await count(select(func.count()).select_from(AuthSession)
                                               .where(AuthSession.status.not_in(AUTH_SESSION_TERMINAL))),
                "run rows live": await count(select(func.count()).select_from(Run)
                                             .where(Run.status.not_in(RUN_TERMINAL))),
                "network leases": await count(select(func.count()).select_from(NetworkLease)),
            }
    finally:
        await engine.dispose()


def find(data_dir: Path, db_url: str | None = None) -> dict[str, int]:
    """Everything left behind, by kind; all zeros when nothing is."""
    tag = engine_tag(data_dir)
    vms_dir = data_dir / "vms"
    egress_dir = Path(tempfile.gettempdir()) / f"polydev-egress-{tag[:10]}"  # services.build_egress's run_dir
    found = {
        "processes": len(find_marked_processes(tag)),
        "vm work dirs": len(list(vms_dir.iterdir())) if vms_dir.is_dir() else 0,
        "egress sockets": len(list(egress_dir.glob("*.sock"))) if egress_dir.is_dir() else 0,
    }
    found.update(asyncio.run(_rows(database_url(data_dir, db_url))))
    return found


def describe(found: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in found.items() if n) or "none"
