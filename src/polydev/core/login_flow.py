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
from polydev.core.login_pool import LoginPool
from polydev.core.login_relay import LoginRelay
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
from polydev.store.models import AUTH_SESSION_TERMINAL
from polydev.store.vault import Vault

log = structlog.get_logger(__name__)

# Fetches a localhost URL inside the guest (the page the provider redirected the user's browser to), and
# follows the CLI's own redirects to its /success page (Codex exits only after that page was loaded).
_FETCH = ("import sys, urllib.request\n"
          "r = urllib.request.urlopen(sys.argv[1], timeout=30)\n"
          "print(r.status)\n")
RELAY_CANCEL_WAIT_S = 10.0  # how long a cancel waits for the replica driving the login to end it
_NOT_WAITING = "the login is not waiting for the user yet; try again when its status is awaiting_user_auth"
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


@dataclass(eq=False)  # identity: kept in sets while pre-started
class _Login:
    session_id: uuid.UUID | None  # None while it is a pre-started login nobody has taken (core/login_pool.py)
    user_id: uuid.UUID | None
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
    vm_id: uuid.UUID | None = None
    # Pre-started logins: what the session will show once a user takes it, the deadline moved then, and the
    # lock that keeps the hand-out's publication and the login's own updates in order.
    claimed: bool = False
    unpublished: dict[str, Any] = field(default_factory=dict)
    deadline: asyncio.Timeout | None = None
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)


class LoginFlow:
    def __init__(self, *, sessions: LoginSessions, credentials: CredentialRepo,
                 engine: Callable[[], Any], guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None = None,
                 timeout: float = 300.0, vm_purpose: str = "cli",
                 browser: Callable[[], LoginBrowser | None] = lambda: None,
                 pool: dict[tuple[str, str | None], int] | None = None, pool_max_age: float = 300.0,
                 vault: Vault | None = None) -> None:
        self.sessions = sessions
        self.credentials = credentials
        self._engine = engine  # () -> (VMEngine | None, reason when None)
        self._guest_env = guest_env  # provider -> GuestEnv (API base URLs differ per provider)
        self.ca_pem = ca_pem
        self.timeout = timeout
        self.vm_purpose = vm_purpose
        self._browser = browser  # asked per login: whether the engine's image can run the login browser
        self._live: dict[uuid.UUID, _Login] = {}
        self.pool_max_age = pool_max_age
        self.pool = LoginPool({}, self._prestart)
        self.set_pool(pool or {})
        self._pooled: set[_Login] = set()  # pre-started logins, taken or not, until their task ends
        self.relay = LoginRelay(sessions.store, vault)  # input for logins driven by another replica

    def set_pool(self, pool: dict[tuple[str, str | None], int]) -> None:
        """How many pre-started logins to keep per (provider, method or None for its default); takes effect
        at start_pool. Call it while no pool runs."""
        sizes: dict[tuple[str, str], int] = {}
        for (provider, method), n in pool.items():
            adapter = get_adapter(provider)  # KeyError: unknown provider
            method = method or adapter.login_methods[0]
            if method not in adapter.login_methods:
                raise ValueError(f"LOGIN_POOL: {provider} has no login method {method!r}")
            sizes[(provider, method)] = n
        self.pool = LoginPool(sizes, self._prestart)

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
        pooled = self.pool.take(provider, method)
        if pooled is not None:
            adopted = await self._adopt(pooled, uuid.UUID(live["session_id"]), user_id, engine)  # type: ignore[arg-type]
            if adopted is not None:
                return adopted
        live = await self.sessions.update(uuid.UUID(live["session_id"]), accepts_code=plan.accepts_code) or live
        login = _Login(uuid.UUID(live["session_id"]), user_id, adapter, plan, env, browser=self._browser())
        self._live[login.session_id] = login
        self.relay.watch(self._relay_sessions, self._relayed_code, self._cancel_here)
        login.task = asyncio.create_task(self._drive(login, engine), name=f"login-{login.session_id}")
        log.info("login_started", session_id=str(login.session_id), provider=provider, method=method)
        return live

    def start_pool(self) -> None:
        """Keep LOGIN_POOL's pre-started logins (call once the engine runs)."""
        self.pool.start()

    def _prestart(self, provider: str, method: str) -> _Login | None:
        """One login driven, for nobody, up to its URL; it waits there for a user (or its max age)."""
        engine, _ = self._engine()
        if engine is None:
            return None
        adapter = get_adapter(provider)
        env = self._guest_env(provider)
        login = _Login(None, None, adapter, adapter.login_plan(method, env), env,  # type: ignore[arg-type]
                       browser=self._browser())
        self._pooled.add(login)
        login.task = asyncio.create_task(self._drive(login, engine), name=f"login-pool-{provider}-{method}")
        login.task.add_done_callback(lambda _t: self._pooled.discard(login))
        return login

    async def _adopt(self, login: _Login, sid: uuid.UUID, user_id: uuid.UUID,
                     engine: Any) -> dict[str, Any] | None:
        """Give a pre-started login to this user's new session: it shows what the login has reached, the VM
        is theirs, the full login timeout runs from now. None if the login ended in the meantime."""
        async with login.publishing:
            if login.ended.is_set():
                return None
            login.session_id, login.user_id = sid, user_id
            self._live[sid] = login
            self.relay.watch(self._relay_sessions, self._relayed_code, self._cancel_here)
            if login.deadline is not None:
                login.deadline.reschedule(asyncio.get_running_loop().time() + self.timeout)
            if login.vm_id is not None:
                with contextlib.suppress(KeyError):
                    await engine.assign(login.vm_id, user_id, self._vm_ttl(self.timeout))
            changes = {"accepts_code": login.plan.accepts_code, **login.unpublished}
            if login.vnc is not None:
                changes["vnc_url"] = self._vnc_url(sid)
            live = await self.sessions.update(sid, **changes)
        log.info("login_started", session_id=str(sid), provider=login.adapter.name, method=login.plan.method,
                 pre_started=True)
        return live

    async def _publish(self, login: _Login, **changes: Any) -> None:
        """Session progress; kept for the session a user will get while the login is pre-started."""
        async with login.publishing:
            if login.session_id is None:
                login.unpublished.update(changes)
            else:
                await self.sessions.update(login.session_id, **changes)

    @staticmethod
    def _vnc_url(session_id: uuid.UUID) -> str:
        return f"/api/auth/sessions/{session_id}/vnc"

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
                raise SessionNotLive(_NOT_WAITING)
            adapter = get_adapter(state["provider"])
            plan = adapter.login_plan(state.get("method") or adapter.login_methods[0],  # type: ignore[arg-type]
                                      self._guest_env(adapter.name))
            _check_input(code, adapter, plan, state.get("auth_url"))
            await self.relay.send_code(user_id, session_id, code)
            return
        if not login.awaiting.is_set() or login.guest is None or login.proc is None:
            raise SessionNotLive(_NOT_WAITING)
        await self._deliver(login, code)

    async def _relayed_code(self, session_id: uuid.UUID, code: str) -> None:
        login = self._live.get(session_id)
        if login is None or login.guest is None or login.proc is None:
            return
        try:
            await self._deliver(login, code)
        except Exception as exc:  # nobody waits for an answer here: the session's status tells the user
            log.warning("login_relayed_code_failed", session_id=str(session_id), reason=type(exc).__name__)

    async def _cancel_here(self, session_id: uuid.UUID) -> bool:
        """Cancel a login this process drives (asked here or relayed); False if it drives none by that id."""
        login = self._live.get(session_id)
        if login is None or login.task is None or login.task.done():
            return False
        login.cancelled_by_user = True
        await cancel_and_wait([login.task])
        return True

    def _relay_sessions(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        return [(sid, x.user_id) for sid, x in self._live.items() if x.user_id is not None]

    async def _deliver(self, login: _Login, code: str) -> None:
        assert login.guest is not None and login.proc is not None
        kind = _check_input(code, login.adapter, login.plan, login.auth_url)
        if kind == "url":
            try:
                status = await login.guest.run(["python3", "-c", _FETCH, code], timeout_s=60)
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
        if await self._cancel_here(session_id):
            pass
        elif state["status"] not in AUTH_SESSION_TERMINAL:
            if self.relay.shared:  # driven by another replica, which ends it (VM and all) when it sees this
                await self.relay.send_cancel(session_id)
                deadline = asyncio.get_running_loop().time() + RELAY_CANCEL_WAIT_S
                while asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.2)
                    state = await self.sessions.read(user_id, session_id)
                    if state["status"] in AUTH_SESSION_TERMINAL:
                        return state
            # Nobody drives it (the process that did has stopped): nothing runs for it any more.
            await self.sessions.finish(session_id, "cancelled", "cancelled by the user")
        return await self.sessions.read(user_id, session_id)

    async def stop_pool(self) -> None:
        """Stop keeping pre-started logins and end those nobody has taken (their VMs are destroyed)."""
        await self.pool.close()
        await cancel_and_wait([x.task for x in list(self._pooled) if x.session_id is None])

    async def close(self) -> None:
        """Server shutdown: end every login this process drives (their VMs go with the engine)."""
        await self.stop_pool()
        await cancel_and_wait([x.task for x in self._live.values()])
        await self.relay.close()

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
        """The whole login. A pre-started one (no session yet) runs the same way: it waits for its user at
        `awaiting_user_auth`, or ends at its max age; _adopt moves its deadline when a user takes it."""
        pre_started = login.session_id is None
        status, error = "failed", "login failed"
        helpers: list[asyncio.Task[None]] = []
        limit = self.pool_max_age if pre_started else self.timeout
        # The VM's expiry and the processes' own limits cover a pre-started login's wait plus its user's time.
        budget = limit + (self.timeout if pre_started else 0)
        try:
            async with asyncio.timeout(limit) as login.deadline:
                purpose = "browser" if login.browser is not None else self.vm_purpose
                vm = await engine.create(login.user_id, purpose, ttl=self._vm_ttl(budget))
                async with login.publishing:
                    login.vm_id = vm.id
                    if login.user_id is not None and vm.user_id != login.user_id:  # taken while it started
                        await engine.assign(vm.id, login.user_id, self._vm_ttl(self.timeout))
                await self._publish(login, status="vm_created", vm_id=str(vm.id))
                login.guest = Guest(engine.agent(vm.id, timeout=budget + 60))
                await self._prepare(login)
                if login.browser is not None:
                    helpers = self._start_browser(login, engine, vm.id, budget)
                login.proc = login.guest.start(login.plan.command, timeout_s=budget + 30)
                await self._publish(login, status="ready")
                await self._until_logged_in(login)
                bundle = await self._capture(login)
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
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("login_failed", session_id=str(login.session_id), error=error)
        finally:
            login.ended.set()  # VNC bridges close before the VM goes
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
                sid = login.session_id  # (one that comes later sees `ended` and starts a login of its own)
            if sid is None:
                log.info("login_pool_entry_ended", provider=login.adapter.name, method=login.plan.method,
                         reason=status if status != "timeout" else "max age", error=error)
            else:
                await self.sessions.finish(sid, status, error)
                self._live.pop(sid, None)
                log.info("login_ended", session_id=str(sid), provider=login.adapter.name, status=status)

    @staticmethod
    def _vm_ttl(seconds: float) -> Any:
        from datetime import timedelta

        return timedelta(seconds=seconds + 120)  # the reaper's backstop, should this task die

    async def _prepare(self, login: _Login) -> None:
        assert login.guest is not None
        browser = login.browser
        opener = browser.hook_opener(login.env) if browser else None
        files: list[GuestFile] = [*hook_files(login.env, opener), *login.plan.command.files,
                                  *(browser.files(login.env, self.ca_pem) if browser else ()),
                                  *base_files(login.env, self.ca_pem)]
        await login.guest.put(*files)

    def _start_browser(self, login: _Login, engine: Any, vm_id: uuid.UUID,
                       budget: float) -> list[asyncio.Task[None]]:
        """Xtigervnc now, next to the CLI; Chromium as soon as its display answers (it exits at once without
        an X server) and before the URL is known (it is slow to start on an emulated CPU). Returns the helper
        tasks, cancelled when the session ends; the processes die with the VM."""
        assert login.guest is not None and login.browser is not None
        server = login.guest.start(login.browser.vnc_server(login.env), timeout_s=budget + 30)
        login.browser_procs.append(server)
        return [asyncio.create_task(self._drain(server)),
                asyncio.create_task(self._browser_up(login, engine, vm_id, budget))]

    @staticmethod
    async def _drain(proc: GuestProcess) -> None:
        # Their output is noise (Chromium's D-Bus complaints); read it so it does not pile up in memory.
        with contextlib.suppress(Exception):
            async for _ in proc.events():
                pass

    async def _browser_up(self, login: _Login, engine: Any, vm_id: uuid.UUID, budget: float) -> None:
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
        chromium = login.guest.start(login.browser.idle_browser(login.env), timeout_s=budget + 30)
        login.browser_procs.append(chromium)
        async with login.publishing:  # a pre-started login's hand-out publishes vnc_url itself from here on
            login.vnc = address
            if login.session_id is not None:
                await self.sessions.update(login.session_id, vnc_url=self._vnc_url(login.session_id))
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
        await self._publish(login, status="awaiting_user_auth", auth_url=url, **extra)
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

    async def _owned_live(self, user_id: uuid.UUID, session_id: uuid.UUID) -> _Login:
        state = await self.sessions.read(user_id, session_id)  # SessionNotFound / SessionExpired for others
        login = self._live.get(session_id)
        if login is None or login.user_id != user_id:
            if state["status"] not in AUTH_SESSION_TERMINAL:
                raise SessionNotLive("this login runs on another server of this deployment; its browser view "
                                     "is served only there (route a session's requests to one server)")
            raise SessionNotLive(f"the login session is {state['status']}; start a new session")
        return login


def _check_input(code: str, adapter: ProviderAdapter, plan: LoginPlan, auth_url: str | None) -> str:
    """What the user pasted, checked before it goes near the VM: "url" for the CLI's own localhost callback
    (same port as the redirect_uri it asked the provider for, http), "code" for a code the CLI reads."""
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


__all__ = ["CodeRejected", "FlowUnavailable", "LoginError", "LoginFlow", "SessionNotFound", "SessionNotLive"]
