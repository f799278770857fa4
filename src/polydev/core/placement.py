"""Where a new VM goes: the live server with the most room for it, this one when it is as roomy as any.

A server's room for a VM is how many more VMs of that size it could still take: its capacity less what its
live VMs hold (counted from the `vms` rows, so it reads the same on every server), in the scarcer of vCPUs
and memory. So a bigger host takes more of the work, in proportion, and a host short of either resource is
passed over. A server that cannot fit the VM is never chosen; when none can, the caller keeps the request
and its own admission says the host is full.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from polydev.store.servers import Load


def room(load: Load, vcpus: int, memory_mb: int) -> int:
    """How many more VMs of this size the server could take (0 when not one fits)."""
    return max(0, min(load.free_vcpus // max(vcpus, 1), load.free_memory_mb // max(memory_mb, 1)))


def choose(loads: Sequence[Load], me: uuid.UUID, vcpus: int, memory_mb: int) -> Load | None:
    """The server for a VM of this size; None when no server can fit it."""
    fits = [x for x in loads if room(x, vcpus, memory_mb) > 0]
    if not fits:
        return None
    best = max(fits, key=lambda x: room(x, vcpus, memory_mb))
    mine = next((x for x in fits if x.server_id == me), None)
    return mine if mine is not None and room(mine, vcpus, memory_mb) >= room(best, vcpus, memory_mb) else best
