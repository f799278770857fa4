"""How a user's tunnels leave the host: their egress identity made into a way to open a TCP stream.

- `DirectRoute`: the host's default route, optionally from a dedicated source address (`address` mode).
  The socket is bound before it connects, with IP_FREEBIND so an address of a prefix routed to the host
  (`ip -6 route add local PREFIX dev lo`, see README) works without configuring each one on an interface.
- `HttpProxyRoute` / `Socks5Route`: the user's upstream proxy (`proxy` mode), HTTP CONNECT or SOCKS5 with
  optional credentials; the proxy is given the name, as the CLI asked for it.

A route that cannot open the stream raises Refused (kind "upstream") with the reason; no route ever falls
back to another (a user's traffic never leaves through the shared route when their own path fails).
Reasons name a proxy by scheme, host and port only: its credentials never appear in an error.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

from polydev.egress.policy import IPAddress, Refused

CONNECT_TIMEOUT_S = 10.0
IP_FREEBIND = 15  # linux/in.h; socket module has no name for it
IPV6_FREEBIND = 78  # linux/in6.h, Linux >= 4.15
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Route(Protocol):
    family: int  # the address family this route's tunnels use: AF_INET, AF_INET6 or AF_UNSPEC
    # The route hands the name on (an upstream proxy resolves it): a name the host cannot resolve may still
    # be reached; one the host resolves is checked all the same.
    names_onward: bool

    def describe(self) -> str: ...

    async def open(self, host: str, port: int, addresses: list[IPAddress]) -> Streams: ...


async def _dial(addresses: list[IPAddress], port: int, source: IPAddress | None, timeout: float) -> Streams:
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for ip in addresses:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source is not None:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                sock.bind((str(source), 0))
            await asyncio.wait_for(loop.sock_connect(sock, (str(ip), port)), timeout)
            return await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else TimeoutError(f"no answer within {timeout:g} s")
    detail = (last.strerror or str(last)) if last else "no address"
    raise Refused(f"could not connect to port {port} at {', '.join(map(str, addresses))}: {detail}", kind="upstream")


@dataclass(frozen=True)
class DirectRoute:
    source: IPAddress | None = None
    timeout: float = CONNECT_TIMEOUT_S
    names_onward: bool = False

    @property
    def family(self) -> int:
        if self.source is None:
            return socket.AF_UNSPEC
        return socket.AF_INET6 if self.source.version == 6 else socket.AF_INET

    def describe(self) -> str:
        return f"address {self.source}" if self.source else "direct"

    async def open(self, host: str, port: int, addresses: list[IPAddress]) -> Streams:
        return await _dial(addresses, port, self.source, self.timeout)


@dataclass(frozen=True)
class ProxyURL:
    scheme: str  # http | socks5 | socks5h
    host: str
    port: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """ValueError (without the URL, which may hold credentials) when `url` is not a usable proxy URL."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "socks5", "socks5h"):
            raise ValueError("an upstream proxy URL is http://, socks5:// or socks5h://")
        try:
            port = parts.port or (1080 if scheme.startswith("socks") else 8080)
        except ValueError:
            raise ValueError("the upstream proxy URL has a bad port") from None
        if not parts.hostname:
            raise ValueError("the upstream proxy URL has no host")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(scheme, parts.hostname, port, user, password)

    def redacted(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


async def _connect_proxy(proxy: ProxyURL, timeout: float) -> Streams:
    try:
        return await asyncio.wait_for(asyncio.open_connection(proxy.host, proxy.port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        detail = "no answer" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
        raise Refused(f"upstream proxy {proxy.redacted()} unreachable: {detail}", kind="upstream") from None


@dataclass(frozen=True)
class _ProxyRoute:
    """A user's upstream proxy: it is given the name and resolves it on its side."""

    proxy: ProxyURL
    timeout: float = CONNECT_TIMEOUT_S
    family: int = socket.AF_UNSPEC
    names_onward: bool = True

    def describe(self) -> str:
        return f"proxy {self.proxy.redacted()}"


@dataclass(frozen=True)
class HttpProxyRoute(_ProxyRoute):
    async def open(self, host: str, port: int, addresses: list[IPAddress]) -> Streams:
        reader, writer = await _connect_proxy(self.proxy, self.timeout)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if self.proxy.username is not None:
            token = base64.b64encode(f"{self.proxy.username}:{self.proxy.password or ''}".encode()).decode()
            head += f"Proxy-Authorization: Basic {token}\r\n"
        writer.write((head + "\r\n").encode())
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            raise Refused(f"upstream proxy {self.proxy.redacted()} gave no CONNECT answer", kind="upstream") from None
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        if len(status.split()) < 2 or status.split()[1] != "200":
            writer.close()
            raise Refused(f"upstream proxy {self.proxy.redacted()} refused {target}: {status[:100]}", kind="upstream")
        return reader, writer


_SOCKS_ERRORS = {1: "general failure", 2: "not allowed by its rules", 3: "network unreachable",
                 4: "host unreachable", 5: "connection refused", 6: "TTL expired", 7: "command not supported",
                 8: "address type not supported"}


@dataclass(frozen=True)
class Socks5Route(_ProxyRoute):
    async def open(self, host: str, port: int, addresses: list[IPAddress]) -> Streams:
        reader, writer = await _connect_proxy(self.proxy, self.timeout)
        try:
            await asyncio.wait_for(self._handshake(reader, writer, host, port), self.timeout)
        except Refused:
            writer.close()
            raise
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            writer.close()
            raise Refused(f"upstream proxy {self.proxy.redacted()} broke off the SOCKS5 handshake",
                          kind="upstream") from None
        return reader, writer

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                         port: int) -> None:
        name = self.proxy.redacted()
        method = 2 if self.proxy.username is not None else 0  # RFC 1929 username/password, or none
        writer.write(bytes([5, 1, method]))
        version, chosen = await reader.readexactly(2)
        if version != 5 or chosen != method:
            raise Refused(f"upstream proxy {name} does not accept this login method", kind="upstream")
        if method == 2:
            user, password = (self.proxy.username or "").encode(), (self.proxy.password or "").encode()
            writer.write(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
            if (await reader.readexactly(2))[1] != 0:
                raise Refused(f"upstream proxy {name} rejected this user's proxy credentials", kind="upstream")
        try:
            literal = ipaddress.ip_address(host)
            address = (bytes([1]) if literal.version == 4 else bytes([4])) + literal.packed
        except ValueError:
            encoded = host.encode("idna")
            address = bytes([3, len(encoded)]) + encoded
        writer.write(bytes([5, 1, 0]) + address + struct.pack("!H", port))
        _v, reply, _rsv, atyp = await reader.readexactly(4)
        if reply != 0:
            raise Refused(f"upstream proxy {name} refused {host}:{port}: {_SOCKS_ERRORS.get(reply, reply)}",
                          kind="upstream")
        skip = {1: 4, 4: 16}.get(atyp) or (await reader.readexactly(1))[0]
        await reader.readexactly(skip + 2)  # the bound address and port, unused


def route_for(mode: str, *, address: str | None = None, proxy_url: str | None = None) -> Route:
    """The route of an egress identity: `direct`, `address` (with its source address) or `proxy` (URL)."""
    if mode == "direct":
        return DirectRoute()
    if mode == "address":
        if not address:
            raise ValueError("address mode needs a source address")
        return DirectRoute(ipaddress.ip_address(address))
    if mode == "proxy":
        if not proxy_url:
            raise ValueError("proxy mode needs an upstream proxy URL")
        proxy = ProxyURL.parse(proxy_url)
        return HttpProxyRoute(proxy) if proxy.scheme == "http" else Socks5Route(proxy)
    raise ValueError(f"unknown egress mode {mode!r} (direct, address or proxy)")
