"""A `polydev serve` process booting real VMs on the `full` image (Xtigervnc + Chromium for logins), wired
to the stand-ins through the egress gateway (tests/standins/vm.py), with the providers' sign-in
pages in front of the OAuth stand-in (tests/standins/signin.py) so the VM's Chromium has a page to show
and a button to click. Shared by tests/vm/test_dashboard_vm.py and bench/login_visible.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polydev.config import Settings
from polydev.vm import images
from polydev.web.vendor import vendor_root
from tests.standins.signin import SignInPages
from tests.standins.vm import VmStandins
from tests.support.live_server import LiveServer, start_server


@dataclass
class VmStand:
    server: LiveServer
    standins: VmStandins

    @property
    def sign_in(self) -> SignInPages:
        return self.standins.oauth_app


def full_image_missing() -> str | None:
    """Why full-image VM tests cannot run here, or None (the image is built when missing: seconds when only
    the guest code changed, minutes from scratch)."""
    if os.environ.get("POLYDEV_SKIP_VM_TESTS") == "1" or os.environ.get("POLYDEV_SKIP_FULL_IMAGE") == "1":
        return "POLYDEV_SKIP_VM_TESTS=1 or POLYDEV_SKIP_FULL_IMAGE=1"
    for tool in ("qemu-system-x86_64", "qemu-img", "socat"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (VM tests need QEMU, and socat for the egress gateway's forward)"
    if os.geteuid() != 0:
        return "the stand-ins' TLS front listens on port 443 of a loopback address, which needs root"
    try:
        images.ensure(Settings().cache_dir, "full",
                      lambda stage, line: print(f"[image {stage}] {line}", file=sys.stderr))
    except Exception as exc:  # noqa: BLE001 - whatever stops the build is the reason
        return f"the full image (Xtigervnc + Chromium) is not available: {exc}"
    return None


def _env(settings: dict[str, object]) -> dict[str, str]:
    """VmStandins' settings as the server's environment variables."""
    return {name.upper(): json.dumps(value) if isinstance(value, dict) else str(value)
            for name, value in settings.items()}


def vm_stand(root: Path, **extra_env: str) -> Iterator[VmStand]:
    here = Settings()
    with VmStandins(root / "standins", oauth_app=SignInPages) as standins:
        env = {**_env(standins.settings()),
               "POLYDEV_CACHE_DIR": str(here.cache_dir),  # where the full image is
               "POLYDEV_WEB_VENDOR_DIR": str(vendor_root(here)),
               "VM_IMAGE_PROFILE": "full", "VM_WARM_POOL_SIZE": "0", "LOGIN_BROWSER": "on",
               "LOGIN_TIMEOUT_SECONDS": "900", **extra_env}
        running = start_server(root, "polydev", env)
        try:
            yield VmStand(next(running), standins)
        finally:
            running.close()  # stops the server, which destroys its VMs
