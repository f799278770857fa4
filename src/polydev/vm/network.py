"""Per-VM network slots (the `tap` network mode).

Each slot is a network namespace holding the VM's TAP and one end of a veth pair whose other end sits in
the host namespace. Every guest has the same address (GUEST_IP, gateway GATEWAY_IP), so one snapshot
restores into any slot; slots differ only in their veth /31 pair, taken from the configured pool
(NETWORK_IP_POOL_START..END): the host end and the namespace end. The control plane reaches a VM's agent
at `slot.ns_ip:AGENT_PORT`, which the slot's nftables rules DNAT to the guest.

The slot's firewall (inside its namespace, never on the host):
- only the host end of its own veth may open the agent (and VNC) ports, nothing else gets in;
- the guest cannot talk to the namespace itself, nor to any address in the pool (other VMs, the host
  ends), nor to anything else unless the slot's egress policy lets it through;
- egress that is allowed leaves masqueraded behind the slot's namespace address;
- with the egress gateway on (`egress_port`), the guest's proxy address GATEWAY_IP:EGRESS_PORT — the same in
  every slot, like the guest's own — is DNATed to the host end of its own veth, where the gateway listens
  for this VM alone (`listen`): a connection's VM is known from the listener it arrives on, and the pool
  rule keeps a guest away from every other slot's listener.

`host_netns` names the namespace that plays the host: None in production (the root namespace), a
namespace of their own in tests, so nothing here ever touches the machine's real interfaces.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import structlog
from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from polydev.vm.handover import socket_in_netns

log = structlog.get_logger(__name__)

GUEST_IP = "169.254.0.21"
GATEWAY_IP = "169.254.0.22"
GUEST_PREFIX = 30
GUEST_MAC = "02:50:44:00:00:15"  # locally administered; the same in every slot, like the IP
# The gateway (the slot's TAP) has one MAC in every slot too: a guest restored from a snapshot taken in
# another slot still has the gateway's MAC in its ARP cache, and a TAP drops frames addressed to another MAC.
GATEWAY_MAC = "02:50:44:00:00:16"
AGENT_PORT = 8080
EGRESS_PORT = 3128  # the egress gateway, at GATEWAY_IP in the guest and at the slot's host end on the host
VNC_PORT = 5901
NS_VETH = "veth0"
TAP = "tap0"


class NetworkError(Exception):
    pass


@dataclass(frozen=True)
class SlotAddress:
    """One /31 from the pool: the host end and the namespace end of a slot's veth."""

    index: int
    host_ip: str
    ns_ip: str


def pool_pairs(start: str, end: str) -> list[SlotAddress]:
    """Every aligned /31 pair that fits inside [start, end]."""
    first, last = int(ipaddress.IPv4Address(start)), int(ipaddress.IPv4Address(end))
    if last < first:
        raise NetworkError(f"empty address pool {start}..{end}")
    first += first % 2  # /31s start on even addresses
    return [SlotAddress(i, str(ipaddress.IPv4Address(a)), str(ipaddress.IPv4Address(a + 1)))
            for i, a in enumerate(range(first, last, 2))]


def pool_networks(start: str, end: str) -> list[str]:
    """The pool as CIDR blocks, for the firewall's 'never reach these' set."""
    return [str(n) for n in ipaddress.summarize_address_range(ipaddress.IPv4Address(start),
                                                              ipaddress.IPv4Address(end))]


@dataclass(frozen=True)
class EgressRule:
    """A destination the guest may open connections to: a network, optionally one TCP port."""

    network: str
    port: int | None = None

    def __post_init__(self) -> None:
        ipaddress.IPv4Network(self.network)  # raises ValueError on a bad rule
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")


# Addresses a guest must never reach even when egress is open to "the internet".
NON_PUBLIC = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4")


@dataclass(frozen=True)
class EgressPolicy:
    """What a guest may reach. The default is nothing at all."""

    allow: tuple[EgressRule, ...] = ()
    internet: bool = False  # any public address (never private, link-local or the pool)

    @classmethod
    def none(cls) -> EgressPolicy:
        return cls()


@dataclass(frozen=True)
class Slot:
    index: int
    netns: str
    host_veth: str
    host_ip: str
    ns_ip: str
    host_netns: str | None = None
    guest_netns: str | None = None  # only for emulated guests (see SlotNetwork.create)

    def command_prefix(self) -> list[str]:
        """Prefix for a command that must run inside the slot (the hypervisor, to open the TAP)."""
        return ["ip", "netns", "exec", self.netns]


def _run(args: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(args, input=stdin, text=True, capture_output=True, timeout=30)
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(args[:5])} failed: {result.stderr.strip()}")


def _nft_set(items: Iterable[str]) -> str:
    values = sorted(set(items))
    return "{ " + ", ".join(values) + " }" if values else ""


@dataclass
class SlotNetwork:
    """Creates and removes slots. Names carry `prefix`, so reclaim finds exactly what is ours."""

    pool_start: str
    pool_end: str
    prefix: str = "pd"
    host_netns: str | None = None
    egress_port: int | None = None  # the egress gateway's port: set, each guest reaches its slot's listener
    _pairs: list[SlotAddress] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.prefix) > 6 or not self.prefix.isalnum():
            raise NetworkError("slot prefix must be at most 6 letters or digits (interface names are short)")
        self._pairs = pool_pairs(self.pool_start, self.pool_end)

    @property
    def capacity(self) -> int:
        return len(self._pairs)

    def address(self, index: int) -> SlotAddress:
        if not 0 <= index < len(self._pairs):
            raise NetworkError(f"slot {index} is outside the pool ({len(self._pairs)} slots)")
        return self._pairs[index]

    def names(self, index: int) -> tuple[str, str]:
        return f"{self.prefix}-slot-{index}", f"{self.prefix}h{index}"

    def _host(self) -> IPRoute | NetNS:
        return NetNS(self.host_netns) if self.host_netns else IPRoute()

    def create(self, index: int, egress: EgressPolicy | None = None,
               guest: Literal["tap", "emulated"] = "tap") -> Slot:
        """Build slot `index`. `guest="emulated"` puts a veth named like the TAP into a namespace of its
        own that plays the guest (address and route as a real guest has them): what the network tests and
        `polydev doctor` use to check a slot's isolation without booting a VM."""
        addr = self.address(index)
        ns_name, host_veth = self.names(index)
        slot = Slot(index, ns_name, host_veth, addr.host_ip, addr.ns_ip, self.host_netns,
                    f"{ns_name}-g" if guest == "emulated" else None)
        self.destroy(index)  # a stale slot of the same index (crash leftovers) would make every step fail
        try:
            self._build(slot, egress or EgressPolicy.none())
        except BaseException:
            self.destroy(index)
            raise
        log.info("slot_created", slot=index, netns=ns_name, ns_ip=addr.ns_ip)
        return slot

    def _build(self, slot: Slot, egress: EgressPolicy) -> None:
        netns.create(slot.netns)
        with self._host() as host:
            host.link("add", ifname=slot.host_veth, kind="veth", peer={"ifname": NS_VETH, "net_ns_fd": slot.netns})
            idx = host.link_lookup(ifname=slot.host_veth)[0]
            host.addr("add", index=idx, address=slot.host_ip, prefixlen=31)
            host.link("set", index=idx, state="up")
        with NetNS(slot.netns) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            veth = ns.link_lookup(ifname=NS_VETH)[0]
            ns.addr("add", index=veth, address=slot.ns_ip, prefixlen=31)
            ns.link("set", index=veth, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=slot.host_ip)
            if slot.guest_netns is None:
                ns.link("add", ifname=TAP, kind="tuntap", mode="tap")
            else:
                netns.create(slot.guest_netns)
                ns.link("add", ifname=TAP, kind="veth", peer={"ifname": "eth0", "net_ns_fd": slot.guest_netns})
            tap = ns.link_lookup(ifname=TAP)[0]
            ns.link("set", index=tap, address=GATEWAY_MAC)
            ns.addr("add", index=tap, address=GATEWAY_IP, prefixlen=GUEST_PREFIX)
            ns.link("set", index=tap, state="up")
        if slot.guest_netns is not None:
            with NetNS(slot.guest_netns) as g:
                g.link("set", index=g.link_lookup(ifname="lo")[0], state="up")
                eth = g.link_lookup(ifname="eth0")[0]
                g.link("set", index=eth, address=GUEST_MAC)
                g.addr("add", index=eth, address=GUEST_IP, prefixlen=GUEST_PREFIX)
                g.link("set", index=eth, state="up")
                g.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP)
        _run([*slot.command_prefix(), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _run([*slot.command_prefix(), "nft", "-f", "-"], stdin=self.ruleset(slot, egress))

    @property
    def egress_guest_address(self) -> str | None:
        """The gateway as every guest reaches it (its proxy address), when the gateway is on."""
        return f"{GATEWAY_IP}:{self.egress_port}" if self.egress_port else None

    def listen(self, slot: Slot) -> socket.socket:
        """A listening socket for the gateway at the host end of `slot`'s veth, in the namespace that plays
        the host (a socket stays in the namespace it was made in, whichever thread later serves it)."""
        if self.egress_port is None:
            raise NetworkError("the slots have no egress gateway port")
        sock = socket_in_netns(self.host_netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((slot.host_ip, self.egress_port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot listen for slot {slot.index} at {slot.host_ip}:{self.egress_port}: "
                               f"{exc}") from exc
        sock.setblocking(False)
        return sock

    def ruleset(self, slot: Slot, egress: EgressPolicy) -> str:
        pool = _nft_set(pool_networks(self.pool_start, self.pool_end))
        gateway_dnat = gateway_forward = ""
        if self.egress_port:
            # Before the pool rule: the one pool address a guest reaches is its own slot's gateway listener.
            gateway_dnat = (f'\n        iifname "{TAP}" ip daddr {GATEWAY_IP} tcp dport {self.egress_port} '
                            f"dnat ip to {slot.host_ip}:{self.egress_port}")
            gateway_forward = (f'\n        iifname "{TAP}" oifname "{NS_VETH}" ip daddr {slot.host_ip} '
                               f"tcp dport {self.egress_port} ct status dnat accept")
        lines = [f"        ip daddr {pool} drop"]
        if egress.internet:
            lines.append(f"        ip daddr {_nft_set(NON_PUBLIC)} drop")
        for rule in egress.allow:
            port = f" tcp dport {rule.port}" if rule.port else ""
            lines.append(f"        ip daddr {rule.network}{port} accept")
        if egress.internet:
            lines.append("        accept")
        egress_rules = "\n".join(lines)
        return f"""flush ruleset
table inet polydev {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{NS_VETH}" ip saddr {slot.host_ip} ip daddr {slot.ns_ip} tcp dport {{ {AGENT_PORT}, {VNC_PORT} }} dnat ip to {GUEST_IP}{gateway_dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{NS_VETH}" ip saddr {GUEST_IP} masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "{NS_VETH}" oifname "{TAP}" ip saddr {slot.host_ip} ip daddr {GUEST_IP} tcp dport {{ {AGENT_PORT}, {VNC_PORT} }} ct status dnat accept{gateway_forward}
        iifname "{TAP}" oifname "{NS_VETH}" jump egress
    }}
    chain egress {{
{egress_rules}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
    }}
}}
"""

    def destroy(self, index: int) -> None:
        """Remove a slot; every step tolerates the part already being gone."""
        ns_name, host_veth = self.names(index)
        with self._host() as host:
            for idx in host.link_lookup(ifname=host_veth):
                try:
                    host.link("del", index=idx)  # takes the namespace end with it
                except NetlinkError as exc:
                    if exc.code != 19:  # ENODEV: already gone
                        raise
        for name in (f"{ns_name}-g", ns_name):
            if name in netns.listnetns():
                netns.remove(name)

    def existing(self) -> set[int]:
        """Indexes of every slot of ours found on the machine (namespace or host veth)."""
        found: set[int] = set()
        marker = f"{self.prefix}-slot-"
        for name in netns.listnetns():
            rest = name[len(marker):] if name.startswith(marker) else ""
            rest = rest[:-2] if rest.endswith("-g") else rest
            if rest.isdigit():
                found.add(int(rest))
        with self._host() as host:
            for link in host.get_links():
                ifname = link.get("ifname") or ""
                tail = ifname[len(self.prefix) + 1:]
                if ifname.startswith(f"{self.prefix}h") and tail.isdigit():
                    found.add(int(tail))
        return found

    def reclaim(self, live: Iterable[int]) -> list[int]:
        """Remove every slot of ours that is not in `live`; returns the indexes removed."""
        keep = set(live)
        removed = sorted(self.existing() - keep)
        for index in removed:
            self.destroy(index)
        if removed:
            log.warning("slots_reclaimed", slots=removed)
        return removed
