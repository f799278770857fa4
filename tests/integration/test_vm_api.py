"""The admin VM API over an engine on the stand-in hypervisor (tests/support/engine_fakes.py), on both deployments,
and the app's lifespan wiring the engine itself: reconcile at start, destroy at shutdown, and no engine
(with the reason) when the backend cannot run here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.core import vm_admin
from polydev.services import build_vm_engine, open_services
from polydev.vm.backends import BackendUnavailable
from polydev.vm.engine import VMEngine, find_marked_processes
from polydev.vm.network import SlotNetwork
from tests.support.agent_backend import AgentBackend
from tests.support.app import Api, make_settings
from tests.support.engine_fakes import FakeBackend


def pid_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def vm_api(stack: Settings, backend: FakeBackend) -> AsyncIterator[Api]:
    svc = await open_services(stack)
    issued = await svc.users.bootstrap_admin()
    assert issued is not None
    svc.engine = build_vm_engine(svc, lambda _settings: backend)
    app = create_app(services=svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://polydev.test") as client:
        yield Api(svc, client, issued.secret)
    tag = svc.engine.tag
    await svc.close()  # destroys what the test left running
    assert find_marked_processes(tag) == {}


def fake(api: Api) -> FakeBackend:
    assert api.services.engine is not None
    backend = api.services.engine.backend
    assert isinstance(backend, FakeBackend)
    return backend


async def test_admin_creates_lists_gets_and_deletes_a_vm(vm_api: Api) -> None:
    h = vm_api.auth(vm_api.admin_token)
    r = await vm_api.client.post("/api/vms", json={"purpose": "browser", "ttl_seconds": 120}, headers=h)
    assert r.status_code == 201, r.text
    vm = r.json()
    assert vm["status"] == "running" and vm["purpose"] == "browser" and vm["backend"] == "fake"
    assert "token" not in r.text and "agent_url" not in vm
    engine = vm_api.services.engine
    assert engine is not None
    pid = find_marked_processes(engine.tag)[uuid.UUID(vm["id"])]
    # The settings' sizes reach the backend; the TTL reaches the row.
    assert fake(vm_api).started[-1].vcpus == vm_api.services.settings.vm_browser_vcpu
    assert fake(vm_api).started[-1].memory_mb == vm_api.services.settings.vm_browser_memory_mb
    row = await engine.get(uuid.UUID(vm["id"]))
    assert row is not None and row.expires_at is not None
    assert 100 < (row.expires_at - row.created_at).total_seconds() <= 121

    listed = (await vm_api.client.get("/api/vms", headers=h)).json()
    assert [v["id"] for v in listed] == [vm["id"]]
    got = await vm_api.client.get(f"/api/vms/{vm['id']}", headers=h)
    assert got.status_code == 200 and got.json()["status"] == "running"

    assert (await vm_api.client.delete(f"/api/vms/{vm['id']}", headers=h)).status_code == 204
    assert pid_gone(pid)
    assert (await vm_api.client.get("/api/vms", headers=h)).json() == []
    ended = (await vm_api.client.get("/api/vms", params={"all": "true"}, headers=h)).json()
    assert [(v["id"], v["status"]) for v in ended] == [(vm["id"], "destroyed")]
    again = await vm_api.client.delete(f"/api/vms/{vm['id']}", headers=h)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


async def test_default_ttl_comes_from_the_settings(vm_api: Api) -> None:
    r = await vm_api.client.post("/api/vms", json={}, headers=vm_api.auth(vm_api.admin_token))
    assert r.status_code == 201 and r.json()["purpose"] == "cli"
    body = r.json()
    from datetime import datetime

    lifetime = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["created_at"])
    assert abs(lifetime.total_seconds() - vm_api.services.settings.vm_ttl_seconds) < 5


async def test_non_admins_get_403_everywhere(vm_api: Api) -> None:
    _, token = await vm_api.new_user()
    some = uuid.uuid4()
    for method, path, body in [("GET", "/api/vms", None), ("POST", "/api/vms", {}), ("GET", f"/api/vms/{some}", None),
                               ("DELETE", f"/api/vms/{some}", None),
                               ("POST", f"/api/vms/{some}/exec", {"args": ["true"]})]:
        r = await vm_api.client.request(method, path, json=body, headers=vm_api.auth(token))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path)
        assert (await vm_api.client.request(method, path, json=body)).status_code == 401
    assert fake(vm_api).started == []


async def test_create_failure_is_a_json_502_with_the_reason_and_a_failed_row(vm_api: Api) -> None:
    fake(vm_api).fail_next = "agent not ready after 300 s"
    h = vm_api.auth(vm_api.admin_token)
    r = await vm_api.client.post("/api/vms", json={"purpose": "cli"}, headers=h)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "vm_create_failed" and "agent not ready after 300 s" in err["message"]
    row = (await vm_api.client.get(f"/api/vms/{err['vm_id']}", headers=h)).json()
    assert row["status"] == "failed" and "agent not ready" in row["error"]
    assert (await vm_api.client.get("/api/vms", headers=h)).json() == []
    metrics = (await vm_api.client.get("/metrics")).text
    assert 'polydev_vm_creations_total{outcome="failed"} 1.0' in metrics


async def test_metrics_count_live_vms_and_creations(vm_api: Api) -> None:
    h = vm_api.auth(vm_api.admin_token)
    for _ in range(2):
        assert (await vm_api.client.post("/api/vms", json={}, headers=h)).status_code == 201
    metrics = (await vm_api.client.get("/metrics")).text
    assert 'polydev_vms{status="running"} 2.0' in metrics
    assert 'polydev_vms{status="creating"} 0.0' in metrics
    assert 'polydev_vm_creations_total{outcome="created"} 2.0' in metrics


async def test_exec_without_an_agent_is_a_clear_502_never_a_500(vm_api: Api) -> None:
    h = vm_api.auth(vm_api.admin_token)
    vm = (await vm_api.client.post("/api/vms", json={}, headers=h)).json()
    # The stand-in hypervisor runs no agent: its URL points at a closed port.
    r = await vm_api.client.post(f"/api/vms/{vm['id']}/exec", json={"args": ["echo", "hi"]}, headers=h)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "agent_unreachable" and "agent" in r.json()["error"]["message"]
    assert (await vm_api.client.delete(f"/api/vms/{vm['id']}", headers=h)).status_code == 204
    r = await vm_api.client.post(f"/api/vms/{vm['id']}/exec", json={"args": ["true"]}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "vm_not_running"
    r = await vm_api.client.post(f"/api/vms/{uuid.uuid4()}/exec", json={"args": ["true"]}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("backend", [AgentBackend()], ids=["agent"])
async def test_exec_runs_the_command_through_the_agent(vm_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    h = vm_api.auth(vm_api.admin_token)
    vm = (await vm_api.client.post("/api/vms", json={}, headers=h)).json()
    assert vm["backend"] == "agent"
    engine = vm_api.services.engine
    assert engine is not None
    _, token = engine.agent_endpoint(uuid.UUID(vm["id"]))

    async def run(**body: object) -> dict:  # type: ignore[type-arg]
        r = await vm_api.client.post(f"/api/vms/{vm['id']}/exec", json=body, headers=h)
        assert r.status_code == 200, r.text
        assert token not in r.text
        return r.json()

    out = await run(args=["sh", "-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 3'],
                    env={"GREETING": "hello"}, cwd="/tmp")
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "hello from /tmp\n", "oops\n")
    assert out["timed_out"] is False and out["stdout_truncated"] is False
    assert (await run(args=["cat"], stdin="piped in"))["stdout"] == "piped in"
    slow = await run(args=["sleep", "30"], timeout_s=0.5)
    assert slow["timed_out"] is True and slow["duration_s"] < 10
    monkeypatch.setattr(vm_admin, "MAX_OUTPUT_BYTES", 1000)
    big = await run(args=["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x; echo done >&2"])
    assert big["stdout"] == "x" * 1000 and big["stdout_truncated"] is True
    assert big["stderr"] == "done\n" and big["exit_code"] == 0  # the command ran to its end regardless
    r = await vm_api.client.post(f"/api/vms/{vm['id']}/exec", json={"args": ["no-such-program-xyz"]}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "exec_rejected"
    assert "cannot start 'no-such-program-xyz'" in r.json()["error"]["message"]


@pytest.mark.parametrize("method,path,body,status,code", [
    ("GET", "/api/vms/not-a-uuid", None, 422, "malformed_id"),
    ("DELETE", "/api/vms/123", None, 422, "malformed_id"),
    ("POST", "/api/vms/xyz/exec", {"args": ["true"]}, 422, "malformed_id"),
    ("POST", "/api/vms", {"purpose": "gpu"}, 422, "validation_error"),
    ("POST", "/api/vms", {"ttl_seconds": 1}, 422, "validation_error"),
    ("POST", "/api/vms", {"ttl_seconds": 60, "extra": 1}, 422, "validation_error"),
    ("POST", "/api/vms/{id}/exec", {"args": []}, 422, "validation_error"),
    ("POST", "/api/vms/{id}/exec", {"args": ["a\x00b"]}, 422, "validation_error"),
    ("POST", "/api/vms/{id}/exec", {"args": ["env"], "env": {"A=B": "c"}}, 422, "validation_error"),
    ("POST", "/api/vms/{id}/exec", {"args": ["ls"], "cwd": "relative"}, 422, "validation_error"),
    ("POST", "/api/vms/{id}/exec", {"args": ["sleep"], "timeout_s": 0}, 422, "validation_error"),
])
async def test_bad_ids_and_bodies_are_json_4xx(vm_api: Api, method: str, path: str, body: dict | None,  # type: ignore[type-arg]
                                               status: int, code: str) -> None:
    h = vm_api.auth(vm_api.admin_token)
    r = await vm_api.client.request(method, path.format(id=uuid.uuid4()), json=body, headers=h)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert fake(vm_api).started == []
    r = await vm_api.client.post("/api/vms", content=b"{not json", headers={**h, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"


async def test_without_an_engine_vm_routes_are_503_with_the_reason_and_health_stays_ok(api: Api) -> None:
    api.services.engine_unavailable = "no full image in /nowhere: run `polydev image build --profile full`"
    h = api.auth(api.admin_token)
    for method, path, body in [("GET", "/api/vms", None), ("POST", "/api/vms", {}),
                               ("GET", f"/api/vms/{uuid.uuid4()}", None),
                               ("DELETE", f"/api/vms/{uuid.uuid4()}", None),
                               ("POST", f"/api/vms/{uuid.uuid4()}/exec", {"args": ["true"]})]:
        r = await api.client.request(method, path, json=body, headers=h)
        assert r.status_code == 503, (method, path, r.text)
        assert r.json()["error"]["code"] == "vm_unavailable" and "polydev image build" in r.json()["error"]["message"]
    health = await api.client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    vm = health.json()["vm"]
    assert vm["available"] is False and "polydev image build" in vm["reason"]
    assert vm["backend"] == "qemu" and vm["network_mode"] == "user" and vm["live_vms"] is None
    assert 'polydev_vm_creations_total{outcome="unavailable"} 1.0' in (await api.client.get("/metrics")).text


async def test_health_reports_the_engine(vm_api: Api) -> None:
    fake(vm_api).accel = "tcg"  # type: ignore[attr-defined]
    await vm_api.client.post("/api/vms", json={}, headers=vm_api.auth(vm_api.admin_token))
    body = (await vm_api.client.get("/health")).json()
    assert body["vm"] == {"backend": "fake", "available": True, "reason": None, "accel": "tcg",
                          "network_mode": "user", "live_vms": 1, "login_pool": {}}  # (LOGIN_POOL unset)
    # The stand-in hypervisor forwards no guest anywhere: the gateway is off, and /health says why.
    assert body["egress"]["status"] == "off"
    assert body["egress"]["reason"] == "the VM backend does not forward its guests to the gateway"


# -- the app's own lifespan ------------------------------------------------------------------------------

async def test_lifespan_reconciles_at_start_and_destroys_its_vms_at_shutdown(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    # A previous run's VM, left behind as a crash would leave it: a live row and a running process.
    svc = await open_services(settings)
    leftover_engine = build_vm_engine(svc, lambda _s: FakeBackend())
    leftover = await leftover_engine.create(None, "cli")
    tag = leftover_engine.tag
    leftover_pid = find_marked_processes(tag)[leftover.id]
    await svc.db_engine.dispose()

    app = create_app(settings, backend_factory=lambda _s: FakeBackend())
    async with app.router.lifespan_context(app):
        services = app.state.services
        assert isinstance(services.engine, VMEngine) and services.engine.tag == tag
        assert pid_gone(leftover_pid)
        token = (settings.data_dir / "admin.token").read_text().strip()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            h = {"Authorization": f"Bearer {token}"}
            old = (await client.get(f"/api/vms/{leftover.id}", headers=h)).json()
            assert old["status"] == "failed" and "lost when the control plane stopped" in old["error"]
            vm = (await client.post("/api/vms", json={}, headers=h)).json()
            assert (await client.get("/health")).json()["vm"]["available"] is True
        pid = find_marked_processes(tag)[uuid.UUID(vm["id"])]
        assert services.engine.reaper.running  # the reaper runs while the app does
    assert pid_gone(pid) and find_marked_processes(tag) == {}


async def test_lifespan_without_a_usable_backend_still_serves(tmp_path: Path) -> None:
    def unavailable(_s: Settings) -> FakeBackend:
        raise BackendUnavailable("QEMU is not installed")

    app = create_app(make_settings(tmp_path), backend_factory=unavailable)
    async with app.router.lifespan_context(app):
        assert app.state.services.engine is None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.get("/health")
            assert r.status_code == 200 and r.json()["vm"]["reason"] == "QEMU is not installed"


async def test_default_backend_without_an_image_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    # An empty cache directory: whatever the machine has installed, there is no image to boot.
    app = create_app(make_settings(tmp_path, vm_image_profile="test"))
    async with app.router.lifespan_context(app):
        services = app.state.services
        assert services.engine is None and services.engine_unavailable
        assert "image" in services.engine_unavailable or "QEMU" in services.engine_unavailable


async def test_tap_mode_needs_root_and_builds_a_slot_pool_of_its_own(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, network_mode="tap", network_ip_pool_start="10.77.0.2",
                             network_ip_pool_end="10.77.0.9")
    svc = await open_services(settings)
    try:
        monkeypatch.setattr("os.geteuid", lambda: 1000)
        with pytest.raises(BackendUnavailable, match="needs root"):
            build_vm_engine(svc, lambda _s: FakeBackend())
        monkeypatch.setattr("os.geteuid", lambda: 0)
        engine = build_vm_engine(svc, lambda _s: FakeBackend())  # builds objects only; nothing on the machine
        assert isinstance(engine.network, SlotNetwork) and engine.network.capacity == 4
        assert engine.network.prefix == "p" + engine.tag[:5]
        bad = make_settings(tmp_path, network_mode="tap", network_ip_pool_start="10.77.0.9",
                            network_ip_pool_end="10.77.0.2")
        svc.settings = bad
        with pytest.raises(BackendUnavailable, match="NETWORK_IP_POOL"):
            build_vm_engine(svc, lambda _s: FakeBackend())
    finally:
        await svc.close()


async def test_admins_see_the_image_in_use_the_active_one_and_the_registrys_versions(
        vm_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from polydev.api.routes import images as images_route
    from polydev.vm import image_updates, images
    from tests.support.image_fakes import fake_built

    cache = vm_api.services.settings.cache_dir
    in_use = fake_built(cache, images.recipe_for("test"))
    newer = fake_built(cache, images.recipe_for("test", {"codex": "0.180.0"}))
    image_updates.activate(cache, newer)
    (images.images_dir(cache) / ".build-feedfacefeedface-42").mkdir()
    info = fake(vm_api).describe()
    monkeypatch.setattr(FakeBackend, "describe", lambda self: replace(info, image_hash=in_use.hash))
    monkeypatch.setattr(vm_api.services.settings, "vm_image_profile", "test")
    asked: list[str] = []

    def registry(package: str) -> str:
        asked.append(package)
        return "0.180.0" if package == "@openai/codex" else dict(images.CLI_PACKAGES)[package]

    monkeypatch.setattr(images, "npm_latest", registry)
    images_route._registry.clear()
    h = vm_api.auth(vm_api.admin_token)
    body = (await vm_api.client.get("/api/images", headers=h)).json()
    assert body["in_use"]["hash"] == in_use.hash and body["active"]["hash"] == newer.hash
    assert body["active"]["clis"]["@openai/codex"] == "0.180.0"
    assert body["building"] == [".build-feedfacefeedface-42"] and body["updates"] is None and asked == []
    body = (await vm_api.client.get("/api/images", params={"check": "true"}, headers=h)).json()
    assert {u["package"]: u["newer"] for u in body["updates"]} == {
        "@anthropic-ai/claude-code": False, "@openai/codex": True, "@google/gemini-cli": False}
    assert len(asked) == 3
    again = (await vm_api.client.get("/api/images", headers=h)).json()  # the registry's answer is kept a while
    assert again["updates"] == body["updates"] and len(asked) == 3
    _, user_token = await vm_api.new_user()
    refused = await vm_api.client.get("/api/images", headers=vm_api.auth(user_token))
    assert refused.status_code == 403
