"""What the login and run flows have in common: each runs a provider's CLI in a VM of its own."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import structlog

from polydev.core.errors import FlowUnavailable
from polydev.core.quotas import Hold
from polydev.providers.base import GuestEnv
from polydev.store.credentials import CredentialRepo

if TYPE_CHECKING:
    from polydev.core.ports import VmPort

log = structlog.get_logger(__name__)

EngineSource = Callable[[], "tuple[VmPort | None, str | None]"]  # the VM engine, or None and why there is none
# Admission (core/quotas.py): (user, what: login/run/vm, VM purpose: cli/browser) → raises when refused, else
# what it admitted, held until the rows that count it exist (Hold: the flow says when).
Admit = Callable[[uuid.UUID, Literal["login", "run", "vm"], str], Awaitable[Hold]]


async def admit_all(user_id: uuid.UUID, kind: Literal["login", "run", "vm"], purpose: str) -> Hold:
    """No quotas (a flow built without admission control)."""
    return Hold.nothing(user_id)


class VmFlow:
    def __init__(self, *, credentials: CredentialRepo, engine: EngineSource, guest_env: Callable[[str], GuestEnv],
                 ca_pem: bytes | None, admit: Admit = admit_all) -> None:
        self.credentials = credentials
        self.admit = admit  # before anything starts: QuotaExceeded / HostFull refuse the request
        self._engine = engine  # asked per login or run: the engine may start (or fail) after the flow is built
        self._guest_env = guest_env  # provider -> GuestEnv (API base URLs differ per provider)
        self.ca_pem = ca_pem  # the platform's extra CA, put in every guest (None: there is none)

    def _running_engine(self) -> VmPort:
        """The VM engine; FlowUnavailable, saying why, when this server runs none now."""
        engine, reason = self._engine()
        if engine is None:
            raise FlowUnavailable(reason or "this server runs no VMs")
        return engine


async def failure_reason(engine: VmPort, vm_id: uuid.UUID | None, error: str | None) -> str | None:
    """A failed login's or run's reason, from the host's side when it knows better than the CLI or the
    agent: the VM paused because the host's disk is full (the agent just stops answering), else the egress
    gateway's refusal (egress_error), else `error`. Asked before the VM is destroyed."""
    if vm_id is not None:
        try:
            stalled = await engine.stall_reason(vm_id)
        except Exception:  # noqa: BLE001 - no answer from the hypervisor is no evidence
            stalled = None
        if stalled is not None:
            log.warning("flow_failed_vm_paused", vm_id=str(vm_id), error=error, reason=stalled)
            return stalled
    return egress_error(engine, vm_id, error)


def egress_error(engine: VmPort, vm_id: uuid.UUID | None, error: str | None) -> str | None:
    """A failed login's or run's reason: the egress gateway's, in words, when it refused or could not reach a
    host for this VM (the CLI itself only says e.g. `getaddrinfo ETIMEOUT` or `403`); else `error`."""
    if error is not None and error.startswith("egress: "):  # the flow already knows which refusal it was
        return error
    refusal = engine.egress_refusal(vm_id) if vm_id is not None else None
    if refusal is None:
        return error
    log.info("flow_failed_at_egress", vm_id=str(vm_id), cli_error=error, egress=refusal)
    return f"egress: {refusal}"

