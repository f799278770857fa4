"""Hypervisor backends behind the engine's `Backend` protocol (polydev.vm.types): `qemu` and `firecracker`,
a package each. This module only picks one; it imports neither (nor the settings) until asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polydev.config import Settings
    from polydev.vm.types import Backend


class BackendUnavailable(Exception):
    """The configured backend cannot run VMs here; the message says why and what to do."""


def create_backend(settings: Settings) -> Backend:
    """The backend VM_BACKEND names, ready to start VMs, or BackendUnavailable with the reason."""
    if settings.vm_backend == "qemu":
        from polydev.vm.backends.qemu.backend import QemuBackend

        return QemuBackend.from_settings(settings)
    from polydev.vm.backends.firecracker.backend import FirecrackerBackend

    return FirecrackerBackend.from_settings(settings)
