"""Pre-started logins (LOGIN_POOL): the login page without the wait for the CLI.

Under an emulated CPU a provider's CLI needs 10–70 s to print its sign-in URL, far longer than the VM
restore before it. So, per provider and login method, the pool keeps a few logins already driven to the
point where the URL is known (VM restored, login helper written, the CLI's login running, the login browser
up when there is one) and owned by nobody. A user who starts that login gets one of them: the session is
`awaiting_user_auth` with its URL at once, and from then on it is an ordinary login with the full
LOGIN_TIMEOUT_SECONDS.

Each pre-started login is its own CLI process with its own PKCE verifier and state, handed to exactly one
user and never reused. One that nobody took within LOGIN_POOL_MAX_AGE_SECONDS is ended (VM destroyed) and
replaced, so a user never gets a login the CLI or the provider has already given up on. The pool only holds
and replaces logins: starting and ending them is the login flow's (core/login_flow.py), handing one to a
user's session core/login_prestart.py's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import structlog

from polydev.core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

FAILURE_BACKOFF_S = 30.0  # a login that fails before its URL (broken image, bad setting) is not retried hot


class PooledLogin(Protocol):
    """What the pool needs of a login the flow started for nobody."""

    task: asyncio.Task[None] | None
    awaiting: asyncio.Event  # its URL is known
    claimed: bool  # handed to a session: the pool lets go of it


E = TypeVar("E", bound=PooledLogin)


class LoginPool(Generic[E]):
    def __init__(self, sizes: dict[tuple[str, str], int], prestart: Callable[[str, str], E | None]) -> None:
        self.sizes = {key: n for key, n in sizes.items() if n > 0}  # (provider, method) → logins kept
        self._prestart = prestart  # starts one login for nobody; None when no VM can run now
        self._entries: dict[tuple[str, str], list[E]] = {key: [] for key in self.sizes}
        self._changed = asyncio.Event()
        self._backoff_until: dict[tuple[str, str], float] = {}
        self._filler: asyncio.Task[None] | None = None

    def take(self, provider: str, method: str) -> E | None:
        """A pre-started login for this provider and method, the readiest first, or None. Synchronous on
        purpose: between the check and the hand-out nothing else runs, so no login goes to two users."""
        entries = [e for e in self._entries.get((provider, method), []) if _alive(e)]
        if not entries:
            return None
        entry = next((e for e in entries if e.awaiting.is_set()), entries[0])  # else the oldest: soonest
        entry.claimed = True
        self._entries[(provider, method)].remove(entry)
        self._changed.set()
        log.info("login_pool_hand_out", provider=provider, method=method, ready=entry.awaiting.is_set())
        return entry

    def counts(self) -> dict[str, dict[str, int]]:
        """Per `provider:method`: logins held and how many of them have their URL (for /health, metrics)."""
        return {f"{p}:{m}": {"held": sum(_alive(e) for e in self._entries[(p, m)]),
                             "ready": sum(_alive(e) and e.awaiting.is_set() for e in self._entries[(p, m)]),
                             "wanted": n}
                for (p, m), n in self.sizes.items()}

    def start(self) -> None:
        if self.sizes and self._filler is None:
            self._filler = asyncio.get_running_loop().create_task(self._fill_forever(), name="login-pool")

    async def close(self) -> None:
        """Stop refilling; the held logins themselves are ended by the flow (they are its tasks)."""
        if self._filler is not None:
            await cancel_and_wait([self._filler])
            self._filler = None

    async def _fill_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            wait: float | None = None
            for key, wanted in self.sizes.items():
                self._entries[key] = kept = [e for e in self._entries[key] if _alive(e)]
                until = self._backoff_until.get(key, 0.0)
                if until > loop.time():
                    wait = min(wait or FAILURE_BACKOFF_S, until - loop.time())
                    continue
                while len(kept) < wanted:
                    entry = self._prestart(*key)
                    if entry is None:  # no engine right now: look again later
                        wait = FAILURE_BACKOFF_S
                        break
                    assert entry.task is not None
                    entry.task.add_done_callback(functools.partial(self._ended, key, entry))
                    kept.append(entry)
            if wait is None:
                await self._changed.wait()
            else:
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass

    def _ended(self, key: tuple[str, str], entry: E, task: asyncio.Task[Any]) -> None:
        if not entry.claimed and not entry.awaiting.is_set() and not task.cancelled():
            # It ended before its URL: retrying at once would likely fail the same way.
            self._backoff_until[key] = asyncio.get_running_loop().time() + FAILURE_BACKOFF_S
            log.warning("login_pool_start_failed", provider=key[0], method=key[1], retry_in_s=FAILURE_BACKOFF_S)
        self._changed.set()


def _alive(entry: PooledLogin) -> bool:
    return not entry.claimed and entry.task is not None and not entry.task.done()
