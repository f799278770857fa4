"""The stand-ins for real VMs: served on the host's loopback, reached by the guests only through
VM_GUEST_FORWARDS (QEMU user networking with restrict=on + guestfwd), never through a route out.

    with VmStandins(tmp / "standins") as si:
        settings = Settings(**si.settings(), ...)   # forwards, proxy, CA, API base URLs for all three CLIs

Inside a guest, 10.0.2.100:3128 is the CONNECT proxy (TLS terminated with the test CA, token endpoints
answered by the OAuth stand-in) and http://10.0.2.101 the model API stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from tests.standins import api, oauth
from tests.standins.proxy import ConnectProxy
from tests.standins.server import StandinLoop
from tests.standins.tls import TestCA

PROXY_GUEST = "10.0.2.100:3128"
API_GUEST = "10.0.2.101:80"
PROVIDERS = ("claude_code", "codex", "gemini_cli")


class VmStandins:
    def __init__(self, workdir: Path, script: api.Script | None = None,
                 oauth_app: Callable[[oauth.OAuthState], Any] = oauth.create_app) -> None:
        """`oauth_app` builds the ASGI app the proxy hands everything to (e.g. tests/standins/signin.py's
        provider sign-in pages in front of the OAuth stand-in)."""
        self.loop = StandinLoop(None)
        try:
            self.api = api.StandinState(script)
            self.api_port = self.loop.serve_asgi(api.create_app(self.api), "127.0.0.1", 0)
            self.oauth = oauth.OAuthState()
            self.oauth_app = oauth_app(self.oauth)
            oauth_port = self.loop.serve_asgi(self.oauth_app, "127.0.0.1", 0)
            self.ca = TestCA(Path(workdir) / "ca")
            self.proxy = ConnectProxy(self.ca, "127.0.0.1", oauth_port)
            self.proxy_port = self.loop.run(self.proxy.start("127.0.0.1", 0))
            self.loop.add_closer(self.proxy.close)
        except BaseException:
            self.loop.close()
            raise

    def settings(self) -> dict[str, Any]:
        """The settings that wire every guest to these stand-ins and to nothing else."""
        api_url = f"http://{API_GUEST.removesuffix(':80')}"
        return {"vm_guest_forwards": f"{PROXY_GUEST}=127.0.0.1:{self.proxy_port},{API_GUEST}=127.0.0.1:{self.api_port}",
                "guest_https_proxy": f"http://{PROXY_GUEST}", "guest_ca_cert_file": self.ca.cert_path,
                "provider_api_base_urls": {p: api_url for p in PROVIDERS}}

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
