"""Workspaces on real VMs through a live `polydev serve` on QEMU: made empty and from an uploaded archive, each a
git repository in its own VM; downloaded as a tar.gz; paused when idle and woken by the next use; kept through
a server stop (paused) and a server crash (its disk kept, booted cold); another user's answer 404; the limits
answer their errors; deleting one leaves nothing behind."""

from __future__ import annotations

import io
import time
import zipfile

import httpx

from polydev.vm import images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.support.live_server import crash, start_server
from tests.support.workspace_checks import state, targz, untar, user_api, vm_env
from tests.support.waits import eventually

pytest_plugins = ["tests.support.vm_fixtures"]


def test_workspaces_live_across_pauses_a_restart_and_a_crash(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    env = vm_env(test_image, WORKSPACE_IDLE_PAUSE_SECONDS="3", WORKSPACE_LIMIT_PER_USER="2",
                 WORKSPACE_UPLOAD_MAX_BYTES="200000", WORKSPACE_BYTES_PER_USER="300000")
    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        alice = user_api(server.url, server.admin_token, "alice")
        bob = user_api(server.url, server.admin_token, "bob", timeout=60)
        made = alice.post("/api/workspaces", json={"name": "scratch"})
        assert made.status_code == 202 and made.json()["state"] == "creating", made.text
        empty = made.json()["id"]
        project = {"README.md": b"# demo\n", "src/hello.py": b"print('hello')\n"}
        up = alice.post("/api/workspaces/upload", params={"name": "demo"}, content=targz(project),
                        headers={"Content-Type": "application/gzip"})
        assert up.status_code == 202, up.text
        demo = up.json()["id"]
        assert eventually(lambda: state(alice, empty) == "ready" and state(alice, demo) == "ready", timeout=180)

        got = untar(alice.get(f"/api/workspaces/{demo}/archive").content)
        assert {k: got[k] for k in project} == project
        assert "HEAD" in {k.split("/")[-1] for k in got if k.startswith(".git/")}  # a git repository
        assert ".git/HEAD" in untar(alice.get(f"/api/workspaces/{empty}/archive").content)
        assert alice.get(f"/api/workspaces/{demo}").json()["size_bytes"] > 0

        # Another user's workspace is a missing one, whatever the call.
        for call in (bob.get(f"/api/workspaces/{demo}"), bob.get(f"/api/workspaces/{demo}/archive"),
                     bob.delete(f"/api/workspaces/{demo}"), bob.post(f"/api/workspaces/{demo}/pause")):
            assert call.status_code == 404 and call.json()["error"]["code"] == "not_found"
        assert bob.get("/api/workspaces").json() == []
        # Limits and bad input: each its own 4xx, nothing made.
        over = alice.post("/api/workspaces", json={"name": "third"})
        assert over.status_code == 429 and over.json()["error"]["code"] == "workspace_limit"
        too_big = bob.post("/api/workspaces/upload", params={"name": "big"}, content=b"x" * 200_001,
                           headers={"Content-Type": "application/x-tar"})
        assert too_big.status_code == 413
        # Under the upload limit, but past what the user may hold in all (their workspaces' bytes with it).
        first = bob.post("/api/workspaces/upload", params={"name": "a"}, content=b"x" * 190_000,
                         headers={"Content-Type": "application/x-tar"})
        assert first.status_code == 202, first.text
        over_bytes = bob.post("/api/workspaces/upload", params={"name": "b"}, content=b"x" * 190_000,
                              headers={"Content-Type": "application/x-tar"})
        assert over_bytes.status_code == 429 and "300000 bytes allowed" in over_bytes.json()["error"]["message"]
        assert bob.delete(f"/api/workspaces/{first.json()['id']}").status_code == 204
        assert bob.post("/api/workspaces/upload", params={"name": "x"}, content=b"zz",
                        headers={"Content-Type": "text/plain"}).status_code == 415
        assert bob.post("/api/workspaces", json={"name": ""}).status_code == 422
        assert bob.get("/api/workspaces").json() == []
        # A broken archive: the workspace fails, says why, and holds no VM.
        broken = bob.post("/api/workspaces/upload", params={"name": "broken"}, content=b"not a tar at all",
                          headers={"Content-Type": "application/x-tar"}).json()
        assert eventually(lambda: state(bob, broken["id"]) == "failed", timeout=120)
        failed = bob.get(f"/api/workspaces/{broken['id']}").json()
        assert "unpacking the archive failed" in failed["error"] and failed["vm_id"] is None
        assert bob.get(f"/api/workspaces/{broken['id']}/archive").status_code == 409
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as z:
            z.writestr("notes/todo.txt", "zip works\n")
        bob_zip = bob.post("/api/workspaces/upload", params={"name": "zipped"}, content=zipped.getvalue(),
                           headers={"Content-Type": "application/zip"}).json()
        assert eventually(lambda: state(bob, bob_zip["id"]) == "ready", timeout=180)
        assert untar(bob.get(f"/api/workspaces/{bob_zip['id']}/archive").content)["notes/todo.txt"] == b"zip works\n"
        assert bob.delete(f"/api/workspaces/{bob_zip['id']}").status_code == 204

        # Idle: paused by the sweep (no VM process for it); the next use wakes it as it was.
        assert eventually(lambda: state(alice, demo) == "paused", timeout=60, every=1.0)
        vm_id = alice.get(f"/api/workspaces/{demo}").json()["vm_id"]
        assert vm_id not in {str(k) for k in find_marked_processes(engine_tag(server.data_dir))}
        assert {k: v for k, v in untar(alice.get(f"/api/workspaces/{demo}/archive").content).items()
                if k in project} == project
        assert state(alice, demo) == "ready"
    finally:
        running.close()  # a stop: its running workspaces are paused first

    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        assert state(alice_again := httpx.Client(base_url=server.url, timeout=300, headers=alice.headers),
                      demo) == "paused"
        assert untar(alice_again.get(f"/api/workspaces/{demo}/archive").content)["src/hello.py"] == project[
            "src/hello.py"]
        time.sleep(0.5)
        crash(server)  # no stop: its VM dies with it, unpaused
    finally:
        running.close()

    running = start_server(tmp_path, "polydev", env)
    server = next(running)
    try:
        alice_again = httpx.Client(base_url=server.url, timeout=300, headers=alice.headers)
        # The disk was kept by the start-up reconcile; the next use boots it cold.
        assert untar(alice_again.get(f"/api/workspaces/{demo}/archive").content)["README.md"] == b"# demo\n"
        for workspace_id in (demo, empty):
            assert alice_again.delete(f"/api/workspaces/{workspace_id}").status_code == 204
            assert alice_again.get(f"/api/workspaces/{workspace_id}").status_code == 404
        assert alice_again.get("/api/workspaces").json() == []
        assert find_marked_processes(engine_tag(server.data_dir)) == {}
        assert eventually(lambda: not any((server.data_dir / "vms").iterdir()), timeout=30)
    finally:
        running.close()
