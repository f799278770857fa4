"""Cached images without a build: the files an image directory holds, and the manifest a build writes."""

from __future__ import annotations

import json
from pathlib import Path

from polydev.vm import images


def fake_image(cache: Path, recipe: images.Recipe) -> Path:
    d = images.images_dir(cache) / recipe.hash
    d.mkdir(parents=True)
    for name in (images.ROOTFS, images.KERNEL, images.INITRD):
        (d / name).write_bytes(b"x")
    (d / images.MANIFEST).write_text(json.dumps({"recipe": recipe.to_json(), "built_at": "2026-01-01T00:00:00Z"}))
    return d


def fake_built(cache: Path, recipe: images.Recipe) -> images.Image:
    """A cached image whose manifest names its CLIs, as a build writes it."""
    d = fake_image(cache, recipe)
    manifest = json.loads((d / images.MANIFEST).read_text())
    manifest.update(recipe=recipe.to_json(), clis=dict(recipe.clis))
    (d / images.MANIFEST).write_text(json.dumps(manifest))
    image = images.Image.load(d)
    assert image is not None
    return image
