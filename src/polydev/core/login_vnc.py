"""The login browser in a login's VM (what runs there: core/login_browser.py): started next to the CLI, and
its VNC server published as the session's `vnc_url` once it answers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING

import structlog

from polydev.core.guest import GuestProcess
from polydev.core.login_browser import wait_for_vnc
from polydev.core.login_sessions import LoginSessions
from polydev.core.login_state import Login, vnc_url

if TYPE_CHECKING:
    from polydev.core.ports import VmPort

log = structlog.get_logger(__name__)


def start_browser(login: Login, engine: VmPort, vm_id: uuid.UUID, budget: float, *, sessions: LoginSessions,
                  vnc_wait_s: float) -> list[asyncio.Task[None]]:
    """Xtigervnc now, next to the CLI; Chromium as soon as its display answers (it exits at once without an
    X server) and before the URL is known (it is slow to start on an emulated CPU). Returns the helper
    tasks, cancelled when the session ends; the processes die with the VM."""
    assert login.guest is not None and login.browser is not None
    server = login.guest.start(login.browser.vnc_server(login.env), timeout_s=budget + 30)
    login.browser_procs.append(server)
    return [asyncio.create_task(drain(server)),
            asyncio.create_task(_browser_up(login, engine, vm_id, budget, sessions, vnc_wait_s))]


async def drain(proc: GuestProcess) -> None:
    # Their output is noise (Chromium's D-Bus complaints); read it so it does not pile up in memory.
    with contextlib.suppress(Exception):
        async for _ in proc.events():
            pass


async def _browser_up(login: Login, engine: VmPort, vm_id: uuid.UUID, budget: float, sessions: LoginSessions,
                      vnc_wait_s: float) -> None:
    """Once the VM's VNC server answers: start Chromium on it and publish `vnc_url`. A login browser that
    never comes up is not fatal: the user can still finish by pasting a code or the callback URL."""
    assert login.guest is not None and login.browser is not None
    try:
        address = host, port = engine.vnc_endpoint(vm_id)
        started = asyncio.get_running_loop().time()
        await wait_for_vnc(host, port, deadline_s=min(120.0, vnc_wait_s))
    except (KeyError, TimeoutError) as exc:
        log.warning("login_vnc_unavailable", session_id=str(login.session_id), reason=type(exc).__name__)
        return
    chromium = login.guest.start(login.browser.idle_browser(login.env), timeout_s=budget + 30)
    login.browser_procs.append(chromium)
    async with login.publishing:  # a pre-started login's hand-out publishes vnc_url itself from here on
        login.vnc = address
        if login.session_id is not None:
            await sessions.update(login.session_id, vnc_url=vnc_url(login.session_id))
    log.info("login_vnc_up", session_id=str(login.session_id),
             seconds=round(asyncio.get_running_loop().time() - started, 2))
    await drain(chromium)
