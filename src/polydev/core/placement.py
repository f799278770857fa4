"""Where a new VM goes: the live server with the most room for it, this one when it is as roomy as any.

Room is a server's capacity less what its live VMs hold (counted from the `vms` rows, so it is the same on
every server), as a share of that capacity, the scarcer of vCPUs and memory: hosts of different sizes
compare fairly. A server that cannot fit the VM is never chosen; when none can, the caller keeps the request
and its own admission says the host is full.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from polydev.store.servers import Load


def room(load: Load) -> float:
    """The share of its capacity a server has free: the scarcer of vCPUs and memory (0 for no capacity)."""
    if load.vcpus <= 0 or load.memory_mb <= 0:
        return 0.0
    return min(load.free_vcpus / load.vcpus, load.free_memory_mb / load.memory_mb)


def choose(loads: Sequence[Load], me: uuid.UUID, vcpus: int, memory_mb: int) -> Load | None:
    """The server for a VM of this size; None when no server can fit it."""
    fits = [x for x in loads if x.free_vcpus >= vcpus and x.free_memory_mb >= memory_mb]
    if not fits:
        return None
    best = max(fits, key=room)
    mine = next((x for x in fits if x.server_id == me), None)
    return mine if mine is not None and room(mine) >= room(best) else best
