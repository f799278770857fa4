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

The parts: this module holds the entry points and the drive; core/login_capture.py catches the URL and the
credentials, core/login_vnc.py runs the login browser, core/login_input.py takes what the user pastes,
core/login_prestart.py and core/login_pool.py keep pre-started logins, core/login_relay.py passes a user's
input to the replica driving the login.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import structlog

from polydev.core import login_capture, login_input
from polydev.core.errors import LoginError, SessionNotLive, describe
from polydev.core.guest import Guest, base_files
from polydev.core.login_browser import LoginBrowser
from polydev.core.login_pool import LoginPool
from polydev.core.login_prestart import hand_over, pool_sizes
from polydev.core.login_relay import LoginRelay
from polydev.core.login_sessions import LoginSessions
from polydev.core.login_state import Login, VncTarget, publish, vm_ttl
from polydev.core.login_vnc import start_browser
from polydev.core.relay import wait_for
from polydev.core.tasks import cancel_and_wait, end_all
from polydev.core.vm_flow import Admit, EngineSource, VmFlow, admit_all, failure_reason
from polydev.providers import get_adapter
from polydev.providers.base import GuestEnv, GuestFile, hook_files
from polydev.store.credentials import CredentialRepo
from polydev.store.models import AUTH_SESSION_TERMINAL
from polydev.store.vault import Vault

if TYPE_CHECKING:
    from polydev.core.ports import VmPort
    from polydev.vm.engine import Purpose

log = structlog.get_logger(__name__)

RELAY_CANCEL_WAIT_S = 10.0  # how long a cancel waits for the replica driving the login to end it
RESTARTED = "the server restarted before the login finished; start a new session"


class LoginFlow(VmFlow):
    def __init__(self, *, sessions: LoginSessions, credentials: CredentialRepo, engine: EngineSource,
                 guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None = None, timeout: float = 300.0,
                 vm_purpose: Purpose = "cli", browser: Callable[[], LoginBrowser | None] = lambda: None,
                 pool: dict[tuple[str, str | None], int] | None = None, pool_max_age: float = 300.0,
                 vault: Vault | None = None, admit: Admit = admit_all) -> None:
        super().__init__(credentials=credentials, engine=engine, guest_env=guest_env, ca_pem=ca_pem, admit=admit)
        self.sessions = sessions
        self.timeout = timeout
        self.vm_purpose: Purpose = vm_purpose
        self._browser = browser  # asked per login: whether the engine's image can run the login browser
        self._live: dict[uuid.UUID, Login] = {}
        self.pool_max_age = pool_max_age
        self.pool: LoginPool[Login] = LoginPool({}, self._prestart)
        self.set_pool(pool or {})
        self._pooled: set[Login] = set()  # pre-started logins, taken or not, until their task ends
        self.relay = LoginRelay(sessions.store, vault)  # input for logins driven by another replica

    # -- API-facing ---------------------------------------------------------------------------------------

    async def start(self, user_id: uuid.UUID, provider: str, method: str | None = None) -> dict[str, Any]:
        adapter = get_adapter(provider)
        method = method or adapter.login_methods[0]
        if method not in adapter.login_methods:
            raise ValueError(f"{provider} supports login method(s) {', '.join(adapter.login_methods)}, "
                             f"not {method!r}")
        engine = self._running_engine()
        hold = await self.admit(user_id, "login", "browser" if self._browser() is not None else self.vm_purpose)
        try:
            env = self._guest_env(provider)
            plan = adapter.login_plan(method, env)  # type: ignore[arg-type]
            live = await self.sessions.start(user_id, provider, method)
            hold.counted("logins")  # its session's row counts it from here on
            sid = uuid.UUID(live["session_id"])
            pooled = self.pool.take(provider, method)
            if pooled is not None:
                adopted = await hand_over(pooled, sid, user_id, engine=engine, sessions=self.sessions,
                                          timeout=self.timeout, track=self._track)
                if adopted is not None:
                    hold.release()  # the pre-started login's VM, now its user's, counts it
                    return adopted
            live = await self.sessions.update(sid, accepts_code=plan.accepts_code) or live
        except BaseException:
            hold.release()
            raise
        login = Login(sid, user_id, adapter, plan, env, browser=self._browser(), hold=hold)
        self._track(login)
        login.task = asyncio.create_task(self._drive(login, engine), name=f"login-{sid}")
        log.info("login_started", session_id=str(sid), provider=provider, method=method)
        return live

    async def submit_code(self, user_id: uuid.UUID, session_id: uuid.UUID, code: str) -> None:
        """The user's part of the login: a code from the provider's page, or the localhost URL the provider
        redirected their browser to. Never logged: it is a one-time secret. A login another replica drives
        gets it through the shared session store (core/login_relay.py), checked here first."""
        code = code.strip()
        login = self._live.get(session_id)
        if login is None or login.user_id != user_id:
            state = await self.sessions.read(user_id, session_id)  # SessionNotFound for other users
            if not self.relay.shared or state["status"] in AUTH_SESSION_TERMINAL:
                raise SessionNotLive(f"the login session is {state['status']}; start a new session")
            if state["status"] != "awaiting_user_auth":
                raise SessionNotLive(login_input.NOT_WAITING)
            adapter = get_adapter(state["provider"])
            plan = adapter.login_plan(state.get("method") or adapter.login_methods[0],  # type: ignore[arg-type]
                                      self._guest_env(adapter.name))
            login_input.check(code, adapter, plan, state.get("auth_url"))
            await self.relay.send_code(user_id, session_id, code)
            return
        if not login.awaiting.is_set() or login.guest is None or login.proc is None:
            raise SessionNotLive(login_input.NOT_WAITING)
        await login_input.deliver(login, code, self.sessions)

    async def cancel(self, user_id: uuid.UUID, session_id: uuid.UUID) -> dict[str, Any]:
        state = await self.sessions.read(user_id, session_id)
        if await self._cancel_here(session_id):
            pass
        elif state["status"] not in AUTH_SESSION_TERMINAL:
            if self.relay.shared:  # driven by another replica, which ends it (VM and all) when it sees this
                await self.relay.send_cancel(session_id)

                async def ended() -> dict[str, Any] | None:
                    now = await self.sessions.read(user_id, session_id)
                    return now if now["status"] in AUTH_SESSION_TERMINAL else None

                if (final := await wait_for(ended, RELAY_CANCEL_WAIT_S)) is not None:
                    return final
            # Nobody drives it (the process that did has stopped): nothing runs for it any more.
            await self.sessions.finish(session_id, "cancelled", "cancelled by the user")
        return await self.sessions.read(user_id, session_id)

    async def vnc_target(self, user_id: uuid.UUID, session_id: uuid.UUID) -> VncTarget:
        """Where the session's VNC server is, its password, and an event set when the session ends (the
        bridge closes then). SessionNotLive when the session has no VNC server running in this process."""
        login = await self._owned_live(user_id, session_id)
        if login.vnc is None or login.ending.is_set():
            raise SessionNotLive("this login session has no browser to show (yet); follow its vnc_url")
        return VncTarget(login.vnc, login.vnc_password, login.ending)

    async def close(self) -> None:
        """Server shutdown: end every login this process drives (their VMs go with the engine)."""
        await self.stop_pool()
        await end_all(list(self._live.values()))
        await self.relay.close()

    async def reclaim(self, servers: Collection[uuid.UUID | None] | None = None, reason: str = RESTARTED) -> int:
        """Sessions a gone server was driving can never finish now: end them failed with `reason`. Given
        `servers`, only theirs (None standing for sessions that name no server); else every one not driven
        here (one server alone on its database, at start-up)."""
        n = 0
        for row in await self.sessions.repo.live(servers):
            if row.session_id not in self._live:
                n += await self.sessions.finish(row.session_id, "failed", reason)
        return n

    # -- pre-started logins (core/login_prestart.py, core/login_pool.py) ----------------------------------

    def set_pool(self, pool: dict[tuple[str, str | None], int]) -> None:
        """How many pre-started logins to keep per (provider, method or None for its default); takes effect
        at start_pool. Call it while no pool runs."""
        self.pool = LoginPool(pool_sizes(pool), self._prestart)

    def start_pool(self) -> None:
        """Keep LOGIN_POOL's pre-started logins (call once the engine runs)."""
        self.pool.start()

    async def stop_pool(self) -> None:
        """Stop keeping pre-started logins and end those nobody has taken (their VMs are destroyed)."""
        await self.pool.close()
        await end_all([x for x in list(self._pooled) if x.session_id is None])

    async def renew_pool(self) -> int:
        """End the pre-started logins nobody has taken (their VMs are of an image the engine no longer starts);
        the pool starts new ones. Logins users hold go on. Returns how many were ended."""
        idle = [x for x in list(self._pooled) if x.session_id is None]
        await end_all(idle)
        return len(idle)

    def _prestart(self, provider: str, method: str) -> Login | None:
        """One login driven, for nobody, up to its URL; it waits there for a user (or its max age)."""
        engine, _ = self._engine()
        if engine is None:
            return None
        adapter = get_adapter(provider)
        env = self._guest_env(provider)
        login = Login(None, None, adapter, adapter.login_plan(method, env), env,  # type: ignore[arg-type]
                      browser=self._browser())
        self._pooled.add(login)
        login.task = asyncio.create_task(self._drive(login, engine), name=f"login-pool-{provider}-{method}")
        login.task.add_done_callback(lambda _t: self._pooled.discard(login))
        return login

    # -- this process's live logins -----------------------------------------------------------------------

    def _track(self, login: Login) -> None:
        """A login with a session, driven here: found by its id, and taking input relayed from other replicas."""
        assert login.session_id is not None
        self._live[login.session_id] = login
        self.relay.watch(self._relay_sessions, self._relayed_code, self._cancel_here)

    def _relay_sessions(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        return [(sid, x.user_id) for sid, x in self._live.items() if x.user_id is not None]

    async def _relayed_code(self, session_id: uuid.UUID, code: str) -> None:
        login = self._live.get(session_id)
        if login is None or login.guest is None or login.proc is None:
            return
        try:
            await login_input.deliver(login, code, self.sessions)
        except Exception as exc:  # nobody waits for an answer here: the session's status tells the user
            log.warning("login_relayed_code_failed", session_id=str(session_id), reason=type(exc).__name__)

    async def _cancel_here(self, session_id: uuid.UUID) -> bool:
        """Cancel a login this process drives (asked here or relayed); False if it drives none by that id.
        One already ending (or cancelled) is not cancelled again: this waits for its clean-up."""
        login = self._live.get(session_id)
        if login is None or not login.running:
            return False
        await login.cancel_and_wait(by_user=True)
        return True

    async def _owned_live(self, user_id: uuid.UUID, session_id: uuid.UUID) -> Login:
        state = await self.sessions.read(user_id, session_id)  # SessionNotFound / SessionExpired for others
        login = self._live.get(session_id)
        if login is None or login.user_id != user_id:
            if state["status"] not in AUTH_SESSION_TERMINAL:
                raise SessionNotLive("this login runs on another server of this deployment; its browser view "
                                     "is served only there (route a session's requests to one server)")
            raise SessionNotLive(f"the login session is {state['status']}; start a new session")
        return login

    # -- the flow -----------------------------------------------------------------------------------------

    async def _drive(self, login: Login, engine: VmPort) -> None:
        """The whole login. A pre-started one (no session yet) runs the same way: it waits for its user at
        `awaiting_user_auth`, or ends at its max age; hand_over moves its deadline when a user takes it."""
        pre_started = login.session_id is None
        status: str = "failed"
        error: str | None = "login failed"
        helpers: list[asyncio.Task[None]] = []
        limit = self.pool_max_age if pre_started else self.timeout
        # The VM's expiry and the processes' own limits cover a pre-started login's wait plus its user's time.
        budget = limit + (self.timeout if pre_started else 0)
        try:
            async with asyncio.timeout(limit) as login.deadline:
                purpose: Purpose = "browser" if login.browser is not None else self.vm_purpose
                try:
                    vm = await engine.create(login.user_id, purpose, ttl=vm_ttl(budget), on_row=login.hold_at_row)
                except BaseException:
                    login.release_hold()
                    raise
                engine.label(vm.id, purpose="login", provider=login.adapter.name, browser=login.browser is not None)
                async with login.publishing:
                    login.vm_id = vm.id
                    if login.user_id is not None and vm.user_id != login.user_id:  # taken while it started
                        await engine.assign(vm.id, login.user_id, vm_ttl(self.timeout))
                await publish(self.sessions, login, status="vm_created", vm_id=str(vm.id))
                login.guest = Guest(engine.agent(vm.id, timeout=budget + 60))
                await self._prepare(login)
                if login.browser is not None:
                    helpers = start_browser(login, engine, vm.id, budget, sessions=self.sessions,
                                            vnc_wait_s=self.timeout)
                login.proc = login.guest.start(login.plan.command, timeout_s=budget + 30)
                await publish(self.sessions, login, status="ready")
                await login_capture.until_logged_in(login, self.sessions,
                                                    lambda host: engine.egress_refusal(vm.id, host))
                bundle = await login_capture.capture(login)
            if login.user_id is None:  # a pre-started login nobody took cannot have been completed
                raise LoginError("the login finished before anyone took it")
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
            error = describe(exc)[:500]
            log.warning("login_failed", session_id=str(login.session_id), error=error)
        finally:
            # A login whose page appeared and then was not finished in time did not fail at the egress: a
            # refusal then (the sign-in page's browser pulling something) is incidental, not the reason.
            if status == "failed" or (status == "timeout" and not login.awaiting.is_set()):
                error = await failure_reason(engine, login.vm_id, error)
            login.release_hold()  # its VM goes now (or never came)
            login.ending.set()  # VNC bridges close before the VM goes; a cancel now waits for the rest
            await cancel_and_wait(helpers)
            for proc in login.browser_procs:  # (the VM takes them along; a stand-in guest would not)
                await proc.kill()
            if login.proc is not None:
                await login.proc.kill()
            if login.guest is not None:
                login.guest.close()
            if login.vm_id is not None:
                with contextlib.suppress(Exception):
                    await engine.destroy(login.vm_id)
            async with login.publishing:  # a hand-out under way publishes first, then this ends it
                sid = login.session_id  # (one that comes later sees `ending` and starts a login of its own)
            if sid is None:
                log.info("login_pool_entry_ended", provider=login.adapter.name, method=login.plan.method,
                         reason=status if status != "timeout" else "max age", error=error)
            else:
                await self.sessions.finish(sid, status, error)
                self._live.pop(sid, None)
                log.info("login_ended", session_id=str(sid), provider=login.adapter.name, status=status)

    async def _prepare(self, login: Login) -> None:
        assert login.guest is not None
        browser = login.browser
        opener = browser.hook_opener(login.env) if browser else None
        files: list[GuestFile] = [*hook_files(login.env, opener), *login.plan.command.files,
                                  *(browser.files(login.env, login.vnc_password, self.ca_pem) if browser else ()),
                                  *base_files(login.env, self.ca_pem)]
        await login.guest.put(*files)


__all__ = ["LoginFlow"]
