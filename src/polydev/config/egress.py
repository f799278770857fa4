"""EGRESS_ADDRESS_POOL, the setting: the source addresses the operator routed to this host, one per user in
`address` egress mode. IPv4 ranges (`A-B` or CIDR) and/or IPv6 prefixes, comma-separated, e.g.
`203.0.113.10-203.0.113.40,2001:db8:7::/64`: a /64 gives every user their own address."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AddressRange:
    first: IPAddress
    last: IPAddress
    text: str = ""  # as the operator wrote it

    def __iter__(self) -> Iterator[IPAddress]:
        n = int(self.first)
        while n <= int(self.last):
            yield ipaddress.ip_address(n) if self.first.version == 4 else ipaddress.IPv6Address(n)
            n += 1

    def __contains__(self, ip: object) -> bool:
        return (isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and ip.version == self.first.version
                and int(self.first) <= int(ip) <= int(self.last))

    def networks(self) -> list[IPNetwork]:
        return list(ipaddress.summarize_address_range(self.first, self.last))  # type: ignore[arg-type]


def _range(item: str) -> AddressRange:
    if "-" in item:
        a, b = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
        if a.version != b.version or int(a) > int(b):
            raise ValueError(f"{item!r}: a range is FIRST-LAST of one family, first <= last")
        return AddressRange(a, b, item)
    net = ipaddress.ip_network(item, strict=False)
    if net.num_addresses == 1:
        return AddressRange(net.network_address, net.network_address, item)
    # Skip the network's own address (and IPv4's broadcast): they are not a host's source address.
    last = net.broadcast_address - 1 if net.version == 4 else net.broadcast_address
    return AddressRange(net.network_address + 1, last, item)


@dataclass(frozen=True)
class AddressPool:
    ranges: tuple[AddressRange, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> AddressPool:
        """ValueError naming the bad item."""
        items = [i.strip() for i in (text or "").split(",") if i.strip()]
        try:
            return cls(tuple(_range(i) for i in items))
        except ValueError as exc:
            raise ValueError(f"EGRESS_ADDRESS_POOL: {exc}") from None

    def candidates(self, family: int | None = None) -> Iterator[IPAddress]:
        """The pool's addresses in order (IPv4 ranges first as listed), optionally of one family (4 or 6)."""
        for r in self.ranges:
            if family in (None, r.first.version):
                yield from r

    def __contains__(self, ip: object) -> bool:
        return any(ip in r for r in self.ranges)

    def networks(self) -> list[IPNetwork]:
        return [net for r in self.ranges for net in r.networks()]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def describe(self) -> str:
        return ",".join(r.text or f"{r.first}-{r.last}" for r in self.ranges)
