"""Run the stand-ins as a process: ``python -m tests.standins [--host H] [--api-port N] [--proxy-port N] ...``.

For VM tests and manual checks. Prints one JSON line (the URLs, ports and the CA path) when everything
accepts connections, then serves until SIGTERM/SIGINT. ``--script`` takes a JSON object with the fields of
:class:`tests.standins.api.Script` (``tool`` as ``{"name": ..., "arguments": {...}}``). Listens where told,
by default 127.0.0.1 only; run it inside a namespace with ``ip netns exec`` to keep it there.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import threading
from pathlib import Path

from tests.standins import api, oauth
from tests.standins.proxy import ConnectProxy
from tests.standins.server import StandinLoop
from tests.standins.tls import TestCA


def _script(raw: str | None) -> api.Script:
    if not raw:
        return api.Script()
    data = json.loads(raw)
    tool = data.pop("tool", None)
    reject = set(data.pop("reject_tokens", []))
    script = api.Script(**data, reject_tokens=reject)
    if tool:
        script.tool = api.ToolCall(tuple(tool["name"]) if isinstance(tool["name"], list) else tool["name"],
                                   tool.get("arguments", {}))
    return script


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.standins")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=0)
    p.add_argument("--oauth-port", type=int, default=0)
    p.add_argument("--proxy-port", type=int, default=0)
    p.add_argument("--ca-dir", type=Path, default=None)
    p.add_argument("--script", default=None, help="JSON object with Script fields")
    args = p.parse_args(argv)

    loop = StandinLoop()
    state = api.StandinState(_script(args.script))
    api_port = loop.serve_asgi(api.create_app(state), args.host, args.api_port)
    oauth_state = oauth.OAuthState()
    oauth_port = loop.serve_asgi(oauth.create_app(oauth_state), args.host, args.oauth_port)
    ca = TestCA(args.ca_dir or Path(tempfile.mkdtemp(prefix="polydev-standins-ca-")))
    proxy = ConnectProxy(ca, args.host, oauth_port)
    proxy_port = loop.run(proxy.start(args.host, args.proxy_port))
    loop.add_closer(proxy.close)
    print(json.dumps({"api_url": f"http://{args.host}:{api_port}", "proxy_url": f"http://{args.host}:{proxy_port}",
                      "oauth_port": oauth_port, "ca_cert": str(ca.cert_path)}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    loop.close()


if __name__ == "__main__":
    main()
