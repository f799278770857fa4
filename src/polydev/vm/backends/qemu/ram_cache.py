"""The snapshot's memory file in the page cache, before a migration reads a restored VM's memory.

A VM restored from the snapshot maps the snapshot's memory file privately beneath the pages it writes itself.
Saving it (hibernate) or loading saved state into it (wake) reads every page of its memory, and each page the
VM never wrote faults in from that file one at a time while the file is not in the page cache (most of it is
holes: the guest's untouched memory). That made a sandbox's first pause take 5-7 s for a 1 GiB guest under TCG
here, the later ones ~0.3 s. Read ahead in one pass it is ~2 s when uncached, ~20 ms once cached
(bench/sandbox_bench.py); a new snapshot's file is read ahead in the background as soon as it is written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)
CHUNK = 64 << 20


def warm_in_background(path: Path) -> None:
    """Read a new snapshot's memory file ahead at the lowest priority, so the first pause of the first VM
    restored from it does not pay for it. The file is held open: its rename into place does not matter."""
    src = _open(path)
    if src is None:
        return

    def run() -> None:
        with src:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
            _read(src, path)
    threading.Thread(target=run, name="ram-read-ahead", daemon=True).start()


def read_ahead(path: Path) -> None:
    """Read `path` into the page cache: sendfile to /dev/null, so a file already cached costs no copy."""
    src = _open(path)
    if src is not None:
        with src:
            _read(src, path)


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except OSError as exc:  # only slower without it
        log.info("could not read the snapshot's memory file ahead: %s", exc)
        return None


def _read(src: BinaryIO, path: Path) -> None:
    started = time.monotonic()
    try:
        with open(os.devnull, "wb") as sink:
            offset, size = 0, os.fstat(src.fileno()).st_size
            while offset < size:
                sent = os.sendfile(sink.fileno(), src.fileno(), offset, min(size - offset, CHUNK))
                if sent <= 0:
                    break
                offset += sent
    except OSError as exc:  # only slower without it
        log.info("could not read the snapshot's memory file ahead: %s", exc)
    log.debug("read %s ahead in %.3f s", path.name, time.monotonic() - started)
