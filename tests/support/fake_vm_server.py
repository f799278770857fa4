"""`polydev serve`, but with the engine's backend replaced by a stand-in whose guest is the real agent as a
host process (tests/support/agent_backend.py).

Run as `python -m tests.support.fake_vm_server` from the repository root, with the same environment as
`polydev serve`. Everything else (settings, lifespan, reconcile, reaper, routes) is the real server's, so
VM routes can be driven over real HTTP on a machine with no image, without booting anything.

With POLYDEV_TEST_FAKE_CLI=DIR, the claude_code adapter is the scripted CLI of tests/support/flow_fakes.py and the
"guest" paths live under DIR, so the login and run flows (and `polydev login` / `polydev run`) can be driven
end to end too.
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn

import polydev.api.app
from polydev.api.app import create_app
from polydev.config import get_settings
from polydev.logging import configure_logging
from tests.support.agent_backend import AgentBackend


def _host_guest(root: str, fake_cli: bool) -> None:
    """The "guest" is the host here: keep everything the flows write into a guest under `root`, never in
    the real home directory; optionally swap claude_code for the scripted CLI."""
    from polydev.providers import ADAPTERS
    from tests.support.flow_fakes import FakeAdapter, host_guest_paths

    if fake_cli:
        ADAPTERS["claude_code"] = FakeAdapter()  # type: ignore[assignment]
    real_open = polydev.api.app.open_services

    async def open_services(*args: Any, **kwargs: Any) -> Any:
        services = await real_open(*args, **kwargs)
        services.guest_paths = host_guest_paths(root)
        return services

    polydev.api.app.open_services = open_services  # type: ignore[assignment]


def main() -> None:
    # The "guest" is this host, which has no E2B `user` account: sandbox calls run as root unless told otherwise.
    os.environ.setdefault("SANDBOX_DEFAULT_USER", "root")
    settings = get_settings()
    fake_root = os.environ.get("POLYDEV_TEST_FAKE_CLI")
    _host_guest(fake_root or str(settings.data_dir / "guest"), fake_cli=bool(fake_root))
    configure_logging(settings.log_level)
    app = create_app(settings, backend_factory=lambda _settings: AgentBackend())
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
