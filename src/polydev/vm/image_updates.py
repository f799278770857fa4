"""Following the CLIs: which image is active, and which newer CLI versions the npm registry has.

The active image of a profile is the one `polydev image update` built, tested and made active: a pointer file
`images/active-<profile>.json` beside the images, written last (atomically) once the image has passed its
test, so a failed build or test leaves the one in use untouched. A server uses it from its start, and a
running one switches to it (core/image_follow.py), unless POLYDEV_CLI_VERSIONS pins versions (then those are
the image: explicit configuration wins); with neither, the release's tested versions (vm/images.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from polydev.config.cli_versions import version_key
from polydev.vm import images


@dataclass(frozen=True)
class Update:
    provider: str
    package: str
    current: str | None  # in the image (its manifest); None when the image does not say
    latest: str

    @property
    def newer(self) -> bool:
        return self.current != self.latest and version_key(self.latest) > version_key(self.current or "0")


def pointer(cache_dir: Path, profile: str) -> Path:
    return images.images_dir(cache_dir) / f"active-{profile}.json"


def active(cache_dir: Path, profile: str) -> images.Image | None:
    """The image `polydev image update` made active for `profile`, if it is still in the cache."""
    try:
        data = json.loads(pointer(cache_dir, profile).read_text())
    except (OSError, ValueError):
        return None
    image_hash = data.get("hash") if isinstance(data, dict) else None
    if not isinstance(image_hash, str) or image_hash.startswith(".") or "/" in image_hash:
        return None
    image = images.Image.load(images.images_dir(cache_dir) / image_hash)
    return image if image is not None and image.profile == profile else None


def activate(cache_dir: Path, image: images.Image) -> None:
    """Make `image` the active one of its profile (replacing the pointer in one rename)."""
    target = pointer(cache_dir, image.profile)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"hash": image.hash, "clis": image.manifest.get("clis", {}),
                               "activated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    os.replace(tmp, target)


def in_use(cache_dir: Path, profile: str, versions: Mapping[str, str] | None = None) -> images.Image | None:
    """The image a server starting now uses: the one POLYDEV_CLI_VERSIONS pins when it pins any, else the
    active one, else the tested versions' (None when that one is not built)."""
    if not versions and (found := active(cache_dir, profile)) is not None:
        return found
    return images.find_configured(cache_dir, profile, versions)


def updates(image: images.Image | None, resolve: Callable[[str], str] | None = None) -> list[Update]:
    """Each CLI's version in `image` beside the registry's latest (`resolve`, default npm; VersionUnresolved
    when it cannot tell)."""
    resolve = resolve or images.npm_latest
    have = dict(image.manifest.get("clis") or {}) if image is not None else {}
    return [Update(provider, package, str(have[package]) if package in have else None, resolve(package))
            for provider, package in images.CLI_PROVIDERS.items()]


def latest_versions(found: list[Update]) -> dict[str, str]:
    """POLYDEV_CLI_VERSIONS-style versions for an image with every CLI at the registry's latest."""
    return {u.provider: u.latest for u in found}
