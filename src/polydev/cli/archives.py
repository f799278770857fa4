"""Local archive handling for the workspace commands: a directory packed for upload, and a downloaded
workspace unpacked without letting it write anywhere but where it was asked to."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO


class ArchiveError(Exception):
    """An archive that cannot be unpacked safely (a member would land outside the destination), or at all."""


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The server unpacks as its own user (--no-same-owner): local user and group names would only leak.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_directory(directory: Path, out: IO[bytes]) -> int:
    """Write `directory`'s contents (everything, .git included: a workspace keeps its history) to `out` as
    a tar.gz, with names relative to it; returns how many entries were written. Symbolic links are stored as
    links; sockets and other special files are skipped by tarfile."""
    count = 0

    def counted(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal count
        count += 1
        return _anonymous(info)

    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        # Each child on its own (not "."): no entry for the top directory, whose mode and times would
        # otherwise be forced onto the workspace's root.
        for child in sorted(directory.iterdir()):
            tar.add(child, arcname=child.name, filter=counted)
    return count


def safe_extract(archive: IO[bytes], dest: Path) -> int:
    """Unpack the tar (any compression) in `archive` into `dest`; returns how many members were unpacked.
    Every member is checked before anything is written (tarfile's `data` filter: no absolute paths, no
    `..` or links leading out of `dest`, no device files), and checked again as it is written, since a
    link unpacked earlier could otherwise redirect a later member."""
    dest.mkdir(parents=True, exist_ok=True)
    root = str(dest.resolve())
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
                tarfile.data_filter(member, root)
            tar.extractall(root, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise ArchiveError(f"refused to unpack the archive: {exc}") from None
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a readable archive: {exc}") from None
    return len(members)
