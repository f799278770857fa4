"""Name resolution on the host, for the guests (they have no DNS of their own).

The family follows the user's egress identity: a user whose source address is IPv6 gets the name's AAAA
records, one with an IPv4 address its A records, and the host's route takes either (IPv4 first, the order
getaddrinfo gives for most hosts). Names the operator pinned (`EGRESS_HOSTS`) are answered from that map
without asking DNS; with `only_pinned` (EGRESS_RESOLVE=pinned: a closed world, as the tests run) nothing
else is answered and no DNS query leaves the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping

from polydev.egress.policy import IPAddress, Refused

DNS_TIMEOUT_S = 5.0


class Resolver:
    def __init__(self, pinned: Mapping[str, tuple[str, ...]] | None = None, timeout: float = DNS_TIMEOUT_S,
                 only_pinned: bool = False) -> None:
        self.pinned = {name.lower().rstrip("."): tuple(ipaddress.ip_address(a) for a in addrs)
                       for name, addrs in (pinned or {}).items()}
        self.timeout = timeout
        self.only_pinned = only_pinned

    def is_pinned(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.pinned

    async def resolve(self, host: str, family: int = socket.AF_UNSPEC) -> list[IPAddress]:
        """The addresses of `host` in `family` (AF_INET, AF_INET6 or AF_UNSPEC for both); Refused (kind dns)
        saying what failed when there are none."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if self.only_pinned and not any(literal in addrs for addrs in self.pinned.values()):
                raise Refused(f"{host} refused: EGRESS_RESOLVE=pinned reaches only the addresses in EGRESS_HOSTS",
                              kind="dns")
            found: list[IPAddress] = [literal]
        elif self.is_pinned(host):
            found = list(self.pinned[host.lower().rstrip(".")])
        elif self.only_pinned:
            raise Refused(f"DNS lookup for {host} refused: EGRESS_RESOLVE=pinned answers only the names in "
                          "EGRESS_HOSTS", kind="dns")
        else:
            found = await self._lookup(host)
        wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
        matching = [ip for ip in found if wanted is None or ip.version == wanted]
        if not matching:
            kind = {4: "IPv4 (A)", 6: "IPv6 (AAAA)"}.get(wanted or 0, "")
            raise Refused(f"DNS lookup for {host} found no {kind} address for this user's egress address",
                          kind="dns")
        return matching

    async def _lookup(self, host: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
            raise Refused(f"DNS lookup for {host} failed on the host: {detail}", kind="dns") from None
        out: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if ip not in out:
                out.append(ip)
        return out
