"""What a running login yields: its URL (caught by the `$BROWSER` hook, or parsed from the CLI's output),
published as `awaiting_user_auth`; then, once the user has finished, the credential files it wrote."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import structlog

from polydev.core import credential_sync
from polydev.core.errors import LoginError
from polydev.core.login_sessions import LoginSessions
from polydev.core.login_state import Login, publish
from polydev.providers.base import CredentialBundle

log = structlog.get_logger(__name__)

HOOK_URL_GRACE = 3.0  # seconds the login output gets to print a URL the user can use from outside the VM
OUTPUT_KEEP = 16_000  # chars of the login's output kept for URL parsing and for error messages
REFUSAL_POLL_S = 1.0

Refused = Callable[[str], "str | None"]  # host → why the egress gateway refused it for this login's VM


async def until_logged_in(login: Login, sessions: LoginSessions, refused: Refused | None = None) -> None:
    """Publish the login URL as soon as it is known, then wait for the credential files (and for the CLI to
    exit, for CLIs that exit by themselves). LoginError with the egress gateway's reason as soon as it refused
    the sign-in page's host for this VM: the machine cannot reach it, and the user would look at an error
    page until the timeout."""
    main = asyncio.ensure_future(_logged_in(login, sessions))
    watch = asyncio.ensure_future(_sign_in_refused(login, refused))
    try:
        await asyncio.wait({main, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (main, watch):
            task.cancel()
        await asyncio.gather(main, watch, return_exceptions=True)
    if main.done() and not main.cancelled():
        return main.result()
    raise LoginError(f"egress: {watch.result()}")


async def _sign_in_refused(login: Login, refused: Refused | None) -> str:
    """Once the URL is known: the gateway's reason for refusing its host, when it does; else never returns."""
    await login.awaiting.wait()
    host = urlparse(login.auth_url or "").hostname
    if refused is None or not host:
        await asyncio.Event().wait()
    while not (reason := refused(host)):  # type: ignore[misc, arg-type]
        await asyncio.sleep(REFUSAL_POLL_S)
    return reason


async def _logged_in(login: Login, sessions: LoginSessions) -> None:
    assert login.guest is not None and login.proc is not None
    output = asyncio.create_task(_read_output(login, sessions))
    hook = asyncio.create_task(_watch_hook(login, sessions))
    files = asyncio.create_task(_wait_files(login))
    try:
        if login.plan.ends == "files":
            done, _ = await asyncio.wait({output, files}, return_when=asyncio.FIRST_COMPLETED)
            if files in done:
                files.result()
                return
            output.result()
            raise LoginError(_exit_reason(login))
        await output
        if login.proc.exit_code != 0:
            raise LoginError(_exit_reason(login))
        if not files.done():  # it exited 0: its files are written, or it failed quietly
            await asyncio.wait_for(files, 10)
    finally:
        for task in (output, hook, files):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def capture(login: Login) -> CredentialBundle:
    """The credential files the finished login wrote; LoginError when a required one is missing."""
    assert login.guest is not None
    return await credential_sync.capture(login.guest, login.env, login.adapter)


def _exit_reason(login: Login) -> str:
    assert login.proc is not None
    last = [line for line in login.output.splitlines() if line.strip()][-3:]
    detail = (": " + " | ".join(line.strip()[:200] for line in last)) if last else ""
    return f"the {login.adapter.display_name} login exited with status {login.proc.exit_code}{detail}"


async def _read_output(login: Login, sessions: LoginSessions) -> None:
    assert login.proc is not None
    async for ev in login.proc.events():
        if ev.type in ("stdout", "stderr"):
            login.output = (login.output + ev.bytes().decode("utf-8", "replace"))[-OUTPUT_KEEP:]
            prompt = login.adapter.parse_login_output(login.output)
            if prompt.device_code and not login.awaiting.is_set():
                await _awaiting(login, sessions, prompt.verification_url or prompt.auth_url,
                                device_code=prompt.device_code)
            elif prompt.auth_url and not login.awaiting.is_set():
                await _awaiting(login, sessions, prompt.auth_url)


async def _watch_hook(login: Login, sessions: LoginSessions) -> None:
    assert login.guest is not None
    while not login.awaiting.is_set():
        if await login.guest.watch([login.env.urls_file], 30) is None:
            continue
        found = await login.guest.read(login.env.urls_file)
        urls = [u.strip() for u in (found[0].decode("utf-8", "replace") if found else "").splitlines()]
        urls = [u for u in urls if u.startswith("https://")]
        if urls and login.plan.accepts_code and login.browser is None:
            # The hook's URL sends the browser back to the CLI's localhost callback, which a user outside
            # the VM cannot reach; the CLI prints a paste-code variant next: prefer that one.
            await asyncio.sleep(HOOK_URL_GRACE)
        if urls and not login.awaiting.is_set():
            await _awaiting(login, sessions, urls[0])
            return
        await asyncio.sleep(0.1)


async def _awaiting(login: Login, sessions: LoginSessions, url: str | None, **extra: Any) -> None:
    login.auth_url = url
    login.awaiting.set()
    await publish(sessions, login, status="awaiting_user_auth", auth_url=url, **extra)
    log.info("login_awaiting_user", session_id=str(login.session_id))


async def _wait_files(login: Login) -> None:
    assert login.guest is not None
    for rel in login.adapter.required_credential_files:
        while await login.guest.watch([login.env.home_path(rel)], 60) is None:
            pass
