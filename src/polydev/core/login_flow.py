"""The login flow: connect a provider account by running the provider's own CLI login inside a fresh VM.

`start` answers at once with a session id (the seed's race-condition fix); a background task then drives
the session through the seed's statuses:

    initializing → vm_created → ready → awaiting_user_auth → completed
                                                 ↘ failed | timeout | cancelled (from any live status)

VM from the snapshot → login helper and settings written into the guest → the CLI's login started (under a
PTY where it takes a pasted code) → its URL caught by the `$BROWSER` hook (its output as the fallback) →
`awaiting_user_auth` with `auth_url` (and the device code, for a device login) → the user finishes the login
(in a browser, by pasting a code or the final localhost URL here, or on the device page) → the agent sees
the credential files complete → they are sealed in the vault → VM destroyed → `completed`. Whatever ends the
session — success, failure, cancel, timeout — the VM is destroyed and `error_message` says why.

With the login browser on (LOGIN_BROWSER, core/login_browser.py) the VM is a `browser` VM: Xtigervnc starts
next to the CLI; once it answers, an idle Chromium starts on its display and the session gets `vnc_url`, the
WebSocket the user's page opens (with a ticket) to see and use it; the hook also shows the URL in Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import structlog

from polydev.core.guest import Guest, GuestProcess, base_files
from polydev.core.login_browser import LoginBrowser, wait_for_vnc
from polydev.core.login_sessions import LoginSessions, SessionNotFound
from polydev.core.tasks import cancel_and_wait
from polydev.providers import get_adapter
from polydev.providers.base import (
    CredentialBundle,
    GuestEnv,
    GuestFile,
    LoginPlan,
    ProviderAdapter,
    hook_files,
)
from polydev.store.credentials import CredentialRepo

log = structlog.get_logger(__name__)

# Fetches a localhost URL inside the guest (the page the provider redirected the user's browser to), and
# follows the CLI's own redirects to its /success page (Codex exits only after that page was loaded).
_FETCH = ("import sys, urllib.request\n"
          "r = urllib.request.urlopen(sys.argv[1], timeout=30)\n"
          "print(r.status)\n")
HOOK_URL_GRACE = 3.0  # seconds the login output gets to print a URL the user can use from outside the VM
OUTPUT_KEEP = 16_000  # chars of the login's output kept for URL parsing and for error messages


class LoginError(Exception):
    """Why a login failed, in words for the user (never a secret)."""


class FlowUnavailable(Exception):
    """The server cannot run VMs right now; the text says why."""


class SessionNotLive(Exception):
    """The session exists but is not being driven here (ended, or by another replica)."""


class CodeRejected(ValueError):
    pass


@dataclass
class _Login:
    session_id: uuid.UUID
    user_id: uuid.UUID
    adapter: ProviderAdapter
    plan: LoginPlan
    env: GuestEnv
    task: asyncio.Task[None] | None = None
    guest: Guest | None = None
    proc: GuestProcess | None = None
    auth_url: str | None = None
    awaiting: asyncio.Event = field(default_factory=asyncio.Event)
    output: str = ""
    cancelled_by_user: bool = False
    browser: LoginBrowser | None = None
    vnc: tuple[str, int] | None = None  # the VNC server as the control plane reaches it, once it answers
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set first thing when the session ends
    browser_procs: list[GuestProcess] = field(default_factory=list)  # Xtigervnc, Chromium


class LoginFlow:
    def __init__(self, *, sessions: LoginSessions, credentials: CredentialRepo,
                 engine: Callable[[], Any], guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None = None,
                 timeout: float = 300.0, vm_purpose: str = "cli",
                 browser: Callable[[], LoginBrowser | None] = lambda: None) -> None:
        self.sessions = sessions
        self.credentials = credentials
        self._engine = engine  # () -> (VMEngine | None, reason when None)
        self._guest_env = guest_env  # provider -> GuestEnv (API base URLs differ per provider)
        self.ca_pem = ca_pem
        self.timeout = timeout
        self.vm_purpose = vm_purpose
        self._browser = browser  # asked per login: whether the engine's image can run the login browser
        self._live: dict[uuid.UUID, _Login] = {}

    # -- API-facing ---------------------------------------------------------------------------------------

    async def start(self, user_id: uuid.UUID, provider: str, method: str | None = None) -> dict[str, Any]:
        adapter = get_adapter(provider)
        method = method or adapter.login_methods[0]
        if method not in adapter.login_methods:
            raise ValueError(f"{provider} supports login method(s) {', '.join(adapter.login_methods)}, "
                             f"not {method!r}")
        engine, reason = self._engine()
        if engine is None:
            raise FlowUnavailable(reason or "this server runs no VMs")
        env = self._guest_env(provider)
        plan = adapter.login_plan(method, env)  # type: ignore[arg-type]
        live = await self.sessions.start(user_id, provider, method)
        live = await self.sessions.update(uuid.UUID(live["session_id"]), accepts_code=plan.accepts_code) or live
        login = _Login(uuid.UUID(live["session_id"]), user_id, adapter, plan, env, browser=self._browser())
        self._live[login.session_id] = login
        login.task = asyncio.create_task(self._drive(login, engine), name=f"login-{login.session_id}")
        log.info("login_started", session_id=str(login.session_id), provider=provider, method=method)
        return live

    async def submit_code(self, user_id: uuid.UUID, session_id: uuid.UUID, code: str) -> None:
        """The user's part of the login: a code from the provider's page, or the localhost URL the provider
        redirected their browser to. Never logged: it is a one-time secret."""
        login = await self._owned_live(user_id, session_id)
        if not login.awaiting.is_set() or login.guest is None or login.proc is None:
            raise SessionNotLive("the login is not waiting for the user yet; try again when its status is "
                                 "awaiting_user_auth")
        code = code.strip()
        if code.startswith(("http://localhost", "http://127.0.0.1")):
            url = self._check_callback_url(login, code)
            try:
                status = await login.guest.run(["python3", "-c", _FETCH, url], timeout_s=60)
            except Exception:
                # The CLI can take the code, write its files and exit before this fetch has answered; the
                # login then ends and closes the VM's agent connection under the fetch. That is a success.
                if await self._ended_as(login, "completed"):
                    return
                raise
            if status != 0:
                raise CodeRejected("the CLI's callback did not accept that URL; start a new session if the "
                                   "code has been used")
            return
        if not login.plan.accepts_code:
            raise CodeRejected(f"{login.adapter.display_name} takes no pasted code: paste the full "
                               "http://localhost… address your browser was sent to after signing in")
        await login.proc.write(login.adapter.code_input(code))

    async def _ended_as(self, login: _Login, status: str) -> bool:
        """Whether the login's task ends (within a few seconds) with the session in `status`."""
        if login.task is None:
            return False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(login.task), 30)
        state = await self.sessions.read(login.user_id, login.session_id)
        return bool(state["status"] == status)

    async def cancel(self, user_id: uuid.UUID, session_id: uuid.UUID) -> dict[str, Any]:
        state = await self.sessions.read(user_id, session_id)
        login = self._live.get(session_id)
        if login is not None and login.task is not None and not login.task.done():
            login.cancelled_by_user = True
            await cancel_and_wait([login.task])
        elif state["status"] not in ("completed", "failed", "timeout", "cancelled"):
            # Not driven by this process (it restarted): nothing runs for it any more.
            await self.sessions.finish(session_id, "cancelled", "cancelled by the user")
        return await self.sessions.read(user_id, session_id)

    async def close(self) -> None:
        """Server shutdown: end every login this process drives (their VMs go with the engine)."""
        await cancel_and_wait([x.task for x in list(self._live.values())])

    async def reclaim(self) -> int:
        """At start-up: sessions a previous process was driving can never finish now."""
        n = 0
        for row in await self.sessions.repo.live():
            if row.session_id not in self._live:
                n += await self.sessions.finish(row.session_id, "failed",
                                                "the server restarted before the login finished; start a "
                                                "new session")
        return n

    # -- the flow -----------------------------------------------------------------------------------------

    async def _drive(self, login: _Login, engine: Any) -> None:
        sid = login.session_id
        vm_id: uuid.UUID | None = None
        status, error = "failed", "login failed"
        helpers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self.timeout):
                purpose = "browser" if login.browser is not None else self.vm_purpose
                vm = await engine.create(login.user_id, purpose, ttl=self._vm_ttl())
                vm_id = vm.id
                await self.sessions.update(sid, status="vm_created", vm_id=str(vm.id))
                login.guest = Guest(engine.agent(vm.id, timeout=self.timeout + 60))
                await self._prepare(login)
                if login.browser is not None:
                    helpers = self._start_browser(login, engine, vm.id)
                login.proc = login.guest.start(login.plan.command, timeout_s=self.timeout + 30)
                await self.sessions.update(sid, status="ready")
                await self._until_logged_in(login)
                bundle = await self._capture(login)
            await self.credentials.put(login.user_id, login.adapter.name, "oauth", bundle.to_bytes())
            status, error = "completed", None
        except asyncio.CancelledError:
            status = "cancelled"
            error = "cancelled by the user" if login.cancelled_by_user else "the server shut down"
        except TimeoutError:
            status = "timeout"
            error = (f"the login was not completed within {int(self.timeout)} s; start a new session"
                     if login.awaiting.is_set() else
                     f"the login page did not appear within {int(self.timeout)} s")
        except LoginError as exc:
            error = str(exc)
        except Exception as exc:  # the VM failed to start or died, the agent broke: say what, not how
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("login_failed", session_id=str(sid), error=error)
        finally:
            login.ended.set()  # VNC bridges close before the VM goes
            await cancel_and_wait(helpers)
            for proc in login.browser_procs:  # (the VM takes them along; a stand-in guest would not)
                await proc.kill()
            if login.proc is not None:
                await login.proc.kill()
            if login.guest is not None:
                login.guest.close()
            if vm_id is not None:
                with contextlib.suppress(Exception):
                    await engine.destroy(vm_id)
            await self.sessions.finish(sid, status, error)
            self._live.pop(sid, None)
            log.info("login_ended", session_id=str(sid), provider=login.adapter.name, status=status)

    def _vm_ttl(self) -> Any:
        from datetime import timedelta

        return timedelta(seconds=self.timeout + 120)  # the reaper's backstop, should this task die

    async def _prepare(self, login: _Login) -> None:
        assert login.guest is not None
        browser = login.browser
        opener = browser.hook_opener(login.env) if browser else None
        files: list[GuestFile] = [*hook_files(login.env, opener), *login.plan.command.files,
                                  *(browser.files(login.env, self.ca_pem) if browser else ()),
                                  *base_files(login.env, self.ca_pem)]
        await login.guest.put(*files)

    def _start_browser(self, login: _Login, engine: Any, vm_id: uuid.UUID) -> list[asyncio.Task[None]]:
        """Xtigervnc now, next to the CLI; Chromium as soon as its display answers (it exits at once without
        an X server) and before the URL is known (it is slow to start on an emulated CPU). Returns the helper
        tasks, cancelled when the session ends; the processes die with the VM."""
        assert login.guest is not None and login.browser is not None
        server = login.guest.start(login.browser.vnc_server(login.env), timeout_s=self.timeout + 30)
        login.browser_procs.append(server)
        return [asyncio.create_task(self._drain(server)), asyncio.create_task(self._browser_up(login, engine, vm_id))]

    @staticmethod
    async def _drain(proc: GuestProcess) -> None:
        # Their output is noise (Chromium's D-Bus complaints); read it so it does not pile up in memory.
        with contextlib.suppress(Exception):
            async for _ in proc.events():
                pass

    async def _browser_up(self, login: _Login, engine: Any, vm_id: uuid.UUID) -> None:
        """Once the VM's VNC server answers: start Chromium on it and publish `vnc_url`. A login browser that
        never comes up is not fatal: the user can still finish by pasting a code or the callback URL."""
        assert login.guest is not None and login.browser is not None
        try:
            address = engine.vnc_endpoint(vm_id)
            started = asyncio.get_running_loop().time()
            await wait_for_vnc(*address, deadline_s=min(120.0, self.timeout))
        except (KeyError, TimeoutError) as exc:
            log.warning("login_vnc_unavailable", session_id=str(login.session_id), reason=type(exc).__name__)
            return
        login.vnc = address
        chromium = login.guest.start(login.browser.idle_browser(login.env), timeout_s=self.timeout + 30)
        login.browser_procs.append(chromium)
        await self.sessions.update(login.session_id, vnc_url=f"/api/auth/sessions/{login.session_id}/vnc")
        log.info("login_vnc_up", session_id=str(login.session_id),
                 seconds=round(asyncio.get_running_loop().time() - started, 2))
        await self._drain(chromium)

    async def vnc_target(self, user_id: uuid.UUID, session_id: uuid.UUID) -> tuple[tuple[str, int], asyncio.Event]:
        """Where the session's VNC server is, and an event set when the session ends (the bridge closes
        then). SessionNotLive when the session has no VNC server running in this process."""
        login = await self._owned_live(user_id, session_id)
        if login.vnc is None or login.ended.is_set():
            raise SessionNotLive("this login session has no browser to show (yet); follow its vnc_url")
        return login.vnc, login.ended

    async def _until_logged_in(self, login: _Login) -> None:
        """Publish the login URL as soon as it is known, then wait for the credential files (and for the
        CLI to exit, for CLIs that exit by themselves)."""
        assert login.guest is not None and login.proc is not None
        output = asyncio.create_task(self._read_output(login))
        hook = asyncio.create_task(self._watch_hook(login))
        files = asyncio.create_task(self._wait_files(login))
        try:
            if login.plan.ends == "files":
                done, _ = await asyncio.wait({output, files}, return_when=asyncio.FIRST_COMPLETED)
                if files in done:
                    files.result()
                    return
                output.result()
                raise LoginError(self._exit_reason(login))
            await output
            if login.proc.exit_code != 0:
                raise LoginError(self._exit_reason(login))
            if not files.done():  # it exited 0: its files are written, or it failed quietly
                await asyncio.wait_for(files, 10)
        finally:
            for task in (output, hook, files):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _exit_reason(self, login: _Login) -> str:
        assert login.proc is not None
        last = [line for line in login.output.splitlines() if line.strip()][-3:]
        detail = (": " + " | ".join(line.strip()[:200] for line in last)) if last else ""
        return f"the {login.adapter.display_name} login exited with status {login.proc.exit_code}{detail}"

    async def _read_output(self, login: _Login) -> None:
        assert login.proc is not None
        async for ev in login.proc.events():
            if ev.type in ("stdout", "stderr"):
                login.output = (login.output + ev.bytes().decode("utf-8", "replace"))[-OUTPUT_KEEP:]
                prompt = login.adapter.parse_login_output(login.output)
                if prompt.device_code and not login.awaiting.is_set():
                    await self._awaiting(login, prompt.verification_url or prompt.auth_url,
                                         device_code=prompt.device_code)
                elif prompt.auth_url and not login.awaiting.is_set():
                    await self._awaiting(login, prompt.auth_url)

    async def _watch_hook(self, login: _Login) -> None:
        assert login.guest is not None
        while not login.awaiting.is_set():
            if await login.guest.watch([login.env.urls_file], 30) is None:
                continue
            found = await login.guest.read(login.env.urls_file)
            urls = [u.strip() for u in (found[0].decode("utf-8", "replace") if found else "").splitlines()]
            urls = [u for u in urls if u.startswith("https://")]
            if urls and login.plan.accepts_code and login.browser is None:
                # The hook's URL sends the browser back to the CLI's localhost callback, which a user
                # outside the VM cannot reach; the CLI prints a paste-code variant next: prefer that one.
                await asyncio.sleep(HOOK_URL_GRACE)
            if urls and not login.awaiting.is_set():
                await self._awaiting(login, urls[0])
                return
            await asyncio.sleep(0.1)

    async def _awaiting(self, login: _Login, url: str | None, **extra: Any) -> None:
        login.auth_url = url
        login.awaiting.set()
        await self.sessions.update(login.session_id, status="awaiting_user_auth", auth_url=url, **extra)
        log.info("login_awaiting_user", session_id=str(login.session_id))

    async def _wait_files(self, login: _Login) -> None:
        assert login.guest is not None
        for rel in login.adapter.required_credential_files:
            while await login.guest.watch([login.env.home_path(rel)], 60) is None:
                pass

    async def _capture(self, login: _Login) -> CredentialBundle:
        assert login.guest is not None
        bundle = CredentialBundle("oauth")
        for rel in login.adapter.credential_files:
            found = await login.guest.read(login.env.home_path(rel))
            if found is None:
                if rel in login.adapter.required_credential_files:
                    raise LoginError(f"the login finished but {rel} was not written")
                continue
            bundle.files[rel] = (found[0], found[1] & 0o777)
        return bundle

    def _check_callback_url(self, login: _Login, url: str) -> str:
        """Only the CLI's own callback may be fetched inside the VM: same port as the redirect_uri it asked
        the provider for, http on localhost."""
        parsed = urlparse(url)
        expected: int | None = login.plan.callback_port
        if login.auth_url:
            redirect = parse_qs(urlparse(login.auth_url).query).get("redirect_uri", [""])[0]
            rp = urlparse(redirect)
            if rp.hostname in ("localhost", "127.0.0.1") and rp.port:
                expected = rp.port
        if parsed.scheme != "http" or parsed.hostname not in ("localhost", "127.0.0.1") or not parsed.port:
            raise CodeRejected("paste the full http://localhost:PORT/… address from your browser")
        if expected is not None and parsed.port != expected:
            raise CodeRejected(f"that address is not this login's callback (expected port {expected})")
        return url

    async def _owned_live(self, user_id: uuid.UUID, session_id: uuid.UUID) -> _Login:
        state = await self.sessions.read(user_id, session_id)  # SessionNotFound / SessionExpired for others
        login = self._live.get(session_id)
        if login is None or login.user_id != user_id:
            raise SessionNotLive(f"the login session is {state['status']}; start a new session")
        return login


__all__ = ["CodeRejected", "FlowUnavailable", "LoginError", "LoginFlow", "SessionNotFound", "SessionNotLive"]
