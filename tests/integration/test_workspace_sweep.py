"""The workspaces' idle sweep against the store, with a VM port that records what it is asked (no VMs): an idle
workspace is paused, with its memory while the user is under WORKSPACE_PAUSED_PER_USER and its disk only past
it; one with a terminal open is kept and its VM's lifetime pushed out; one whose VM another server runs is
left to that server."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from polydev.core.workspace_models import Limits
from polydev.core.workspaces import Workspaces
from polydev.services import Services
from polydev.store.models import Workspace, utcnow
from polydev.store.workspaces import WorkspaceRepo
from polydev.vm.types import VM


class RecordingPort:
    def __init__(self, elsewhere: set[uuid.UUID]) -> None:
        self.elsewhere = elsewhere
        self.calls: list[tuple[str, uuid.UUID, Any]] = []

    async def get(self, vm_id: uuid.UUID) -> VM:
        return VM(id=vm_id, user_id=None, purpose="cli", status="running", backend="fake", agent_url=None,
                  created_at=datetime.now(timezone.utc), expires_at=None, slot_index=None, error=None)

    def runs_here(self, vm_id: uuid.UUID) -> bool:
        return vm_id not in self.elsewhere

    async def assign(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, ttl: timedelta) -> None:
        self.calls.append(("assign", vm_id, ttl))

    async def hibernate(self, vm_id: uuid.UUID, memory: bool = True) -> str:
        self.calls.append(("hibernate", vm_id, memory))
        return "agent-token"

    def agent(self, vm_id: uuid.UUID, timeout: float = 60.0) -> Any:
        raise KeyError(vm_id)  # the size measured before a pause is a courtesy: skipped


async def test_the_sweep_pauses_idle_workspaces_and_keeps_those_in_use(services: Services) -> None:
    repo = WorkspaceRepo(services.factory)
    user = await services.users.create("sweeper")
    long_ago = utcnow() - timedelta(hours=2)
    rows = {}
    for name in ("first", "second", "terminal", "elsewhere"):
        rows[name] = Workspace(id=uuid.uuid4(), user_id=user.id, name=name, source="empty", state="ready",
                               vm_id=uuid.uuid4(), used_at=long_ago)
        await repo.add(rows[name])
    port = RecordingPort(elsewhere={rows["elsewhere"].vm_id})  # type: ignore[arg-type]

    async def admit(*_: Any) -> Any:
        raise AssertionError("the sweep makes no VM")

    workspaces = Workspaces(repo, services.vault, lambda: (port, None), admit=admit,  # type: ignore[arg-type]
                            limits=Limits(paused=1), idle_pause_s=600)
    workspaces._terminals[rows["terminal"].id] = 1  # a terminal is open on it

    assert await workspaces.sweep() == 2
    hibernated = {vm_id: memory for kind, vm_id, memory in port.calls if kind == "hibernate"}
    assert set(hibernated) == {rows["first"].vm_id, rows["second"].vm_id}
    assert sorted(hibernated.values()) == [False, True]  # one with its memory (the limit is 1), one without
    assert ("assign", rows["terminal"].vm_id, workspaces._vm_ttl) in port.calls
    states = {name: (await repo.get(row.id)) for name, row in rows.items()}
    assert {n: s.state for n, s in states.items() if s} == {"first": "paused", "second": "paused",
                                                            "terminal": "ready", "elsewhere": "ready"}
    assert states["terminal"].used_at > long_ago  # type: ignore[union-attr]
    assert await repo.paused_with_memory(user.id) == 1
    assert all(s.sealed_agent and "agent-token" not in s.sealed_agent  # type: ignore[union-attr]
               for n, s in states.items() if n in ("first", "second"))
