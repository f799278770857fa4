"""VM_GUEST_FORWARDS, the setting: `GUEST_IP:PORT=HOST_IP:PORT,...` parsed into `GuestForward`s.

Each forward opens one guest address on QEMU user networking, e.g. `10.0.2.100:3128`, onto one service on
the host's loopback, e.g. `127.0.0.1:8888`; with `restrict=on` the guest reaches nothing else outside. Only
the setting's syntax and its rules live here; turning forwards into QEMU's arguments is the VM layer's
(polydev.vm.forwards). What it builds from these values goes on QEMU's command line, so every value is
validated: IP addresses re-rendered by `ipaddress`, ports as integers in range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# QEMU user networking's fixed layout (-netdev user defaults): what a forward must live inside, and the
# addresses slirp itself answers on, which a forward must not shadow.
USER_NET = ipaddress.IPv4Network("10.0.2.0/24")
RESERVED = {ipaddress.IPv4Address(a): why for a, why in (
    ("10.0.2.0", "the network address"), ("10.0.2.2", "QEMU's host alias (gateway)"),
    ("10.0.2.3", "QEMU's DNS"), ("10.0.2.15", "the guest's own address"), ("10.0.2.255", "the broadcast address"))}


@dataclass(frozen=True)
class GuestForward:
    """guest_ip:guest_port inside the VM → host_ip:host_port on the host's loopback."""

    guest_ip: ipaddress.IPv4Address
    guest_port: int
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    host_port: int

    def __post_init__(self) -> None:
        if self.guest_ip not in USER_NET:
            raise ValueError(f"guest address {self.guest_ip} is outside the user network {USER_NET}")
        if self.guest_ip in RESERVED:
            raise ValueError(f"guest address {self.guest_ip} is {RESERVED[self.guest_ip]}")
        if not self.host_ip.is_loopback:
            raise ValueError(f"host address {self.host_ip} is not a loopback address")
        for port in (self.guest_port, self.host_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")

    def __str__(self) -> str:
        return f"{self.guest_ip}:{self.guest_port}={self.host}"

    @property
    def host(self) -> str:
        """The host side as ADDRESS:PORT, an IPv6 address in brackets."""
        return f"[{self.host_ip}]:{self.host_port}" if self.host_ip.version == 6 else f"{self.host_ip}:{self.host_port}"


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {text.strip()!r} is not ADDRESS:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_one(item: str) -> GuestForward:
    guest, sep, host = item.partition("=")
    if not sep:
        raise ValueError(f"guest forward {item.strip()!r} is not GUEST_IP:PORT=HOST_IP:PORT")
    guest_ip, guest_port = _split_host_port(guest, "guest side")
    host_ip, host_port = _split_host_port(host, "host side")
    try:
        return GuestForward(ipaddress.IPv4Address(guest_ip), guest_port, ipaddress.ip_address(host_ip), host_port)
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"guest forward {item.strip()!r}: {exc}") from None


def parse_guest_forwards(text: str) -> tuple[GuestForward, ...]:
    """`10.0.2.100:3128=127.0.0.1:8888,10.0.2.101:80=127.0.0.1:9999` → forwards; ValueError on anything else."""
    forwards = tuple(parse_one(item) for item in text.split(",") if item.strip())
    seen: set[tuple[ipaddress.IPv4Address, int]] = set()
    for fwd in forwards:
        if (fwd.guest_ip, fwd.guest_port) in seen:
            raise ValueError(f"guest address {fwd.guest_ip}:{fwd.guest_port} is forwarded twice")
        seen.add((fwd.guest_ip, fwd.guest_port))
    return forwards


def format_guest_forwards(forwards: tuple[GuestForward, ...]) -> str:
    """The setting's text for `forwards`: parse_guest_forwards(format_guest_forwards(f)) == f."""
    return ",".join(str(fwd) for fwd in forwards)
