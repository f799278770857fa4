"""The stand-ins for real VMs, reached by the guests through the egress gateway and nothing else.

    with VmStandins(tmp / "standins") as si:
        settings = Settings(**si.settings(), ...)   # pins, CA, Codex's API base URL

The guests keep QEMU user networking with restrict=on and no forwards of the tests' making: their CLIs (and
the login Chromium) use the gateway as their proxy, as on any server. The settings pin every provider host
(EGRESS_HOSTS) to the TLS front (tests/standins/front.py) on a loopback address of its own, which presents a
certificate from the test CA (GUEST_CA_CERT_FILE) and hands the model calls to the API stand-in and the rest
to the OAuth stand-in. With EGRESS_RESOLVE=pinned nothing else resolves: no DNS query leaves the host.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from polydev.providers import ADAPTERS
from tests.standins import api, oauth
from tests.standins.front import FRONT_ADDRESS, TlsFront, front_app
from tests.standins.server import StandinLoop
from tests.standins.tls import TestCA

PROVIDERS = ("claude_code", "codex", "gemini_cli")
# Codex signed in with ChatGPT calls chatgpt.com's backend by default, which the API stand-in does not play:
# its runs are sent to the Responses API under its real name (a host on Codex's allow-list).
API_BASE_URLS = {"codex": "https://api.openai.com"}


def provider_hosts() -> set[str]:
    """Every host a provider's login or run may reach (providers/catalog.toml)."""
    return {host for adapter in ADAPTERS.values() for hosts in adapter.egress_hosts.values() for host in hosts}


class VmStandins:
    def __init__(self, workdir: Path, script: api.Script | None = None,
                 oauth_app: Callable[[oauth.OAuthState], Any] = oauth.create_app) -> None:
        """`oauth_app` builds the ASGI app behind the front for everything but the model calls (e.g.
        tests/standins/signin.py's provider sign-in pages in front of the OAuth stand-in)."""
        self.loop = StandinLoop(None)
        try:
            self.api = api.StandinState(script)
            self.oauth = oauth.OAuthState()
            self.oauth_app = oauth_app(self.oauth)
            port = self.loop.serve_asgi(front_app(api.create_app(self.api), self.oauth_app), "127.0.0.1", 0)
            self.ca = TestCA(Path(workdir) / "ca")
            self.front = TlsFront(self.ca, "127.0.0.1", port)
            self.loop.run(self.front.start())
            self.loop.add_closer(self.front.close)
        except BaseException:
            self.loop.close()
            raise

    def settings(self) -> dict[str, Any]:
        """The settings that wire every guest, through the gateway, to these stand-ins and to nothing else."""
        return {"egress_hosts": {host: [FRONT_ADDRESS] for host in sorted(provider_hosts())}, "egress_resolve": "pinned",
                "guest_ca_cert_file": self.ca.cert_path, "provider_api_base_urls": dict(API_BASE_URLS)}

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
