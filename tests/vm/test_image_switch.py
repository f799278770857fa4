"""Following a new CLI version on a live server with real VMs: an image built with Gemini CLI at another version
from the npm registry, made active while a VM of the old image is in use, a Codex device login on it waits for
the user, and a run of the real Claude Code on it is mid-way (its tool call sleeping; the providers played by
the stand-ins of tests/standins/vm.py); the server switches within its follow interval (no restart), the login
completes once the user approves, the run streams to its end and succeeds, new VMs
come from the new image (its CLI at the new version), the VM in use runs on on the old one, and the old image
goes once no VM uses it.

The test's cache is its own (so the active pointer is too), with the download caches and the OS and base
layers shared with the machine's image cache: after the first run only the images themselves are assembled.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from polydev.vm import image_updates, images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.standins import api as standin_api
from tests.standins import clis
from tests.standins.vm import VmStandins
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


def _events(api: httpx.Client, run_id: str) -> list[dict[str, object]]:
    """The run's events so far (the stream is read until the server's first keep-alive or its end)."""
    out = []
    with api.stream("GET", f"/api/runs/{run_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith(":"):
                break  # caught up: the server waits for more
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
                if out[-1].get("type") in ("done", "error"):
                    break
    return out


def _session(api: httpx.Client, session_id: str) -> str:
    return str(api.get(f"/api/auth/sessions/{session_id}").json()["status"])


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
    standins = VmStandins(tmp_path / "standins")
    try:
        wiring = standins.settings()
        env = {"POLYDEV_CACHE_DIR": str(cache), "VM_IMAGE_PROFILE": "test", "VM_CLI_MEMORY_MB": "2048",
               "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "1", "EGRESS_RESOLVE": "pinned",
               "EGRESS_HOSTS": json.dumps(wiring["egress_hosts"]), "GUEST_CA_CERT_FILE": str(wiring["guest_ca_cert_file"]),
               "PROVIDER_API_BASE_URLS": json.dumps(wiring["provider_api_base_urls"])}
        running = start_server(tmp_path, "polydev", env, stop_timeout=120)
        server = next(running)
        try:
            api = httpx.Client(base_url=server.url, timeout=300,
                               headers={"Authorization": f"Bearer {server.admin_token}"})
            assert api.get("/api/images").json()["in_use"]["hash"] == old.hash
            busy = api.post("/api/vms", json={"purpose": "cli", "ttl_seconds": 900}).json()["id"]
            assert _gemini_version(api, busy) == "0.61.0"
            assert api.put("/api/credentials/claude_code/api-key", json={"api_key": "sk-ant-stand-in"}).is_success
            standins.api.script = standin_api.Script(tool=clis.claude_shell_tool("sleep 60; echo slept"),
                                                     final_text="Done: {tool_output}")
            run = api.post("/api/runs", json={"provider": "claude_code", "prompt": "Sleep, then say so."}).json()["id"]
            login = api.post("/api/auth/start", json={"provider": "codex", "method": "device"}).json()["session_id"]
            assert eventually(lambda: _session(api, login) == "awaiting_user_auth", timeout=300, every=1.0)
            assert eventually(lambda: any(e.get("type") == "tool_call" for e in _events(api, run)), timeout=300,
                              every=1.0)  # mid-way: its command is running in the old image's VM

            image_updates.activate(cache, new)  # what `polydev image update` does once the image passed its test
            assert eventually(lambda: api.get("/api/images").json()["in_use"]["hash"] == new.hash, timeout=120,
                              every=1.0)
            assert api.get(f"/api/runs/{run}").json()["status"] == "running"  # the switch did not touch it
            assert _session(api, login) == "awaiting_user_auth"  # nor the login
            assert standins.oauth.approve_device_codes() >= 1  # the user types the code on the provider's page
            assert eventually(lambda: _session(api, login) == "completed", timeout=300, every=1.0)
            assert sorted(c["provider"] for c in api.get("/api/credentials").json()) == ["claude_code", "codex"]
            assert eventually(lambda: api.get(f"/api/runs/{run}").json()["status"] != "running", timeout=300, every=1.0)
            ended = api.get(f"/api/runs/{run}").json()
            assert ended["status"] == "succeeded" and "slept" in (ended["result"] or ""), ended
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
    finally:
        standins.close()
