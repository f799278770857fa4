"""What a user sends to a login driven by another replica: the pasted code (or callback URL), and cancel.

How requests reach the replica driving a login is core/relay.py's. For a login, the replica that gets the
request checks it, then leaves it in the session's live state: the code sealed by the vault (it is a
one-time secret: never stored in the clear, never in an API answer — the session's public fields are an
explicit list), a cancel as a flag. The driving replica takes it from there.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict
from typing import Any

import structlog

from polydev.core.relay import StoreRelay
from polydev.store.sessions import SessionStore
from polydev.store.vault import SealedRecord, Vault, VaultError

log = structlog.get_logger(__name__)

CODE_KEY, CANCEL_KEY = "_relay_code", "_relay_cancel"
POLL_S = 0.3


def _purpose(session_id: uuid.UUID) -> str:
    # Bound into the seal: a code relayed for one session cannot be replayed into another.
    return f"login-code:{session_id}"


class LoginRelay:
    def __init__(self, store: SessionStore, vault: Vault | None) -> None:
        self.store = store
        self.vault = vault
        self._relay: StoreRelay[uuid.UUID] = StoreRelay(store, name="login_relay", id_key="session_id",
                                                        poll_s=POLL_S)

    @property
    def shared(self) -> bool:
        """Whether other replicas see this store (only then can a login be driven elsewhere)."""
        return self._relay.shared and self.vault is not None

    async def send_code(self, user_id: uuid.UUID, session_id: uuid.UUID, code: str) -> None:
        assert self.vault is not None
        sealed = self.vault.seal(user_id, _purpose(session_id), code.encode())
        await self.store.update(str(session_id), {CODE_KEY: asdict(sealed)})

    async def send_cancel(self, session_id: uuid.UUID) -> None:
        await self.store.update(str(session_id), {CANCEL_KEY: True})

    def watch(self, live: Callable[[], Iterable[tuple[uuid.UUID, uuid.UUID]]],
              on_code: Callable[[uuid.UUID, str], Awaitable[None]],
              on_cancel: Callable[[uuid.UUID], Awaitable[object]]) -> None:
        """Keep taking relayed input for the (session id, user id) pairs `live` names, while there are any;
        started again by the next call once it has stopped."""
        if self.shared:
            self._relay.watch(live, lambda session_id, user_id: self._take(session_id, user_id, on_code,
                                                                           on_cancel))

    async def close(self) -> None:
        await self._relay.close()

    async def _take(self, session_id: uuid.UUID, user_id: uuid.UUID,
                    on_code: Callable[[uuid.UUID, str], Awaitable[None]],
                    on_cancel: Callable[[uuid.UUID], Awaitable[object]]) -> None:
        state: dict[str, Any] | None = await self.store.get(str(session_id))
        if not state:
            return
        if state.get(CANCEL_KEY):
            await self.store.update(str(session_id), {CANCEL_KEY: None})
            log.info("login_relay_cancel", session_id=str(session_id))
            await on_cancel(session_id)
            return
        sealed = state.get(CODE_KEY)
        if sealed:
            await self.store.update(str(session_id), {CODE_KEY: None})  # used once, whatever happens next
            assert self.vault is not None
            try:
                code = self.vault.open(user_id, _purpose(session_id), SealedRecord(**sealed)).decode()
            except (VaultError, TypeError, UnicodeDecodeError):
                log.warning("login_relay_bad_code_record", session_id=str(session_id))
                return
            log.info("login_relay_code", session_id=str(session_id))  # (never the code)
            await on_code(session_id, code)
