"""Which destinations a connection may reach: host names on the allow-list for its purpose, and addresses
that are public.

The allow-list is by name (what the CLI asked for in its CONNECT), per provider and purpose; the address
check runs on what the name resolved to, so a name that points at loopback, a private network, link-local
(the cloud's metadata service at 169.254.169.254) or the platform's own source-address pool is refused
whatever the allow-list says: no DNS-rebinding way into the host or its network. Names the operator maps
to addresses themselves (`EGRESS_HOSTS`, the tests' stand-ins) are trusted as given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ports a tunnel may go to. The CLIs speak HTTPS; 80 is there for the login browser's plain-HTTP redirects.
DEFAULT_PORTS = frozenset({443, 80})


class Refused(Exception):
    """A connection the gateway will not make; `reason` is said to the client and recorded."""

    def __init__(self, reason: str, *, kind: str = "policy") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # policy | dns | limit | upstream | identity: the accounting's refusal classes


def host_matches(host: str, pattern: str) -> bool:
    """`pattern` is a name, or `*.suffix` for any name below suffix (not the suffix itself), or `*`."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def address_refusal(ip: IPAddress, refused: Iterable[IPNetwork] = ()) -> str | None:
    """Why `ip` may not be a tunnel's destination, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, not a public IPv6 address
    for net in refused:
        if ip.version == net.version and ip in net:
            return f"{ip} is in the platform's own range {net}"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is link-local (metadata services live there)"
    if ip.is_private:
        return f"{ip} is a private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return f"{ip} is not a public unicast address"
    return None


# A VM that may reach nothing at all (an E2B sandbox created with allow_internet_access=False).
OFFLINE_PURPOSE = "sandbox_offline"
# A workspace's VM between turns (core/workspaces.py): it reaches the git hosts (WORKSPACE_GIT_HOSTS) only.
WORKSPACE_PURPOSE = "workspace"


@dataclass(frozen=True)
class Policy:
    """The allow-list: `allow[(provider, purpose)]` host patterns, `extra` the operator's additions (for
    every purpose), `open_purposes` the purposes that may reach any public host (the login browser, and
    sandboxes when EGRESS_SANDBOX_OPEN is on)."""

    allow: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    open_purposes: frozenset[str] = frozenset()
    ports: frozenset[int] = DEFAULT_PORTS
    refused_networks: tuple[IPNetwork, ...] = ()

    def check_name(self, provider: str | None, purpose: str, host: str, port: int) -> None:
        """Refused unless `host:port` is allowed for a connection of this provider and purpose."""
        if purpose == OFFLINE_PURPOSE:  # before the operator's additions, which every other purpose gets
            raise Refused(f"{host} refused: this sandbox was created without internet access")
        if port not in self.ports:
            raise Refused(f"{host}:{port} refused: port {port} is not open to VMs "
                          f"(open: {', '.join(map(str, sorted(self.ports)))})")
        if purpose in self.open_purposes:
            return
        patterns = (*self.allow.get((provider or "", purpose), ()), *self.extra)
        if not any(host_matches(host, p) for p in patterns):
            who = f"{provider} {purpose}s" if provider else f"{purpose} VMs"
            raise Refused(f"{host} refused: not on the allow-list for {who}")

    def check_addresses(self, host: str, addresses: list[IPAddress]) -> list[IPAddress]:
        """The addresses of `host` that may be dialled; Refused naming the first reason when none may."""
        usable = [ip for ip in addresses if address_refusal(ip, self.refused_networks) is None]
        if not usable:
            reason = address_refusal(addresses[0], self.refused_networks) if addresses else "no address"
            raise Refused(f"{host} refused: its address {reason}")
        return usable
