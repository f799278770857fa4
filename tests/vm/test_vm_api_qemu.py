"""The whole path with a real VM: `create_app` builds the QEMU engine from settings in its lifespan, the
admin API creates a VM, runs commands in it through the agent, and destroys it; shutdown leaves nothing."""

from __future__ import annotations

from pathlib import Path

import httpx

from polydev.api.app import create_app
from polydev.vm import images
from polydev.vm.engine import find_marked_processes
from tests.support.app import make_settings

pytest_plugins = ["tests.support.vm_fixtures"]


async def test_api_runs_a_command_in_a_real_vm(tmp_path: Path, test_image: images.Image) -> None:
    # The cache holding the test image (images live in <cache>/images/<hash>); data in a directory of our own.
    settings = make_settings(tmp_path, POLYDEV_CACHE_DIR=test_image.dir.parent.parent, vm_image_profile="test",
                             vm_cli_memory_mb=1024, vm_cli_vcpu=1)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        services = app.state.services
        assert services.engine is not None, services.engine_unavailable
        tag = services.engine.tag
        token = (settings.data_dir / "admin.token").read_text().strip()
        h = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=600) as c:
            body = (await c.get("/health")).json()
            health = body["vm"]
            assert health["available"] is True and health["backend"] == "qemu" and health["accel"]
            # Out of the box the guests reach the outside through the egress gateway.
            assert body["egress"]["status"] == "on" and body["egress"]["guest_address"] == "10.0.2.99:3128"
            r = await c.post("/api/vms", json={"purpose": "cli", "ttl_seconds": 600}, headers=h)
            assert r.status_code == 201, r.text
            vm = r.json()
            r = await c.post(f"/api/vms/{vm['id']}/exec", headers=h,
                             json={"args": ["sh", "-c", "uname -s; cat; exit 7"], "stdin": "from the host"})
            assert r.status_code == 200, r.text
            assert r.json()["stdout"] == "Linux\nfrom the host" and r.json()["exit_code"] == 7
            assert (await c.get("/health")).json()["vm"]["live_vms"] == 1
            assert (await c.delete(f"/api/vms/{vm['id']}", headers=h)).status_code == 204
            assert find_marked_processes(tag) == {}
            # A second VM is left running: shutdown must take it down.
            assert (await c.post("/api/vms", json={}, headers=h)).status_code == 201
            assert len(find_marked_processes(tag)) == 1
    assert find_marked_processes(tag) == {}
