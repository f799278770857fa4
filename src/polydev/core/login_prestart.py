"""The login flow's side of LOGIN_POOL (the pool itself, which holds and replaces pre-started logins, is
core/login_pool.py): which logins to keep, and handing one to a user's new session."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from polydev.core.login_sessions import LoginSessions
from polydev.core.login_state import Login, vm_ttl, vnc_url
from polydev.providers import get_adapter

if TYPE_CHECKING:
    from polydev.core.ports import VmPort

log = structlog.get_logger(__name__)


def pool_sizes(pool: dict[tuple[str, str | None], int]) -> dict[tuple[str, str], int]:
    """How many pre-started logins to keep per (provider, method), each provider's default method filled
    in; KeyError for an unknown provider, ValueError for a method it does not have."""
    sizes: dict[tuple[str, str], int] = {}
    for (provider, method), n in pool.items():
        adapter = get_adapter(provider)
        method = method or adapter.login_methods[0]
        if method not in adapter.login_methods:
            raise ValueError(f"LOGIN_POOL: {provider} has no login method {method!r}")
        sizes[(provider, method)] = n
    return sizes


async def hand_over(login: Login, session_id: uuid.UUID, user_id: uuid.UUID, *, engine: VmPort,
                    sessions: LoginSessions, timeout: float,
                    track: Callable[[Login], None]) -> dict[str, Any] | None:
    """Give a pre-started login to this user's new session: it shows what the login has reached, the VM is
    theirs, the full login timeout runs from now; `track` registers it as the flow's live login (before
    the login can end and look for it there). None if the login ended in the meantime."""
    async with login.publishing:
        if login.ending.is_set():
            return None
        login.session_id, login.user_id = session_id, user_id
        track(login)
        if login.deadline is not None:
            login.deadline.reschedule(asyncio.get_running_loop().time() + timeout)
        if login.vm_id is not None:
            with contextlib.suppress(KeyError):
                await engine.assign(login.vm_id, user_id, vm_ttl(timeout))
        changes = {"accepts_code": login.plan.accepts_code, **login.unpublished}
        if login.vnc is not None:
            changes["vnc_url"] = vnc_url(session_id)
        live = await sessions.update(session_id, **changes)
    log.info("login_started", session_id=str(session_id), provider=login.adapter.name, method=login.plan.method,
             pre_started=True)
    return live
