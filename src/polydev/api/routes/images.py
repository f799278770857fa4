"""The guest image, for admins: the one this server's VMs use, the active one (`polydev image update`), builds in
progress, the cached images, and the CLIs' newer versions in the npm registry (`?check=true` asks it now; the
answer is kept for REGISTRY_CACHE_S).

    GET /api/images[?check=true]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from polydev.api.deps import AdminUser, ServicesDep
from polydev.vm import image_updates, images

router = APIRouter(prefix="/api/images", tags=["images"])
REGISTRY_CACHE_S = 600.0
_registry: dict[str, tuple[float, list[image_updates.Update] | str]] = {}  # image hash → (when, answer)


class ImageOut(BaseModel):
    hash: str
    profile: str
    clis: dict[str, str] = Field(description="npm package → version")
    built_at: str | None = None


class UpdateOut(BaseModel):
    provider: str
    package: str
    current: str | None
    latest: str
    newer: bool


class ImagesOut(BaseModel):
    profile: str
    in_use: ImageOut | None = Field(None, description="the image this server's new VMs start from")
    active: ImageOut | None = Field(None, description="the image `polydev image update` made active (servers "
                                    "switch to it within 15 s unless POLYDEV_CLI_VERSIONS pins versions)")
    building: list[str] = Field(description="image builds in progress in the cache (their work directories)")
    cached: list[ImageOut]
    updates: list[UpdateOut] | None = Field(None, description="each CLI in use beside the registry's latest; "
                                            "null until asked (?check=true) or when the registry did not answer")
    updates_error: str | None = None
    checked_at: float | None = None


def _out(image: images.Image | None) -> ImageOut | None:
    if image is None:
        return None
    clis: Any = image.manifest.get("clis") or {}
    return ImageOut(hash=image.hash, profile=image.profile, clis={str(k): str(v) for k, v in clis.items()},
                    built_at=str(image.manifest.get("built_at")) if image.manifest.get("built_at") else None)


@router.get("", response_model=ImagesOut, responses={403: {}})
async def list_images(_admin: AdminUser, services: ServicesDep,
                      check: bool = Query(False, description="ask the npm registry for the CLIs' latest versions "
                                          "now (else the last answer, if recent)")) -> ImagesOut:
    settings = services.settings
    cache = settings.cache_dir
    profile = settings.vm_image_profile
    cached = await asyncio.to_thread(images.list_images, cache)
    in_use_hash = services.engine.describe().image_hash if services.engine is not None else None
    in_use = next((i for i in cached if i.hash == in_use_hash), None)
    root = images.images_dir(cache)
    building = sorted(p.name for p in root.glob(".build-*")) if root.is_dir() else []
    out = ImagesOut(profile=profile, in_use=_out(in_use), active=_out(image_updates.active(cache, profile)),
                    building=building, cached=[o for i in cached if (o := _out(i)) is not None])
    key = in_use.hash if in_use is not None else ""
    known = _registry.get(key)
    if check or (known is not None and time.time() - known[0] < REGISTRY_CACHE_S):
        if check or known is None:
            try:
                answer: list[image_updates.Update] | str = await asyncio.to_thread(image_updates.updates, in_use)
            except images.VersionUnresolved as exc:
                answer = str(exc)
            known = _registry[key] = (time.time(), answer)
        when, answer = known
        out.checked_at = when
        if isinstance(answer, str):
            out.updates_error = answer
        else:
            out.updates = [UpdateOut(provider=u.provider, package=u.package, current=u.current, latest=u.latest,
                                     newer=u.newer) for u in answer]
    return out
