"""The egress gateway as a process of its own, for the namespace tests and the bench.

Run inside the namespace that plays the gateway host (`ip netns exec NS python -m tests.support.egress_stand
CONFIG.json`): its tunnels then leave from that namespace's addresses and routes, as the server's would from
the host's, while the tests still reach each VM's Unix socket from outside (a Unix socket belongs to the file
system, not to a network namespace). The users' egress identities come from the config file instead of the
store (a static RouteSource); everything else is the real EgressGateway.

CONFIG.json:
    {"run_dir": "/tmp/…", "ports": [443],
     "hosts": {"api.stand.test": ["203.0.113.10", "2001:db8:e9::10"]},       # pinned names (EGRESS_HOSTS)
     "allow": {"claude_code run": ["*.stand.test"]}, "extra": [], "open_purposes": [],
     "refused_networks": ["198.18.0.0/24"],
     "users": {"<uuid>": {"mode": "address", "address": "198.18.0.11", "proxy_url": null,
                          "limits": {"concurrent": 1}}},
     "vms": [{"vm_id": "<uuid>", "user_id": "<uuid>", "purpose": "run", "provider": "claude_code"}]}

Prints `vm <vm_id> <socket path>` for each VM, then `ready`. Then reads commands on stdin, one a line, each
answered with one line: `attach {identity json}` → `vm <vm_id> <path>`, `detach <vm_id>` → `detached <vm_id>`,
`usage` → the accounting since the last `usage` as a JSON list. Ends at the end of its input or when killed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import structlog

from polydev.egress.gateway import EgressGateway, Identity
from polydev.egress.limits import Limits
from polydev.egress.policy import Policy, Refused
from polydev.egress.resolve import Resolver
from polydev.egress.routes import Route, route_for


class StaticRoutes:
    """Each user's route and limits as the config file gives them; a user it does not name has no route."""

    def __init__(self, users: dict[str, dict[str, Any]]) -> None:
        self.users = {uuid.UUID(k): v for k, v in users.items()}

    async def route(self, user_id: uuid.UUID | None) -> tuple[Route, Limits]:
        spec = self.users.get(user_id) if user_id is not None else None
        if spec is None:
            raise Refused("this user has no egress identity in the stand's config", kind="upstream")
        route = route_for(spec["mode"], address=spec.get("address"), proxy_url=spec.get("proxy_url"))
        return route, Limits().merged(spec.get("limits"))


def identity(spec: dict[str, Any]) -> Identity:
    return Identity(uuid.UUID(spec["vm_id"]), uuid.UUID(spec["user_id"]) if spec.get("user_id") else None,
                    spec.get("purpose", "run"), spec.get("provider"), bool(spec.get("browser", False)))


def build(config: dict[str, Any]) -> EgressGateway:
    allow = {tuple(key.split(" ", 1)): tuple(patterns) for key, patterns in config.get("allow", {}).items()}
    policy = Policy(allow=allow, extra=tuple(config.get("extra", ())),  # type: ignore[arg-type]
                    open_purposes=frozenset(config.get("open_purposes", ())),
                    ports=frozenset(config.get("ports", (443,))),
                    refused_networks=tuple(ipaddress.ip_network(n) for n in config.get("refused_networks", ())))
    resolver = Resolver({name: tuple(addrs) for name, addrs in config.get("hosts", {}).items()})
    return EgressGateway(policy=policy, resolver=resolver, routes=StaticRoutes(config.get("users", {})),
                         run_dir=Path(config["run_dir"]))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _command(gw: EgressGateway, line: str) -> str:
    word, _, rest = line.strip().partition(" ")
    if word == "attach":
        ident = identity(json.loads(rest))
        return f"vm {ident.vm_id} {await gw.attach(ident)}"
    if word == "detach":
        await gw.detach(uuid.UUID(rest))
        return f"detached {rest}"
    if word == "usage":
        return json.dumps([{"user_id": str(d.user_id), "host": d.host, "connections": d.connections,
                            "bytes_up": d.bytes_up, "bytes_down": d.bytes_down, "refusals": d.refusals,
                            "last_refusal": d.last_refusal} for d in gw.usage.drain()])
    return f"error unknown command {word!r}"


async def serve(config: dict[str, Any]) -> None:
    gw = build(config)
    for spec in config.get("vms", ()):
        ident = identity(spec)
        _say(f"vm {ident.vm_id} {await gw.attach(ident)}")
    _say("ready")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if line.strip():
                _say(await _command(gw, line.decode()))
    finally:
        await gw.close()


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the protocol
    asyncio.run(serve(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
