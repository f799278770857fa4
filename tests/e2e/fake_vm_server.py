"""`polydev serve`, but with the engine's backend replaced by a stand-in whose guest is the real agent as a
host process (tests/agent_backend.py).

Run as `python -m tests.e2e.fake_vm_server` from the repository root, with the same environment as
`polydev serve`. Everything else (settings, lifespan, reconcile, reaper, routes) is the real server's, so
VM routes can be driven over real HTTP on a machine with no image, without booting anything.
"""

from __future__ import annotations

import uvicorn

from polydev.api.app import create_app
from polydev.config import get_settings
from polydev.logging import configure_logging
from tests.agent_backend import AgentBackend


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    app = create_app(settings, backend_factory=lambda _settings: AgentBackend())
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
