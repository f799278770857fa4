"""`polydev serve` with real VMs (the QEMU engine on the `test` image) whose CLIs are the scripted stand-in of
tests/support/flow_fakes.py, run by the guest's own python3: every login and run boots (restores) a real VM,
writes real files into it through the real agent and runs a real process there, but the CLI answers in a
second instead of the real CLIs' tens of seconds under TCG, so the reliability suite (tests/reliability/) and
bench/load.py can drive tens of them at once.

Run as `python -m tests.support.scripted_vm_server` from the repository root, with the same environment as
`polydev serve`. All three providers are the scripted CLI (each under its own name), so one user can hold three
credentials and so three runs at once (a credential serves one run at a time).
"""

from __future__ import annotations

import uvicorn

from polydev.api.app import create_app
from polydev.config import PROVIDERS, get_settings
from polydev.logging import configure_logging

GUEST_PYTHON = "/usr/bin/python3"  # in the image for the agent (polydev.vm.images.BASE_PACKAGES)


def swap_providers() -> None:
    from polydev.providers import ADAPTERS
    from tests.support.flow_fakes import FakeAdapter

    for name in PROVIDERS:
        ADAPTERS[name] = FakeAdapter(name=name, interpreter=GUEST_PYTHON)  # type: ignore[assignment]


def main() -> None:
    settings = get_settings()
    swap_providers()
    configure_logging(settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
