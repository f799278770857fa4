"""A running server follows the image `polydev image update` made active (vm/image_updates.py), with no downtime.

Every few seconds it looks at the active image of its profile. Once that is another than the one its engine
starts VMs from, new VMs come from it (their own snapshot, made by the first one), the warm pool's ready VMs
and the pre-started logins nobody took are replaced, and everything in use goes on where it is: a login in
progress completes, a run streams to its end, a paused workspace or sandbox wakes on the image it was started
from (its metadata says which). The image switched away from, and its snapshots, are removed once no VM of
this server's data directory uses them any more. With POLYDEV_CLI_VERSIONS set nothing is followed: the
pinned versions are the image.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from polydev.core.ports import VmPort
from polydev.core.tasks import every
from polydev.vm import image_updates, images

log = structlog.get_logger(__name__)

FOLLOW_S = 15.0
VM_METAS = ("disk.json", "hibernated.json")  # what a VM's work directory says its disk is (qemu backend)


class ImageFollower:
    def __init__(self, engine: Callable[[], VmPort | None], renew_logins: Callable[[], Awaitable[int]], *,
                 cache_dir: Path, data_dir: Path, profile: str, pinned: bool) -> None:
        self._engine = engine
        self._renew_logins = renew_logins
        self.cache_dir = cache_dir
        self.data_dir = data_dir
        self.profile = profile
        self.pinned = pinned
        self.retired: list[images.Image] = []  # switched away from, not yet removed
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Switch to the active image if it is new; remove retired images nothing uses. True on a switch."""
        switched = False
        engine = self._engine()
        target = None if self.pinned or engine is None else image_updates.active(self.cache_dir, self.profile)
        if engine is not None and target is not None:
            current = engine.describe().image_hash
            if current is not None and target.hash != current:
                try:
                    replaced = await engine.switch_image(target)
                except ValueError as exc:
                    log.warning("image_switch_unsupported", reason=str(exc))
                    self.pinned = True  # (this backend never will: stop looking)
                    return False
                logins = await self._renew_logins()
                old = images.Image.load(images.images_dir(self.cache_dir) / current)
                if old is not None:
                    self.retired.append(old)
                log.info("image_followed", image=target.hash, previous=current, pooled_vms=replaced,
                         pre_started_logins=logins)
                switched = True
        await asyncio.to_thread(self._remove_unused)
        return switched

    def start(self, interval: float = FOLLOW_S) -> None:
        if self._task is None and not self.pinned:
            self._task = every(interval, self.check, "image-follow")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- removal ------------------------------------------------------------------------------------------
    def _remove_unused(self) -> None:
        for old in list(self.retired):
            snapshots = self._snapshots_of(old)
            if self._in_use(old, snapshots):
                continue
            for directory in snapshots:
                shutil.rmtree(directory, ignore_errors=True)
            images.remove(self.cache_dir, old.hash)
            self.retired.remove(old)
            log.info("image_removed", image=old.hash, snapshots=len(snapshots))

    def _snapshots_of(self, image: images.Image) -> list[Path]:
        root = self.data_dir / "snapshots"
        found = []
        for meta in root.glob("*/meta.json") if root.is_dir() else []:
            try:
                if json.loads(meta.read_text()).get("image") == image.hash:
                    found.append(meta.parent)
            except (OSError, ValueError):
                continue
        return found

    def _in_use(self, image: images.Image, snapshots: list[Path]) -> bool:
        """Whether a VM work directory (running, hibernated, kept after a crash) has its disk on `image` or on
        one of its snapshots; one that does not say is taken as using it."""
        for workdir in (self.data_dir / "vms").iterdir() if (self.data_dir / "vms").is_dir() else []:
            for name in VM_METAS:
                try:
                    meta = json.loads((workdir / name).read_text())
                except (OSError, ValueError):
                    continue
                if meta.get("image") in (None, str(image.dir)):
                    return True
                backing = (meta.get("backing") or [""])[0]
                if any(str(backing).startswith(str(s) + "/") for s in snapshots):
                    return True
        return False
