"""Following a new CLI version on a live server with real VMs: an image built with Gemini CLI at another version
from the npm registry, made active while a VM of the old image is in use; the server switches within its
follow interval (no restart), new VMs come from the new image (its CLI at the new version), the VM in use runs
on on the old one, and the old image goes once no VM uses it.

The test's cache is its own (so the active pointer is too), with the download caches and the OS and base
layers shared with the machine's image cache: after the first run only the images themselves are assembled.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from polydev.vm import image_updates, images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.support.live_server import start_server
from tests.support.waits import eventually

pytest_plugins = ["tests.support.vm_fixtures"]

OTHER = "0.60.0"  # Gemini CLI, one release before the tested 0.61.0
SHARED = ("debs", "npm", "os", "base")  # downloads and layers: keyed by content, safe to share


def _cache(tmp: Path, shared: Path) -> Path:
    cache = tmp / "cache"
    cache.mkdir()
    for name in SHARED:
        (shared / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(shared / name)
    return cache


def _gemini_version(api: httpx.Client, vm_id: str) -> str:
    r = api.post(f"/api/vms/{vm_id}/exec", json={"args": [
        "cat", "/usr/local/lib/node_modules/@google/gemini-cli/package.json"]})
    assert r.status_code == 200, r.text
    return str(json.loads(r.json()["stdout"])["version"])


def test_a_running_server_follows_a_new_image_and_drops_the_old_one(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    cache = _cache(tmp_path, test_image.dir.parent.parent)
    old, _ = images.ensure(cache, "test")  # the tested versions (its base shared: assembled in seconds)
    new, _ = images.ensure(cache, "test", versions={"gemini_cli": OTHER})
    assert dict(new.manifest["clis"])["@google/gemini-cli"] == OTHER != dict(old.manifest["clis"])["@google/gemini-cli"]  # type: ignore[call-overload]
    env = {"POLYDEV_CACHE_DIR": str(cache), "VM_IMAGE_PROFILE": "test", "VM_CLI_MEMORY_MB": "512",
           "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "1"}
    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        api = httpx.Client(base_url=server.url, timeout=300,
                           headers={"Authorization": f"Bearer {server.admin_token}"})
        assert api.get("/api/images").json()["in_use"]["hash"] == old.hash
        busy = api.post("/api/vms", json={"purpose": "cli", "ttl_seconds": 900}).json()["id"]
        assert _gemini_version(api, busy) == "0.61.0"

        image_updates.activate(cache, new)  # what `polydev image update` does once the image passed its test
        assert eventually(lambda: api.get("/api/images").json()["in_use"]["hash"] == new.hash, timeout=120,
                          every=1.0)
        fresh = api.post("/api/vms", json={"purpose": "cli", "ttl_seconds": 900}).json()["id"]
        assert _gemini_version(api, fresh) == OTHER  # new VMs (and the refilled pool) come from the new image
        assert _gemini_version(api, busy) == "0.61.0"  # the VM in use runs on, on its own image
        assert old.dir.is_dir()  # kept while that VM's disk is on it

        assert api.delete(f"/api/vms/{busy}").status_code == 204
        assert eventually(lambda: not old.dir.exists(), timeout=120, every=1.0)  # removed once unused
        assert new.dir.is_dir() and _gemini_version(api, fresh) == OTHER
        assert api.delete(f"/api/vms/{fresh}").status_code == 204
    finally:
        running.close()
    assert find_marked_processes(engine_tag(server.data_dir)) == {}
