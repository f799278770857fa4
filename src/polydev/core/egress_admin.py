"""Admins set each user's egress identity (how their VMs' traffic leaves the host) and everyone reads their
egress accounting. The one place that checks an identity before it is stored, so the API, the CLI and the
dashboard refuse the same things with the same words, and a refused change changes nothing: the mode, the
address family, the proxy URL (parsed as the gateway will parse it, before anything is sealed) and the
limit overrides are all checked first.

A proxy URL may carry credentials: it goes into the vault and never comes back out of this service except
as `scheme://host:port`, and no error here quotes it.

The running gateway caches each user's route for a few seconds; `on_change(user_id)` (the server wires it to
`EgressService.routes.forget`) makes a change apply to the very next tunnel.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from polydev.config.egress import AddressPool
from polydev.egress.limits import NAMES, Limits
from polydev.egress.routes import ProxyURL
from polydev.store.egress import Delta, Egress, EgressRepo, PoolExhausted
from polydev.store.models import EGRESS_MODES, EgressUsage, User
from polydev.store.users import UserRepo

LIMIT_NAMES = NAMES
_LIMIT_MIN = {"concurrent": 1, "per_minute": 1, "bytes_per_day": 0}


class EgressAdminError(Exception):
    """A change refused, with a message fit to show (never a proxy URL)."""


class EgressUserNotFound(EgressAdminError):
    pass


class BadEgressMode(EgressAdminError):
    pass


class BadEgressFamily(EgressAdminError):
    pass


class BadProxyUrl(EgressAdminError):
    pass


class BadEgressLimits(EgressAdminError):
    pass


class NoAddressPool(EgressAdminError):
    """`address` mode asked for, and EGRESS_ADDRESS_POOL has no address (of the family asked for)."""


class AddressPoolExhausted(EgressAdminError):
    """Every address of the pool (of the family asked for) belongs to another user."""


@dataclass(frozen=True)
class EgressView:
    """A user's egress identity as admins see it: the proxy as scheme://host:port only."""

    user_id: uuid.UUID
    user_name: str
    mode: str
    address: str | None
    family: int | None  # the address's, when there is one
    has_proxy: bool
    proxy: str | None  # scheme://host:port of the upstream proxy (proxy mode), never its credentials
    limits: dict[str, int]  # the user's overrides
    effective_limits: dict[str, int]  # the settings' defaults with the overrides applied


@dataclass
class UsageRow(Delta):
    """One destination host's accounting for one user, all days added up, with the user's name (None: VMs
    nobody owned yet, i.e. pre-started logins)."""

    user_name: str | None = None


class EgressAdmin:
    def __init__(self, repo: EgressRepo, users: UserRepo, pool: AddressPool, defaults: Limits,
                 on_change: Callable[[uuid.UUID], None] | None = None) -> None:
        self.repo = repo
        self.users = users
        self.pool = pool
        self.defaults = defaults
        self.on_change = on_change

    async def _user(self, user_id: uuid.UUID) -> User:
        user = await self.users.get(user_id)
        if user is None:
            raise EgressUserNotFound("no such user")
        return user

    async def get(self, user_id: uuid.UUID) -> EgressView:
        user = await self._user(user_id)
        return await self._view(user, await self.repo.get(user_id))

    async def list_all(self) -> list[EgressView]:
        """Every user's identity (direct for those never set), in the users' order."""
        return [await self._view(u, await self.repo.get(u.id)) for u in await self.users.list()]

    async def set(self, user_id: uuid.UUID, mode: str, *, proxy_url: str | None = None, family: int | None = None,
                  limits: dict[str, int] | None = None) -> EgressView:
        """Set the user's mode (and limit overrides when `limits` is given; `{}` clears them). Everything is
        checked before anything is stored: an EgressAdminError changes nothing."""
        user = await self._user(user_id)
        if mode not in EGRESS_MODES:
            raise BadEgressMode(f"unknown egress mode {mode!r}; expected one of {', '.join(EGRESS_MODES)}")
        if family is not None and family not in (4, 6):
            raise BadEgressFamily("family is 4 or 6")
        if family is not None and mode != "address":
            raise BadEgressFamily("family applies to address mode only")
        if proxy_url is not None and mode != "proxy":
            raise BadProxyUrl("proxy_url applies to proxy mode only")
        checked = _check_limits(limits)
        if mode == "proxy":
            await self._check_proxy(user_id, proxy_url)
        if mode == "address":
            self._check_pool(family)
        try:
            stored = await self.repo.set(user_id, mode, pool=self.pool, proxy_url=proxy_url, family=family,
                                         limits=checked)
        except PoolExhausted as exc:
            raise AddressPoolExhausted(str(exc)) from None
        if self.on_change is not None:
            self.on_change(user_id)
        return await self._view(user, stored)

    async def usage(self, user_id: uuid.UUID | None = None, *, all_users: bool = False) -> list[UsageRow]:
        """One user's accounting per destination host, or everyone's (with each user's name)."""
        rows = await self.repo.usage(user_id, all_users=all_users)
        names = {u.id: u.name for u in await self.users.list()} if all_users else {}
        if not all_users and user_id is not None:
            names[user_id] = (await self._user(user_id)).name
        return [_usage_row(r, names.get(r.user_id) if r.user_id else None) for r in rows]

    async def _check_proxy(self, user_id: uuid.UUID, proxy_url: str | None) -> None:
        if proxy_url is None:
            if await self.repo.proxy_url(user_id) is None:
                raise BadProxyUrl("proxy mode needs a proxy_url (http://, socks5:// or socks5h://, "
                                  "optionally with user:password@)")
            return
        try:
            ProxyURL.parse(proxy_url)  # its ValueError never quotes the URL
        except ValueError as exc:
            raise BadProxyUrl(str(exc)) from None

    def _check_pool(self, family: int | None) -> None:
        if next(self.pool.candidates(family), None) is None:
            which = f" has no IPv{family} addresses" if family and self.pool else " is empty"
            raise NoAddressPool(f"address mode needs EGRESS_ADDRESS_POOL, and it{which}: the operator routes "
                                "addresses to this host and lists them there (see the README's Egress section)")

    async def _view(self, user: User, egress: Egress) -> EgressView:
        proxy = None
        if egress.has_proxy:
            url = await self.repo.proxy_url(user.id)
            try:
                proxy = ProxyURL.parse(url).redacted() if url else None
            except ValueError:
                proxy = "(unusable)"
        family = ipaddress.ip_address(egress.address).version if egress.address else None
        effective = self.defaults.merged(egress.limits)
        return EgressView(user.id, user.name, egress.mode, egress.address, family, egress.has_proxy, proxy,
                          dict(egress.limits), {k: getattr(effective, k) for k in LIMIT_NAMES})


def _check_limits(limits: dict[str, int] | None) -> dict[str, int] | None:
    if limits is None:
        return None
    out: dict[str, int] = {}
    for name, value in limits.items():
        if name not in LIMIT_NAMES:
            raise BadEgressLimits(f"unknown limit {name!r}; expected {', '.join(LIMIT_NAMES)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < _LIMIT_MIN[name]:
            raise BadEgressLimits(f"limit {name} is a whole number, at least {_LIMIT_MIN[name]}")
        out[name] = value
    return out


def _usage_row(r: EgressUsage, name: str | None) -> UsageRow:
    return UsageRow(r.user_id, r.host, r.connections, r.bytes_up, r.bytes_down, r.refusals, r.last_refusal,
                    r.first_seen, r.last_seen, user_name=name)
