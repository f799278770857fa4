"""The gateway process part: one listener per VM, so a connection's VM is known from where it arrived, never
from anything the guest says.

In `user` network mode each VM's QEMU forwards the guest's proxy address (guestfwd) to that VM's own Unix
socket here (`attach` returns its path before the VM starts; restored VMs take it from their command line).
In `tap` mode the VM's slot DNATs the proxy address to a TCP listener at the host end of the slot's veth,
which the VM layer makes and hands over (`attach(..., listener=, peer=)`); the slot's firewall lets only its
own guest reach it, and a connection from any address but the slot's (the guest masqueraded behind it) is
refused. A connection on a socket whose VM was detached finds no listener: the VM is gone. The
identity of a VM (its user, purpose, provider) can change while it lives — a pooled VM handed out — and is
read per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from polydev.egress.connect import BadRequest, answer, read_connect
from polydev.egress.limits import LimitBook, Limits, LimitTracker
from polydev.egress.policy import Policy, Refused
from polydev.egress.relay import relay
from polydev.egress.resolve import Resolver
from polydev.egress.routes import Route, Streams
from polydev.egress.usage import UsageBook

log = structlog.get_logger(__name__)

MAX_REFUSALS_KEPT = 64  # hosts per VM whose last refusal is kept (a browser may try many)
_STATUS = {"policy": 403, "identity": 403, "limit": 429, "dns": 502, "upstream": 502}


@dataclass(frozen=True)
class Identity:
    """Whose a VM's connections are. `purpose`: login, run or sandbox; `browser`: a login VM whose in-VM
    browser shows the provider's sign-in pages (any public host on 80/443)."""

    vm_id: uuid.UUID
    user_id: uuid.UUID | None
    purpose: str
    provider: str | None = None
    browser: bool = False

    @property
    def policy_purpose(self) -> str:
        return "login_browser" if self.purpose == "login" and self.browser else self.purpose


class RouteSource(Protocol):
    async def route(self, user_id: uuid.UUID | None) -> tuple[Route, Limits]:
        """The user's egress route and limits; Refused (kind upstream) when their identity is unusable."""
        ...


class EgressGateway:
    def __init__(self, *, policy: Policy, resolver: Resolver, routes: RouteSource, run_dir: Path,
                 limits: LimitBook | None = None, usage: UsageBook | None = None) -> None:
        self.policy = policy
        self.resolver = resolver
        self.routes = routes
        self.run_dir = run_dir
        self.limits: LimitBook = limits or LimitTracker()
        self.usage = usage or UsageBook()
        self._vms: dict[uuid.UUID, Identity] = {}
        self._servers: dict[uuid.UUID, asyncio.AbstractServer] = {}
        self._tunnels: dict[uuid.UUID, set[asyncio.Task[Any]]] = {}
        self._refusals: dict[uuid.UUID, dict[str, str]] = {}  # per VM: host → last reason, latest last

    def socket_path(self, vm_id: uuid.UUID) -> Path:
        return self.run_dir / f"{vm_id}.sock"

    async def attach(self, identity: Identity, *, listener: socket.socket | None = None,
                     peer: str | None = None) -> Path | None:
        """Listen for `identity`'s VM. Without `listener`: on a Unix socket of its own, whose path is returned
        (what its QEMU forwards the proxy address to). With one (tap mode): on that listening TCP socket,
        taking connections from `peer` only; returns None."""
        vm_id = identity.vm_id
        path: Path | None = None
        if listener is not None:
            server = await asyncio.start_server(lambda r, w: self._accept(vm_id, r, w, peer), sock=listener,
                                                limit=16384)
        else:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.socket_path(vm_id)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a socket file left by a process that died
            server = await asyncio.start_unix_server(lambda r, w: self._accept(vm_id, r, w), path=str(path),
                                                     limit=16384)
            os.chmod(path, 0o600)
        self._vms[vm_id] = identity
        self._servers[vm_id] = server
        return path

    def update(self, vm_id: uuid.UUID, **changes: Any) -> None:
        """A VM changed hands (a pooled VM given to its user): later connections are the new owner's."""
        if vm_id in self._vms:
            self._vms[vm_id] = replace(self._vms[vm_id], **changes)

    async def detach(self, vm_id: uuid.UUID) -> None:
        """The VM is gone: stop listening for it and end its open tunnels."""
        self._vms.pop(vm_id, None)
        server = self._servers.pop(vm_id, None)
        if server is not None:
            server.close()
        for task in list(self._tunnels.pop(vm_id, ())):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(vm_id).unlink()
        self._refusals.pop(vm_id, None)

    def last_refusal(self, vm_id: uuid.UUID, host: str | None = None) -> str | None:
        """The last reason a tunnel of this VM (to `host`, when given) was refused or failed, for the flow's
        error message."""
        by_host = self._refusals.get(vm_id) or {}
        if host is not None:
            return by_host.get(host.lower())
        return next(reversed(by_host.values()), None)

    def attached(self) -> int:
        return len(self._vms)

    async def close(self) -> None:
        for vm_id in list(self._servers):
            await self.detach(vm_id)

    def remove_stale_sockets(self) -> int:
        """Remove the socket files of VMs this gateway does not serve: left by a server of this data directory
        that died (kill -9, a crash) with VMs attached. Called at start-up, before any VM is attached; the
        run directory is this data directory's own. Returns how many it removed."""
        removed = 0
        for path in self.run_dir.glob("*.sock") if self.run_dir.is_dir() else ():
            if path.stem not in {str(vm_id) for vm_id in self._servers}:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    async def _accept(self, vm_id: uuid.UUID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: str | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tunnels.setdefault(vm_id, set()).add(task)
        try:
            if peer is not None and (writer.get_extra_info("peername") or ("",))[0] != peer:
                writer.write(answer(403, "this listener belongs to another VM"))
                return
            await self._serve(vm_id, reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._tunnels.get(vm_id, set()).discard(task)
            writer.close()

    async def _serve(self, vm_id: uuid.UUID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host, port = await read_connect(reader)
        except BadRequest as exc:
            writer.write(answer(exc.status, exc.reason))
            return
        ident = self._vms.get(vm_id)
        if ident is None:
            writer.write(answer(403, "this VM is gone"))
            return
        try:
            upstream, limits = await self._open(ident, host, port)
        except Refused as exc:
            self._refuse(ident, host, exc)
            writer.write(answer(_STATUS.get(exc.kind, 403), exc.reason))
            return
        self.usage.connected(ident.user_id, host, ident.purpose)
        writer.write(answer(200))
        try:
            await self._pump(ident, host, (reader, writer), upstream)
        finally:
            await self.limits.release(ident.user_id)

    async def _open(self, ident: Identity, host: str, port: int) -> tuple[Streams, Limits]:
        self.policy.check_name(ident.provider, ident.policy_purpose, host, port)
        route, limits = await self.routes.route(ident.user_id)
        pinned = self.resolver.is_pinned(host)
        try:
            addresses = await self.resolver.resolve(host, route.family)
        except Refused as exc:
            if exc.kind != "dns" or not route.names_onward:
                raise
            addresses = []  # the user's proxy resolves it, on their side of the world
        if addresses and not pinned:  # names the operator pinned are trusted as given (the tests' stand-ins)
            addresses = self.policy.check_addresses(host, addresses)
        await self.limits.admit(ident.user_id, limits)
        try:
            return await route.open(host, port, addresses), limits
        except BaseException:
            await self.limits.release(ident.user_id)
            raise

    def _refuse(self, ident: Identity, host: str, exc: Refused) -> None:
        by_host = self._refusals.setdefault(ident.vm_id, {})
        by_host.pop(host.lower(), None)  # re-inserted: the latest is last
        by_host[host.lower()] = exc.reason
        while len(by_host) > MAX_REFUSALS_KEPT:
            del by_host[next(iter(by_host))]
        self.usage.refused(ident.user_id, host, ident.purpose, exc.kind, exc.reason)
        log.info("egress_refused", vm_id=str(ident.vm_id), user_id=str(ident.user_id), host=host, kind=exc.kind,
                 reason=exc.reason)

    async def _pump(self, ident: Identity, host: str, guest: Streams, upstream: Streams) -> None:
        user, usage, limits = ident.user_id, self.usage, self.limits

        def count(n: int, up: bool) -> None:
            usage.transferred(user, host, n if up else 0, 0 if up else n)
            limits.charge(user, n)

        try:
            await relay(guest, upstream, count)
        finally:
            upstream[1].close()
