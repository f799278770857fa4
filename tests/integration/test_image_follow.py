"""A running server following the active image (core/image_follow.py, VMEngine.switch_image), on the stand-in
hypervisor with cached images that were never built (tests/support/image_fakes.py): the switch happens once
the pointer moves, new VMs and the warm pool's come from the new image, VMs in use stay, the pre-started
logins are renewed, and the old image with its snapshots goes only once no VM's disk is on it. A backend
that cannot switch, or pinned versions, stop the following."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from polydev.core.image_follow import ImageFollower
from polydev.services import Services
from polydev.store.leases import LeaseRepo
from polydev.store.vms import CleanupTaskRepo, VmRepo
from polydev.vm import image_updates, images
from polydev.vm.engine import VMEngine
from polydev.vm.types import BackendInfo, Started, VMSpec
from tests.support.engine_fakes import FakeBackend
from tests.support.image_fakes import fake_built


class ImageBackend(FakeBackend):
    """The stand-in hypervisor with an image, which it writes into each VM's disk metadata like QEMU's."""

    def __init__(self, image: images.Image) -> None:
        super().__init__()
        self.image = image

    def use_image(self, image: images.Image) -> None:
        self.image = image

    def describe(self) -> BackendInfo:
        return BackendInfo(image_hash=self.image.hash, image_clis=dict(self.image.manifest.get("clis") or {}))

    async def start(self, spec: VMSpec) -> Started:
        started = await super().start(spec)
        (spec.workdir / "disk.json").write_text(json.dumps({"image": str(self.image.dir), "backing": None}))
        return started


@pytest.fixture
async def stage(services: Services) -> AsyncIterator[tuple[VMEngine, ImageBackend, images.Image, images.Image]]:
    cache = services.settings.cache_dir
    old = fake_built(cache, images.recipe_for("test"))
    new = fake_built(cache, images.recipe_for("test", {"codex": "0.180.0"}))
    backend = ImageBackend(old)
    engine = VMEngine(backend=backend, vms=VmRepo(services.factory), cleanup=CleanupTaskRepo(services.factory),
                      leases=LeaseRepo(services.factory), data_dir=services.settings.data_dir, pool_size=1)
    yield engine, backend, old, new
    await engine.close()


async def test_the_server_follows_the_active_image_and_removes_the_old_one_once_unused(
        services: Services, stage: tuple[VMEngine, ImageBackend, images.Image, images.Image]) -> None:
    engine, backend, old, new = stage
    cache, data = services.settings.cache_dir, services.settings.data_dir
    renewed: list[int] = []

    async def renew_logins() -> int:
        renewed.append(1)
        return 2

    follower = ImageFollower(lambda: engine, renew_logins, cache_dir=cache, data_dir=data, profile="test",
                             pinned=False)
    assert await engine.fill_pool() == 1
    pooled_before = engine.pool.ready[0]
    in_use = await engine.create(None, "cli", ttl=timedelta(minutes=5))  # the pool's VM, handed out
    assert in_use.id == pooled_before
    old_snapshot = data / "snapshots" / "0123456789abcdef"
    old_snapshot.mkdir(parents=True)
    (old_snapshot / "meta.json").write_text(json.dumps({"image": old.hash}))
    assert await follower.check() is False  # nothing active yet: nothing to follow

    image_updates.activate(cache, new)
    assert await engine.fill_pool() == 1
    stale_pool_vm = engine.pool.ready[0]
    assert await follower.check() is True
    assert engine.describe().image_hash == new.hash and renewed == [1]
    assert stale_pool_vm not in engine.pool.ready and await engine.get(stale_pool_vm) is not None  # replaced
    assert (await engine.get(stale_pool_vm)).status == "destroyed"  # type: ignore[union-attr]
    fresh = await engine.create(None, "cli", ttl=timedelta(minutes=5))
    assert json.loads((engine.workdir(fresh.id) / "disk.json").read_text())["image"] == str(new.dir)
    # The VM handed out before the switch runs on, on the old image, which stays while it does.
    assert (await engine.get(in_use.id)).status == "running"  # type: ignore[union-attr]
    assert await follower.check() is False and old.dir.is_dir() and old_snapshot.is_dir()
    await engine.destroy(in_use.id)
    await follower.check()
    assert not old.dir.exists() and not old_snapshot.exists() and new.dir.is_dir()
    assert follower.retired == []


async def test_pinned_versions_or_a_backend_that_cannot_switch_stop_the_following(
        services: Services, stage: tuple[VMEngine, ImageBackend, images.Image, images.Image]) -> None:
    engine, backend, old, new = stage
    cache, data = services.settings.cache_dir, services.settings.data_dir
    image_updates.activate(cache, new)

    async def renew_logins() -> int:
        raise AssertionError("no switch, no renewal")

    pinned = ImageFollower(lambda: engine, renew_logins, cache_dir=cache, data_dir=data, profile="test", pinned=True)
    assert await pinned.check() is False and engine.describe().image_hash == old.hash
    del ImageBackend.use_image  # a backend without it (Firecracker's plain root file system)
    try:
        unable = ImageFollower(lambda: engine, renew_logins, cache_dir=cache, data_dir=data, profile="test",
                               pinned=False)
        assert await unable.check() is False and unable.pinned and engine.describe().image_hash == old.hash
    finally:
        ImageBackend.use_image = lambda self, image: setattr(self, "image", image)  # type: ignore[method-assign]


def test_a_vm_work_directory_that_does_not_name_its_image_keeps_every_image(tmp_path: Path) -> None:
    old = fake_built(tmp_path / "cache", images.recipe_for("test"))
    follower = ImageFollower(lambda: None, lambda: None, cache_dir=tmp_path / "cache",  # type: ignore[arg-type,return-value]
                             data_dir=tmp_path / "data", profile="test", pinned=False)
    workdir = tmp_path / "data" / "vms" / str(uuid.uuid4())
    workdir.mkdir(parents=True)
    (workdir / "hibernated.json").write_text(json.dumps({"backing": None}))  # from before images were named
    follower.retired.append(old)
    follower._remove_unused()
    assert old.dir.is_dir() and follower.retired == [old]
