"""What the QEMU backend raises."""

from __future__ import annotations


class VMError(RuntimeError):
    """A VM that did not come up (or could not be snapshotted); carries the console's last lines."""

    def __init__(self, message: str, console_tail: list[str] | None = None) -> None:
        tail = "\n".join(console_tail or [])
        super().__init__(f"{message}\n--- console (last lines) ---\n{tail}" if tail else message)
        self.console_tail = console_tail or []
