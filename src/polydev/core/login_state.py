"""One login as the login flow's parts see it (core/login_flow.py and the modules it uses), and how its
progress reaches the session."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from polydev.core.guest import Guest, GuestProcess
from polydev.core.login_browser import LoginBrowser
from polydev.core.login_sessions import LoginSessions
from polydev.core.quotas import Hold
from polydev.core.rfb import new_password
from polydev.core.tasks import LiveTask
from polydev.providers.base import GuestEnv, LoginPlan, ProviderAdapter


@dataclass(eq=False)  # identity: kept in sets while pre-started
class Login(LiveTask):
    """`ending` (LiveTask's) is set first thing when the login ends: VNC bridges close before the VM goes,
    and a pre-started login is no longer handed out."""

    session_id: uuid.UUID | None  # None while it is a pre-started login nobody has taken (core/login_pool.py)
    user_id: uuid.UUID | None
    adapter: ProviderAdapter
    plan: LoginPlan
    env: GuestEnv
    guest: Guest | None = None
    proc: GuestProcess | None = None
    auth_url: str | None = None
    awaiting: asyncio.Event = field(default_factory=asyncio.Event)  # its URL is known and published
    output: str = ""
    browser: LoginBrowser | None = None
    vnc: tuple[str, int] | None = None  # the VNC server as the control plane reaches it, once it answers
    # The VM's VNC password (core/rfb.py): only this process holds it, so only its bridge gets in.
    vnc_password: bytes = field(default_factory=new_password, repr=False)
    browser_procs: list[GuestProcess] = field(default_factory=list)  # Xtigervnc, Chromium
    vm_id: uuid.UUID | None = None
    # Pre-started logins: what the session will show once a user takes it, the deadline moved then, and the
    # lock that keeps the hand-out's publication and the login's own updates in order.
    claimed: bool = False
    unpublished: dict[str, Any] = field(default_factory=dict)
    deadline: asyncio.Timeout | None = None
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What its admission holds for its VM until that VM's row exists (core/quotas.Hold); None: pre-started.
    hold: Hold | None = None

    def release_hold(self) -> None:
        if self.hold is not None:
            self.hold.release()

    def hold_at_row(self, vm_id: uuid.UUID) -> None:
        if self.hold is not None:
            self.hold.at_row(vm_id)


@dataclass(frozen=True)
class VncTarget:
    """What the VNC bridge needs of a live login: where its VM's VNC server is, the password it asks for,
    and an event set when the login ends (the bridge closes then)."""

    address: tuple[str, int]
    password: bytes = field(repr=False)
    ended: asyncio.Event


async def publish(sessions: LoginSessions, login: Login, **changes: Any) -> None:
    """Session progress; kept for the session a user will get while the login is pre-started."""
    async with login.publishing:
        if login.session_id is None:
            login.unpublished.update(changes)
        else:
            await sessions.update(login.session_id, **changes)


def vnc_url(session_id: uuid.UUID) -> str:
    return f"/api/auth/sessions/{session_id}/vnc"


def vm_ttl(seconds: float) -> timedelta:
    return timedelta(seconds=seconds + 120)  # the reaper's backstop, should the login's task die
