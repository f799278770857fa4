"""Archives to and from the API (workspace uploads and downloads), for polydev.client and the CLI."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The archive types POST /api/workspaces/upload takes, by file suffix. The server's tar finds out a tar's
# compression itself, so bzip2 and xz travel as application/x-tar.
ARCHIVE_TYPES = {".tar": "application/x-tar", ".tar.gz": "application/gzip", ".tgz": "application/gzip",
                 ".tar.bz2": "application/x-tar", ".tbz2": "application/x-tar", ".tar.xz": "application/x-tar",
                 ".txz": "application/x-tar", ".zip": "application/zip"}
CHUNK = 64 * 1024


@dataclass
class Download:
    """An archive on its way from the server: its file name (from Content-Disposition), its size when the
    server said (a workspace archive is made as it is sent, so usually not), and its bytes as they come."""
    filename: str
    size: int | None
    chunks: Iterator[bytes]


def archive_type(path: str | Path) -> str | None:
    """The Content-Type to upload the archive at `path` with, from its suffix; None for anything else."""
    name = str(path).lower()
    return next((kind for suffix, kind in ARCHIVE_TYPES.items() if name.endswith(suffix)), None)


def counted(chunks: Iterable[bytes], progress: Callable[[int], None] | None) -> Iterator[bytes]:
    for chunk in chunks:
        if progress is not None:
            progress(len(chunk))
        yield chunk


_DISPOSITION = re.compile(r'filename="?([^";]+)"?')


def filename_from(disposition: str | None, fallback: str) -> str:
    """The file name the server suggests, reduced to a plain name: never a path that could lead elsewhere."""
    found = _DISPOSITION.search(disposition or "")
    name = Path(found.group(1)).name if found else ""
    return name if name not in ("", ".", "..") else f"{fallback}.tar.gz"
