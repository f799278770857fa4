"""What the user pastes into a login: a code from the provider's page, which goes to the CLI's input, or
the localhost URL the provider redirected their browser to, which is fetched inside the VM (the CLI's own
callback). Checked before it goes near the VM; never logged (it is a one-time secret)."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlparse

from polydev.core.errors import CodeRejected
from polydev.core.login_sessions import LoginSessions
from polydev.core.login_state import Login
from polydev.providers.base import LoginPlan, ProviderAdapter

NOT_WAITING = "the login is not waiting for the user yet; try again when its status is awaiting_user_auth"
# Fetches a localhost URL inside the guest (the page the provider redirected the user's browser to), and
# follows the CLI's own redirects to its /success page (Codex exits only after that page was loaded).
_FETCH = ("import sys, urllib.request\n"
          "r = urllib.request.urlopen(sys.argv[1], timeout=30)\n"
          "print(r.status)\n")


def check(code: str, adapter: ProviderAdapter, plan: LoginPlan, auth_url: str | None) -> str:
    """What the user pasted: "url" for the CLI's own localhost callback (same port as the redirect_uri it
    asked the provider for, http), "code" for a code the CLI reads; CodeRejected for anything else."""
    if code.startswith(("http://localhost", "http://127.0.0.1")):
        parsed = urlparse(code)
        expected: int | None = plan.callback_port
        if auth_url:
            redirect = parse_qs(urlparse(auth_url).query).get("redirect_uri", [""])[0]
            rp = urlparse(redirect)
            if rp.hostname in ("localhost", "127.0.0.1") and rp.port:
                expected = rp.port
        if parsed.scheme != "http" or parsed.hostname not in ("localhost", "127.0.0.1") or not parsed.port:
            raise CodeRejected("paste the full http://localhost:PORT/… address from your browser")
        if expected is not None and parsed.port != expected:
            raise CodeRejected(f"that address is not this login's callback (expected port {expected})")
        return "url"
    if not plan.accepts_code:
        raise CodeRejected(f"{adapter.display_name} takes no pasted code: paste the full "
                           "http://localhost… address your browser was sent to after signing in")
    return "code"


async def deliver(login: Login, code: str, sessions: LoginSessions) -> None:
    """Hand what the user pasted to the login running here (it is waiting for the user)."""
    assert login.guest is not None and login.proc is not None
    kind = check(code, login.adapter, login.plan, login.auth_url)
    if kind == "url":
        try:
            status = await login.guest.run(["python3", "-c", _FETCH, code], timeout_s=60)
        except Exception:
            # The CLI can take the code, write its files and exit before this fetch has answered; the login
            # then ends and closes the VM's agent connection under the fetch. That is a success.
            if await _ended_as(login, "completed", sessions):
                return
            raise
        if status != 0:
            raise CodeRejected("the CLI's callback did not accept that URL; start a new session if the code "
                               "has been used")
        return
    await login.proc.write(login.adapter.code_input(code))


async def _ended_as(login: Login, status: str, sessions: LoginSessions) -> bool:
    """Whether the login's task ends (within a few seconds) with the session in `status`."""
    if login.task is None or login.user_id is None or login.session_id is None:
        return False
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(login.task), 30)
    state = await sessions.read(login.user_id, login.session_id)
    return bool(state["status"] == status)
