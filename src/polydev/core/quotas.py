"""Per-user quotas and the host's admission control: a login, run or VM that cannot be served now is refused
before anything starts (no session, run or VM row, no process), saying which limit was hit and when to
retry.

Each user has limits on live VMs, logins and runs not yet ended, and the vCPUs and memory their live VMs
hold (QUOTA_* settings, overridden per user by admins). The host admits a VM only while the vCPUs and
memory of all live VMs stay within its capacity: HOST_VCPUS and HOST_MEMORY_MB, by default read off the
machine (its CPUs × HOST_VCPU_OVERCOMMIT, its memory less HOST_RESERVED_MEMORY_MB), and while its data
directory keeps HOST_MIN_FREE_DISK_MB free (the VMs' disks grow into it). With several servers on one
database each host's capacity is its own: only the VMs its server hosts count against it.

Use is counted from the database, so the limits hold across restarts and replicas. What a request was
admitted for is held (`Hold`) until the rows that count it exist (its login or run row, then its VM's row),
so requests arriving together on one server cannot all pass on the same free room; two servers admitting at
the same instant may still both pass (the engine's own slot pool still bounds tap-mode VMs).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Protocol

from polydev.config import Settings
from polydev.store.quotas import Usage

LIMITS = ("vms", "logins", "runs", "vcpus", "memory_mb")
WHAT = {"vms": "live VMs", "logins": "logins in progress", "runs": "runs in progress", "vcpus": "vCPUs",
        "memory_mb": "MiB of VM memory", "disk_mb": "MiB of disk"}
# What a client should wait before trying again: a login or run usually ends within minutes.
RETRY_AFTER_S = 60
# How long a hold is kept after its VM's row was written: longer than any check's read takes.
ROW_SEEN_S = 30.0

Kind = Literal["login", "run", "vm"]


@dataclass(frozen=True)
class Quota:
    vms: int
    logins: int
    runs: int
    vcpus: int
    memory_mb: int

    @classmethod
    def from_settings(cls, s: Settings) -> Quota:
        return cls(s.quota_vms, s.quota_logins, s.quota_runs, s.quota_vcpus, s.quota_memory_mb)

    def merged(self, overrides: dict[str, int] | None) -> Quota:
        return replace(self, **{k: int(v) for k, v in (overrides or {}).items() if k in LIMITS})


@dataclass(frozen=True)
class HostCapacity:
    vcpus: int
    memory_mb: int

    @classmethod
    def from_settings(cls, s: Settings) -> HostCapacity:
        vcpus = s.host_vcpus or int((os.cpu_count() or 1) * s.host_vcpu_overcommit)
        memory = s.host_memory_mb or max(0, _machine_memory_mb() - s.host_reserved_memory_mb)
        return cls(vcpus, memory)


def _machine_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 0


def check_overrides(limits: dict[str, object]) -> dict[str, int]:
    """An admin's overrides, checked: known names, whole numbers ≥ 0. ValueError says what is wrong."""
    out: dict[str, int] = {}
    for name, value in limits.items():
        if name not in LIMITS:
            raise ValueError(f"unknown quota {name!r}; quotas are {', '.join(LIMITS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"quota {name} must be a whole number ≥ 0, not {value!r}")
        out[name] = value
    return out


class QuotaExceeded(Exception):
    """A user's own limit: answered 429 with Retry-After."""

    def __init__(self, limit: str, used: int, allowed: int) -> None:
        self.limit, self.used, self.allowed, self.retry_after = limit, used, allowed, RETRY_AFTER_S
        super().__init__(f"quota {limit}: {used} of {allowed} {WHAT[limit]} in use; end one, or try again later "
                         f"(an admin can raise your quota)")


class HostFull(Exception):
    """The host's capacity: answered 503 with Retry-After."""

    def __init__(self, resource: str, used: int, needed: int, capacity: int, message: str | None = None) -> None:
        self.limit, self.used, self.allowed, self.retry_after = resource, used, capacity, RETRY_AFTER_S
        super().__init__(message or f"the host is full: {used} of {capacity} {WHAT[resource]} in use, {needed} "
                         "more needed; try again later")


class Hold:
    """What an admitted login, run or VM will take, counted by the admission that made it until the rows that
    count it exist: `counted(kind)` once its login or run row is written, `at_row(vm_id)` once its VM's row is
    (the engine's `on_row`), `release()` once its work is over (its VM failed, or ended). All are idempotent.

    A check whose database read began before a VM's row was written may not see that row, though the row
    exists by the time the check adds up: so a hold that reached its row stays in the book, with the VM's id,
    for ROW_SEEN_S more, and is counted by a check that began before the row and did not read that VM."""

    def __init__(self, user_id: uuid.UUID, wanted: dict[str, int], book: list[Hold] | None = None) -> None:
        self.user_id, self.wanted, self._book = user_id, wanted, book
        self.vm_id: uuid.UUID | None = None
        self.row_at: float | None = None  # (monotonic) when its VM's row was written

    @classmethod
    def nothing(cls, user_id: uuid.UUID) -> Hold:
        """A hold on nothing (no admission control)."""
        return cls(user_id, {})

    def counted(self, name: str) -> None:
        self.wanted[name] = 0

    def at_row(self, vm_id: uuid.UUID) -> None:
        if self.row_at is None:
            self.vm_id, self.row_at = vm_id, time.monotonic()

    def release(self) -> None:
        """Its work is over (its VM failed to start, or has ended): nothing is held any more."""
        if self._book is not None and self in self._book:
            self._book.remove(self)

    def counts(self, seen: frozenset[uuid.UUID], began: float) -> bool:
        """Whether a check that began at `began` (monotonic) and read the live VMs `seen` must count this hold."""
        return self.row_at is None or self.row_at > began and self.vm_id not in seen


class FreeSpace(Protocol):
    """The data directory's free space (polydev.vm.disk_space.DiskSpace)."""

    min_free_mb: int

    def free_mb(self) -> int: ...

    def total_mb(self) -> int: ...


class UsageSource(Protocol):
    async def usage(self, user_id: uuid.UUID | None = None, server_id: uuid.UUID | None = None) -> Usage: ...

    async def overrides(self, user_id: uuid.UUID) -> dict[str, int] | None: ...

    async def set_overrides(self, user_id: uuid.UUID, limits: dict[str, int]) -> bool: ...


class Admission:
    def __init__(self, repo: UsageSource, defaults: Quota, host: HostCapacity,
                 server_id: uuid.UUID | None = None, disk: FreeSpace | None = None) -> None:
        self.repo = repo
        self.defaults = defaults
        self.host = host
        self.disk = disk
        self._held: list[Hold] = []  # admitted here, not yet (all) in the rows that count them
        self.server_id = server_id  # the host's use is this server's VMs (None: every VM, one server alone)

    async def quota(self, user_id: uuid.UUID) -> Quota:
        return self.defaults.merged(await self.repo.overrides(user_id))

    async def check(self, user_id: uuid.UUID, kind: Kind, vcpus: int, memory_mb: int) -> Hold:
        """QuotaExceeded or HostFull when a new `kind` with a VM of this size cannot be admitted now; else
        what it was admitted for, held until its rows count it (see Hold)."""
        began = time.monotonic()
        quota, used = await self.quota(user_id), await self.repo.usage(user_id)
        total = await self.repo.usage(None, self.server_id)
        now = time.monotonic()  # holds past their time after their row: every read since sees that row
        self._held[:] = [h for h in self._held if h.row_at is None or now - h.row_at < ROW_SEEN_S]
        # From here to the hold's booking nothing awaits: another request's check sees this one's hold.
        wanted = {"vms": 1, "logins": int(kind == "login"), "runs": int(kind == "run"), "vcpus": vcpus,
                  "memory_mb": memory_mb}
        for name in LIMITS:
            have, limit = getattr(used, name) + self._holding(name, used.vm_ids, began, user_id), getattr(quota, name)
            if wanted[name] and have + wanted[name] > limit:
                raise QuotaExceeded(name, have, limit)
        for name in ("vcpus", "memory_mb"):
            have, cap = getattr(total, name) + self._holding(name, total.vm_ids, began), getattr(self.host, name)
            if have + wanted[name] > cap:
                raise HostFull(name, have, wanted[name], cap)
        self._check_disk()
        hold = Hold(user_id, wanted, self._held)
        self._held.append(hold)
        return hold

    def _holding(self, name: str, seen: frozenset[uuid.UUID], began: float, user_id: uuid.UUID | None = None) -> int:
        return sum(h.wanted.get(name, 0) for h in self._held
                   if (user_id is None or h.user_id == user_id) and h.counts(seen, began))

    def _check_disk(self) -> None:
        if self.disk is None or not self.disk.min_free_mb:
            return
        free, total, keep = self.disk.free_mb(), self.disk.total_mb(), self.disk.min_free_mb
        if free < keep:  # used of allowed: of the file system less what it keeps free for disks to grow
            raise HostFull("disk_mb", total - free, keep, total - keep,
                           f"the host is out of disk space: {total - free} MiB of its data directory's "
                           f"{total - keep} MiB in use ({keep} MiB are kept free for VMs' disks to grow into); "
                           "try again later")

    async def report(self, user_id: uuid.UUID) -> dict[str, object] | None:
        """A user's limits (their own overrides marked), and their use against each; None for no such user."""
        overrides = await self.repo.overrides(user_id)
        if overrides is None:
            return None
        used = await self.repo.usage(user_id)
        return {"limits": asdict(self.defaults.merged(overrides)), "overrides": overrides,
                "usage": {name: getattr(used, name) for name in LIMITS}}

    async def set_overrides(self, user_id: uuid.UUID, limits: dict[str, int]) -> bool:
        """Replace a user's own limits (checked with `check_overrides`); False for no such user."""
        return await self.repo.set_overrides(user_id, limits)

    async def host_report(self) -> dict[str, dict[str, int]]:
        """The host's capacity and what the live VMs it hosts hold of it (for /metrics and the admin page)."""
        total = await self.repo.usage(None, self.server_id)
        report = {f.name: {"used": getattr(total, f.name), "capacity": getattr(self.host, f.name)}
                  for f in fields(self.host)}
        if self.disk is not None:  # the data directory's file system, whoever else fills it
            size = self.disk.total_mb()
            report["disk_mb"] = {"used": size - self.disk.free_mb(), "capacity": size}
        return report
