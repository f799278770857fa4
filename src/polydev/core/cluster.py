"""This server among the others on one database: its registry entry, its heartbeat, and ending the work of
servers that are gone.

Every start registers a new server id (`servers` row) with its internal URL, its host's capacity and its
data directory's id (`instance`), then renews its heartbeat every SERVER_HEARTBEAT_SECONDS. The VMs,
logins and runs it creates carry that id. A server is gone when it stopped, when its heartbeat is older than
`DEAD_AFTER` intervals, or — for a new start — when it is an earlier start on the same data directory
(whose VMs the engine's reconcile has just killed). What a gone server hosted can never finish:
its logins and runs end failed with the reason in words, its VM rows are marked failed and their network
leases released. Exactly one live server does that for each gone one (`ServerRepo.claim_gone`); every live
server looks at each heartbeat, so a server killed outright is noticed within about `DEAD_AFTER + 1`
intervals by whichever peer looks first.

Peers call one another (polydev.api.peers) with the peer secret, derived from the master key all servers
share, so a server can tell a hop from a peer from a user's request.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from dataclasses import dataclass
from datetime import timedelta

import structlog

from polydev.core import login_flow, run_flow
from polydev.core.login_flow import LoginFlow
from polydev.core.placement import choose
from polydev.core.quotas import HostCapacity
from polydev.core.run_flow import RunFlow
from polydev.core.tasks import cancel_and_wait
from polydev.store.db import UNREACHABLE
from polydev.store.leases import LeaseRepo
from polydev.store.models import Server
from polydev.store.servers import Load, ServerRepo
from polydev.store.vms import VmRepo

log = structlog.get_logger(__name__)

DEAD_AFTER = 3  # heartbeat intervals without one before a server is taken for dead
PEER_HEADER = "x-polydev-peer"  # carries the peer secret on a hop between servers
SERVER_HEADER = "x-polydev-server"  # names the server that answered (for operators and the tests)


@dataclass(frozen=True)
class Reasons:
    """What the work of a gone server is told, in words."""

    login: str
    run: str
    vm: str

    @classmethod
    def restart(cls) -> Reasons:
        """For an earlier start of this very server: the words of a restart, which users already know."""
        return cls(login_flow.RESTARTED, run_flow.RESTARTED, "lost when the control plane stopped")

    @classmethod
    def of(cls, server: Server, me_before: bool) -> Reasons:
        if me_before:
            return cls.restart()
        what = "stopped" if server.stopped_at is not None else "stopped responding"
        return cls(f"the server driving this login ({server.url}) {what}; start a new session",
                   f"the server driving this run ({server.url}) {what}",
                   f"lost with its server ({server.url}), which {what}")


class Cluster:
    def __init__(self, servers: ServerRepo, *, server_id: uuid.UUID, url: str, instance: str,
                 capacity: HostCapacity, interval: float, peer_secret: bytes, login_flow: LoginFlow,
                 run_flow: RunFlow, vms: VmRepo, leases: LeaseRepo) -> None:
        self.servers = servers
        self.server_id = server_id
        self.url = url
        self.instance = instance
        self.capacity = capacity
        self.interval = interval
        self.peer_token = peer_secret.hex()
        self.login_flow = login_flow
        self.run_flow = run_flow
        self.vms = vms
        self.leases = leases
        self.runs_vms = False
        self._task: asyncio.Task[None] | None = None
        self._registered = False

    @property
    def registered(self) -> bool:
        """Whether this server is in the registry (started, not stopped): only then are there peers to ask."""
        return self._registered and self._task is not None

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.interval * DEAD_AFTER)

    def is_peer(self, token: str | None) -> bool:
        """Whether a request carries the peer secret (it comes from another server of this deployment)."""
        return bool(token) and hmac.compare_digest(token.encode(), self.peer_token.encode())  # type: ignore[union-attr]

    async def live_peers(self) -> set[uuid.UUID]:
        """Other servers alive now (fresh heartbeat, another data directory): the VM rows the engine's
        start-up reconcile must leave alone."""
        return {s.id for s in await self.servers.alive(self.stale_after)
                if s.id != self.server_id and s.instance != self.instance}

    async def start(self, runs_vms: bool) -> dict[str, int]:
        """Register, end what gone servers (and rows from before the registry) left, start the heartbeat."""
        self.runs_vms = runs_vms
        await self.servers.register(self.server_id, url=self.url, instance=self.instance,
                                    vcpus=self.capacity.vcpus, memory_mb=self.capacity.memory_mb,
                                    runs_vms=runs_vms)
        self._registered = True
        # Rows that name no server were written before the registry existed, by a server now stopped.
        ended = await self._end([None], Reasons.restart())
        for name, n in (await self.sweep()).items():
            ended[name] = ended.get(name, 0) + n
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="server-heartbeat")
        log.info("server_registered", server_id=str(self.server_id), url=self.url, runs_vms=runs_vms)
        return ended

    async def stop(self) -> None:
        """A clean stop: no more heartbeats, and the registry says stopped (no new work is sent here)."""
        task, self._task = self._task, None
        await cancel_and_wait([task])
        if self._registered:
            await self.servers.stop(self.server_id)

    async def sweep(self) -> dict[str, int]:
        """End the work of every gone server this one is first to claim."""
        ended = {"logins": 0, "runs": 0, "vms": 0}
        for server in await self.servers.gone(self.stale_after, instance=self.instance):
            if server.id == self.server_id or not await self.servers.claim_gone(
                    server.id, self.server_id, self.stale_after, instance=self.instance):
                continue
            counts = await self._end([server.id], Reasons.of(server, me_before=server.instance == self.instance))
            log.warning("server_gone", gone=str(server.id), url=server.url, **counts)
            for name, n in counts.items():
                ended[name] += n
        return ended

    async def _end(self, servers: list[uuid.UUID | None], reasons: Reasons) -> dict[str, int]:
        logins = await self.login_flow.reclaim(servers, reasons.login)
        runs = await self.run_flow.reclaim(servers, reasons.run)
        vms = 0
        for row in await self.vms.list(servers=servers):
            await self.vms.mark_failed(row.vm_id, reasons.vm)
            await self.leases.release(row.vm_id)
            vms += 1
        return {"logins": logins, "runs": runs, "vms": vms}

    async def loads(self) -> list[Load]:
        """Every live server that runs VMs, with what its VMs hold of its host's capacity."""
        return await self.servers.live_loads(self.stale_after)

    async def place(self, vcpus: int, memory_mb: int) -> Load | None:
        """The server a new VM of this size should go to, when it is another one (None: here). A server
        without a VM engine sends all such work to one that has one."""
        loads = await self.servers.live_loads(self.stale_after)
        best = choose(loads, self.server_id, vcpus, memory_mb)
        return None if best is None or best.server_id == self.server_id else best

    async def _beat(self) -> None:
        """Heartbeats, and a sweep after each. The sweep runs on its own, so a long one (ending a gone
        server's many sessions) never holds back this server's next heartbeat."""
        sweeping: asyncio.Task[object] | None = None
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    if not await self.servers.heartbeat(self.server_id) and await self.servers.rejoin(self.server_id):
                        # A peer took this server for dead (it missed heartbeats: a pause, the database away)
                        # and ended its work; what ended stays ended, new work may come here again.
                        log.error("server_taken_for_dead", server_id=str(self.server_id))
                except UNREACHABLE as exc:  # the database away for a moment (or its disk full): next beat
                    log.warning("server_heartbeat_failed", error_type=type(exc).__name__, error=str(exc)[:200])
                except Exception:
                    log.exception("server_heartbeat_failed")
                if sweeping is None or sweeping.done():
                    sweeping = asyncio.get_running_loop().create_task(self._sweep_logged(), name="server-sweep")
        finally:
            await cancel_and_wait([sweeping])

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except Exception:
            log.exception("server_sweep_failed")
