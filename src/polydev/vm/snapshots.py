"""The snapshot cache both backends keep: a booted guest frozen with its agent running, made once per key
and restored into every later VM of that key.

One directory per key under the cache's root, named by a hash of everything the snapshot depends on (what
goes in the key is the backend's business: image, size, hypervisor release, guest network layout, ...), so a
change anywhere simply finds no snapshot and makes a new one. A snapshot is made at most once at a time per
machine (a file lock per key; per process also an asyncio lock, so one coroutine waits for the file lock and
the others wait on it), in a sibling `<key>.tmp` directory that is renamed into place once complete: a crash
mid-way leaves no half-made snapshot, and `meta.json` exists only in a complete one. Every snapshot holds
`template.token` (0600): the token the frozen agent holds, which each restored VM replaces at once with its
own (polydev.vm.handover).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

META = "meta.json"
TOKEN = "template.token"


@dataclass(frozen=True)
class Workspace:
    """Where a snapshot is being made."""

    directory: Path  # where it will be once complete: files may name it already, though nothing is there yet
    work: Path  # where it is made; renamed to `directory` once complete

    @property
    def scratch(self) -> Path:
        """The template VM's own work directory: not kept."""
        return self.work / "boot"


@dataclass(frozen=True)
class Template:
    """What a snapshot maker hands back once the snapshot's files are in the workspace."""

    token: str  # the token the frozen agent holds
    meta: dict[str, Any]  # recorded in meta.json, beside how long the making took


@dataclass(frozen=True)
class SnapshotDir:
    """A made snapshot, by its directory. Each backend's `Snapshot` subclasses it and names the files it holds
    with `SnapshotFile`."""

    directory: Path

    @property
    def token(self) -> str:
        """The token the frozen agent holds (each restored VM replaces it with its own)."""
        return SnapshotCache.token(self.directory)


class SnapshotFile:
    """One file of a snapshot, as a read-only attribute of a `SnapshotDir`: `state = SnapshotFile("state.bin")`
    reads as `snapshot.directory / "state.bin"`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, snapshot: SnapshotDir, owner: object = None) -> Path:
        return snapshot.directory / self.name


class SnapshotCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def directory(self, *key: object) -> Path:
        """The directory of the snapshot that `key` (JSON values) describes."""
        return self.root / hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:16]

    @staticmethod
    def complete(directory: Path) -> bool:
        return (directory / META).exists()

    @staticmethod
    def meta(directory: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((directory / META).read_text())
        return data

    @staticmethod
    def token(directory: Path) -> str:
        return (directory / TOKEN).read_text().strip()

    def discard(self, directory: Path) -> None:
        """Drop a snapshot that no longer restores (the next VM of its key makes it afresh)."""
        shutil.rmtree(directory, ignore_errors=True)

    def ensure(self, directory: Path, make: Callable[[Workspace], Template]) -> Path:
        """The snapshot in `directory`, made by `make` unless it exists. Blocking: call it in a thread."""
        if self.complete(directory):
            return directory
        with self._file_lock(directory) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.complete(directory):
                return directory
            with self._workspace(directory) as space:
                started = time.monotonic()
                self._commit(space, make(space), started)
        return directory

    async def ensure_async(self, directory: Path, make: Callable[[Workspace], Awaitable[Template]]) -> Path:
        """`ensure` from the event loop, for a maker that is a coroutine."""
        if self.complete(directory):
            return directory
        async with self._locks.setdefault(directory.name, asyncio.Lock()):
            if self.complete(directory):
                return directory
            with self._file_lock(directory) as lock:
                # Opening a local lock file is instant; only the wait for the lock goes to a thread.
                await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
                if self.complete(directory):
                    return directory
                with self._workspace(directory) as space:
                    started = time.monotonic()
                    template = await make(space)
                    await asyncio.to_thread(self._commit, space, template, started)
        return directory

    @contextmanager
    def _file_lock(self, directory: Path) -> Iterator[Any]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The lock file stays: removing it would let a waiter lock a file another process just replaced.
        with open(self.root / f".lock-{directory.name}", "w") as lock:
            yield lock

    @contextmanager
    def _workspace(self, directory: Path) -> Iterator[Workspace]:
        work = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)  # an earlier attempt's, cut short by a crash
        work.mkdir(mode=0o700)
        try:
            yield Workspace(directory, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone once renamed; otherwise a failed attempt's

    def _commit(self, space: Workspace, template: Template, started: float) -> None:
        fd = os.open(space.work / TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(template.token)
        seconds = round(time.monotonic() - started, 2)
        (space.work / META).write_text(json.dumps({**template.meta, "seconds": seconds}))
        shutil.rmtree(space.scratch, ignore_errors=True)
        shutil.rmtree(space.directory, ignore_errors=True)  # a stale one without meta.json
        os.replace(space.work, space.directory)
        log.info("snapshot_made", **{**template.meta, "directory": str(space.directory), "seconds": seconds})
