"""The warm pool's preparation of a VM for runs (the engine's `pool_prepare` hook, wired to the run flow).

With the warm pool on, the engine hands out VMs this has already been through: the files every run puts
first are there, and the agent has served each kind of request a run makes, so a run's first requests are
not the guest's first since its snapshot restore (slow under TCG, where every code path is translated
again after a restore). A run on such a VM puts only its own files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from polydev.core.guest import Guest, base_files
from polydev.providers import ADAPTERS
from polydev.providers.base import Command, GuestEnv, GuestFile

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.engine import VM

WARM_UP_INPUT = b"polydev warm-up\n"


def staged_files(guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None) -> list[GuestFile]:
    """What `prepare_vm` puts in every pooled VM: the base files that are the same whichever provider the
    VM will run (the guest paths come per provider; today the working directory and the CA are common)."""
    per_provider = [base_files(guest_env(name), ca_pem) for name in ADAPTERS]
    return [f for f in per_provider[0] if all(f in other for other in per_provider[1:])]


async def prepare_vm(vm: VM, client: AgentClient, guest_env: Callable[[str], GuestEnv],
                     ca_pem: bytes | None) -> None:
    """Stage the common files, then make one request of each kind a run makes (file PUT above, a streamed
    exec with stdin, a file GET), so that the agent's code paths are translated and warm before a run's
    requests arrive. Raises when the guest does not do them."""
    guest = Guest(client)
    staged = staged_files(guest_env, ca_pem)
    await guest.put(*staged)
    workdirs = {guest_env(name).workdir for name in ADAPTERS}
    cwd = workdirs.pop() if len(workdirs) == 1 else "/"
    proc = guest.start(Command(["/bin/sh", "-c", "cat"], {}, cwd, stdin=WARM_UP_INPUT), timeout_s=60)
    lines = [line async for line in proc.lines()]
    if proc.exit_code != 0 or lines != [WARM_UP_INPUT.decode().strip()]:
        raise RuntimeError(f"warm-up exec in VM {vm.id} exited {proc.exit_code} with {lines[:3]!r}")
    if staged and await guest.read(staged[-1].path) != (staged[-1].data, staged[-1].mode):
        raise RuntimeError(f"VM {vm.id} does not hold the staged {staged[-1].path}")
