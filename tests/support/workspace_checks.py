"""Shared by the workspace tests on real VMs: the live server's settings, a user's API client, archives."""

from __future__ import annotations

import io
import tarfile

import httpx

from polydev.vm import images
from tests.support.e2b_checks import new_user


def vm_env(image: images.Image, **extra: str) -> dict[str, str]:
    """A live server's environment for workspaces on the test image: small VMs, no warm pool."""
    return {"POLYDEV_CACHE_DIR": str(image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
            "VM_CLI_MEMORY_MB": "512", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0", **extra}


def user_api(url: str, admin_token: str, name: str, timeout: float = 300) -> httpx.Client:
    """A new user, and an API client with their token."""
    return httpx.Client(base_url=url, timeout=timeout,
                        headers={"Authorization": f"Bearer {new_user(url, admin_token, name)}"})


def state(api: httpx.Client, workspace_id: str) -> str:
    return str(api.get(f"/api/workspaces/{workspace_id}").json()["state"])


def targz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def untar(archive: bytes) -> dict[str, bytes]:
    """A tar.gz's regular files by path (without a leading ./)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}
