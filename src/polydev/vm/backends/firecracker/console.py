"""A Firecracker process's stdout, which is the guest's serial console: copied, redacted and watched."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Console:
    """Firecracker's stdout (guest serial console and, unless configured otherwise, its own log): copied to a
    file kept for post-mortems, the tail kept in memory for error messages, the READY marker watched."""

    path: Path
    marker: str | None
    # Secrets the guest may echo (a kernel prints its command line, which can carry the agent token):
    # replaced before a line reaches the file or the tail, since both outlive the VM and end up in errors.
    redact: tuple[bytes, ...] = ()
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self, stream: asyncio.StreamReader) -> None:
        try:
            # Plain file writes: a line to a local file costs microseconds, less than a thread hop would.
            with open(self.path, "ab") as out:  # noqa: ASYNC230
                while raw := await stream.readline():
                    for secret in self.redact:
                        raw = raw.replace(secret, b"[redacted]")
                    out.write(raw)
                    out.flush()
                    line = raw.decode("utf-8", "replace").rstrip()
                    self.tail.append(line)
                    if self.marker and self.marker in line:
                        self.ready.set()
        finally:
            self.closed.set()
