"""Guest forwards (VM_GUEST_FORWARDS, parsed by polydev.config.forwards) as QEMU arguments.

QEMU's `guestfwd=tcp:IP:PORT-cmd:COMMAND` starts COMMAND for every connection the guest opens to IP:PORT with
the connection on its standard input and output, so a relay (`socat - TCP:host:port`) per connection carries
any number of concurrent connections. (The `guestfwd=...-chardev` form carries one connection at a time: no
use for HTTP clients that open several.)

QEMU hands COMMAND to a shell-like parser, so it is built only from validated values: the forward's
addresses and ports (validated by the setting's parser), and the relay's absolute path checked here for
plain characters.
"""

from __future__ import annotations

import re
import shutil

from polydev.config.forwards import GuestForward

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")
RELAY_MISSING = ("VM_GUEST_FORWARDS and the egress gateway need socat on the host (Debian: apt-get install socat); "
                 "or EGRESS_GATEWAY=off")
RELAY_BUFFER = 256 * 1024
RELAY_SNDBUF = 1024 * 1024


def relay_path() -> str | None:
    """The per-connection relay QEMU starts for each forwarded connection; None when it is not installed."""
    return shutil.which("socat")


def netdev_rule(fwd: GuestForward, relay: str) -> str:
    """The `guestfwd=` part of a `-netdev user` option, relaying each connection with `relay` (socat)."""
    if not _SAFE_PATH.match(relay):
        raise ValueError(f"relay path {relay!r} has characters that cannot go on QEMU's command line")
    family = "TCP6" if fwd.host_ip.version == 6 else "TCP4"
    return f"guestfwd=tcp:{fwd.guest_ip}:{fwd.guest_port}-cmd:{relay} - {family}:{fwd.host}"


def egress_rule(guest_address: str, socket_path: str, relay: str) -> str:
    """The `guestfwd=` part that carries the guest's proxy address (`IP:PORT`) to the egress gateway's socket
    for this VM: each connection its own relay to the Unix socket, so the gateway knows the VM by the socket."""
    for value in (relay, socket_path):
        if not _SAFE_PATH.match(value):
            raise ValueError(f"path {value!r} has characters that cannot go on QEMU's command line")
    ip, _, port = guest_address.rpartition(":")
    # socat moves 8 KiB per read by default and the socket's default send buffer holds ~200 KiB: bigger
    # ones mean fewer wake-ups of socat and the gateway per megabyte (bench/egress.py sends the same way).
    # `,,` is QEMU's escaped comma: socat sees `UNIX-CONNECT:PATH,sndbuf=N`.
    return (f"guestfwd=tcp:{ip}:{port}-cmd:{relay} -b {RELAY_BUFFER} - "
            f"UNIX-CONNECT:{socket_path},,sndbuf={RELAY_SNDBUF}")

