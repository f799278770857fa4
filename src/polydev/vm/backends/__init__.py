"""Hypervisor backends behind the engine's `Backend` protocol (see polydev.vm.engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polydev.config import Settings
    from polydev.vm.engine import Backend


class BackendUnavailable(Exception):
    """The configured backend cannot run VMs here; the message says why and what to do."""


def create_backend(settings: Settings) -> Backend:
    """The backend VM_BACKEND names, ready to start VMs, or BackendUnavailable with the reason."""
    if settings.vm_backend == "qemu":
        from polydev.vm.backends.qemu import QemuBackend

        return QemuBackend.from_settings(settings)
    from polydev.vm.backends.firecracker_backend import FirecrackerBackend

    return FirecrackerBackend.from_settings(settings)
