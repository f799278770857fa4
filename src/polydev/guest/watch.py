"""POST /watch: answer the moment one of some paths holds a complete file.

Polling, not inotify: inotify needs ctypes, one watch per parent directory, and a re-arm when a directory that
does not exist yet is created (a CLI makes ~/.codex on first login). A stat of at most 16 paths every POLL_S
costs nothing next to the CLI being watched.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time

from polydev.guest.http import client_gone

POLL_S = 0.05
# A file counts as written once its size and mtime stayed the same this long: writers that stream a
# credential file out in several write() calls are not caught half way.
SETTLE_S = 0.1

_Seen = dict[str, tuple[tuple[int, int, int], float]]  # path -> ((inode, size, mtime_ns), first seen so)


def wait_for_file(paths: list[str], timeout: float, min_size: int,
                  client: socket.socket) -> tuple[str, os.stat_result] | None:
    """The first of `paths` that is a settled regular file of at least min_size bytes, or None at timeout.
    Raises BrokenPipeError when the client hangs up, so a forgotten watch does not poll on for minutes."""
    deadline = time.monotonic() + timeout
    seen: _Seen = {}
    watch_client = True
    while True:
        now = time.monotonic()
        for path in paths:
            st = _settled(path, min_size, seen, now)
            if st is not None:
                return path, st
        left = deadline - now
        if left <= 0:
            return None
        wait = min(POLL_S, left)
        if not watch_client:
            time.sleep(wait)
        elif select.select([client], [], [], wait)[0]:
            if client_gone(client):
                raise BrokenPipeError("client disconnected")
            watch_client = False  # it sent bytes we do not expect; stop watching rather than spin


def _settled(path: str, min_size: int, seen: _Seen, now: float) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except OSError:
        seen.pop(path, None)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size < min_size:
        seen.pop(path, None)
        return None
    key = (st.st_ino, st.st_size, st.st_mtime_ns)  # the inode too: a rename over it is a new file
    first = seen.get(path)
    if first is None or first[0] != key:
        seen[path] = (key, now)
        # Last modified long enough ago (an existing file, or one renamed into place): no need to watch it settle.
        return st if time.time() - st.st_mtime >= SETTLE_S else None
    return st if now - first[1] >= SETTLE_S else None
