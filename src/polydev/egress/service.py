"""The egress gateway as the server runs it: built from the settings, each user's route read from the store
(kept a few seconds, forgotten at once when an admin changes it: on every server, with Redis), the
accounting flushed to the database in batches, today's bytes read back at start so a restart resets no daily
limit, and with Redis the users' limits counted for all servers together."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from polydev.config import Settings
from polydev.egress.gateway import EgressGateway, Identity
from polydev.egress.limits import Limits
from polydev.egress.policy import WORKSPACE_PURPOSE, Policy, Refused
from polydev.egress.resolve import Resolver
from polydev.egress.route_changes import RouteChanges
from polydev.egress.routes import DirectRoute, Route, route_for
from polydev.egress.shared_limits import SharedLimitTracker
from polydev.store.egress import EgressRepo
from polydev.store.sessions import redis_client

log = structlog.get_logger(__name__)

FLUSH_EVERY_S = 5.0
ROUTE_CACHE_S = 5.0


def build_policy(settings: Settings, provider_hosts: Mapping[str, Mapping[str, tuple[str, ...]]]) -> Policy:
    """The allow-list: each provider's hosts per purpose (providers/catalog.toml), the git hosts for workspace
    VMs between turns (clone, push, the user's terminal), the operator's additions, and the purposes that may
    reach any public host (the login browser; sandboxes when allowed)."""
    allow = {(provider, purpose): tuple(hosts) for provider, by_purpose in provider_hosts.items()
             for purpose, hosts in by_purpose.items()}
    allow[("", WORKSPACE_PURPOSE)] = tuple(settings.workspace_git_hosts)
    open_purposes = {"login_browser"} | ({"sandbox"} if settings.egress_sandbox_open else set())
    return Policy(allow=allow, extra=settings.egress_allow, open_purposes=frozenset(open_purposes),
                  refused_networks=tuple(settings.egress_address_pool.networks()))


class UserRoutes:
    """The gateway's RouteSource: a user's egress identity from the store, as a route, with their limits."""

    def __init__(self, repo: EgressRepo, defaults: Limits, cache_s: float = ROUTE_CACHE_S) -> None:
        self.repo = repo
        self.defaults = defaults
        self.cache_s = cache_s
        self._cache: dict[uuid.UUID, tuple[float, Route, Limits]] = {}

    async def route(self, user_id: uuid.UUID | None) -> tuple[Route, Limits]:
        if user_id is None:  # a VM nobody owns yet (a pre-started login): the platform's own route
            return DirectRoute(), self.defaults
        hit = self._cache.get(user_id)
        if hit is not None and time.monotonic() - hit[0] < self.cache_s:
            return hit[1], hit[2]
        egress = await self.repo.get(user_id)
        limits = self.defaults.merged(egress.limits)
        try:
            if egress.mode == "proxy":
                url = await self.repo.proxy_url(user_id)
                route = route_for("proxy", proxy_url=url)
            else:
                route = route_for(egress.mode, address=egress.address)
        except ValueError as exc:  # e.g. a proxy URL that no longer parses: this user's path fails, alone
            raise Refused(f"this user's egress identity is unusable: {exc}", kind="upstream") from None
        self._cache[user_id] = (time.monotonic(), route, limits)
        return route, limits

    def forget(self, user_id: uuid.UUID) -> None:
        self._cache.pop(user_id, None)


class EngineHook:
    """The gateway as the VM engine's EgressHook: a VM is attached before it starts, owned by whoever the
    engine says and for no purpose yet (so it reaches nothing until its flow labels it)."""

    def __init__(self, gateway: EgressGateway) -> None:
        self.gateway = gateway

    async def attach(self, vm_id: uuid.UUID, user_id: uuid.UUID | None, *, listener: socket.socket | None = None,
                     peer: str | None = None) -> Path | None:
        return await self.gateway.attach(Identity(vm_id, user_id, "unassigned"), listener=listener, peer=peer)

    def update(self, vm_id: uuid.UUID, **fields: object) -> None:
        self.gateway.update(vm_id, **fields)

    async def detach(self, vm_id: uuid.UUID) -> None:
        await self.gateway.detach(vm_id)

    def last_refusal(self, vm_id: uuid.UUID, host: str | None = None) -> str | None:
        return self.gateway.last_refusal(vm_id, host)


class EgressService:
    def __init__(self, settings: Settings, repo: EgressRepo,
                 provider_hosts: Mapping[str, Mapping[str, tuple[str, ...]]], run_dir: Path, *,
                 guest_address: str | None = None) -> None:
        self.settings = settings
        self.guest_address = guest_address or settings.egress_guest_address  # the guests' proxy address
        self.repo = repo
        self.routes = UserRoutes(repo, Limits.from_settings(settings))
        self.gateway = EgressGateway(policy=build_policy(settings, provider_hosts),
                                     resolver=Resolver({k: tuple(v) for k, v in settings.egress_hosts.items()},
                                                       only_pinned=settings.egress_resolve == "pinned"),
                                     routes=self.routes, run_dir=run_dir)
        self.hook = EngineHook(self.gateway)
        self._flusher: asyncio.Task[None] | None = None
        # Several servers (Redis shared): a user's limits count on all of them at once, and an admin's change
        # to a user's identity reaches every server's route cache.
        self._redis: aioredis.Redis | None = None
        self.shared: SharedLimitTracker | None = None
        self.changes: RouteChanges | None = None
        if settings.redis_url is not None:
            self._redis = redis_client(settings.redis_url.get_secret_value())
            self.shared = self.gateway.limits = SharedLimitTracker(self._redis)
            self.changes = RouteChanges(self._redis, self.routes.forget)

    def forget(self, user_id: uuid.UUID) -> None:
        """`user_id`'s egress identity changed: their next tunnel, on any server, reads it again."""
        self.routes.forget(user_id)
        if self.changes is not None:
            self.changes.announce(user_id)

    async def start(self) -> None:
        if removed := self.gateway.remove_stale_sockets():
            log.info("egress_stale_sockets_removed", count=removed)
        for user, nbytes in (await self.repo.bytes_today()).items():
            await self.gateway.limits.seed_bytes(user, nbytes)
        if self.shared is not None:
            self.shared.start()
        if self.changes is not None:
            self.changes.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="egress-flush")

    async def flush(self) -> None:
        deltas = self.gateway.usage.drain()
        if deltas:
            await self.repo.record(deltas)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush()
            except Exception as exc:  # the database away for a moment: the next batch carries on
                log.warning("egress_flush_failed", error=str(exc))

    def describe(self) -> dict[str, object]:
        """For /health and `polydev doctor`."""
        s = self.settings
        return {"status": "on", "guest_address": self.guest_address, "attached_vms": self.gateway.attached(),
                "address_pool": s.egress_address_pool.describe() or None, "sandbox_open": s.egress_sandbox_open,
                "allow_extra": list(s.egress_allow)}

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.gateway.close()
        with contextlib.suppress(Exception):
            await self.flush()
        if self.changes is not None:
            await self.changes.close()
        if self.shared is not None:
            await self.shared.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
