"""What the Firecracker modules raise."""

from __future__ import annotations

from collections.abc import Sequence


class FirecrackerError(RuntimeError):
    """Base class: anything that went wrong running Firecracker."""


class FirecrackerUnavailable(FirecrackerError):
    """This machine cannot run Firecracker; `reason` says why in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Firecracker is unavailable: {reason}")
        self.reason = reason


class FirecrackerAPIError(FirecrackerError):
    """Firecracker answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"Firecracker {method} {path} failed ({status}): {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class FirecrackerProcessError(FirecrackerError):
    """The Firecracker process failed to come up or died; carries the last console/log lines."""

    def __init__(self, message: str, console_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(console_tail)
        super().__init__(f"{message}\n--- firecracker output (last lines) ---\n{tail}" if tail else message)
        self.console_tail = list(console_tail)
