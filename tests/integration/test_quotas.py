"""Quotas and admission control through the API, with the scripted CLI in "VMs" on the host (the `flows`
fixture): a login, run or VM past a user's limit answers 429 `quota_exceeded`, past the host's capacity 503
`host_capacity`, both naming the limit with Retry-After, and nothing is started (no row, no VM)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from polydev.core.quotas import HostCapacity
from polydev.store.models import AuthSession, Run, VmRecord
from polydev.vm.disk_space import DiskSpace
from tests.support.app import Api
from tests.support.flow_api import (
    api_key_user,
    logged_in,
    no_vms_left,
    post_run,
    until_event,
    wait_run,
    wait_status,
)


async def counts(api: Api, uid: str) -> tuple[int, int, int]:
    """(login sessions, runs, VMs) the database holds for this user, ended ones included."""
    user = uuid.UUID(uid)
    async with api.services.factory() as s:
        return tuple([int(await s.scalar(select(func.count()).select_from(table).where(table.user_id == user)) or 0)
                      for table in (AuthSession, Run, VmRecord)])  # type: ignore[return-value]


def refused(r, status: int, code: str, limit: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code and body["limit"] == limit, body
    assert int(r.headers["retry-after"]) > 0
    assert str(body["used"]) in body["message"] and str(body["allowed"]) in body["message"]


async def test_a_run_past_the_users_quota_is_refused_before_anything_starts(flows: Api) -> None:
    admission = flows.services.admission
    uid, h = await logged_in(flows)
    r = await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": {"runs": 1}},
                               headers=flows.auth(flows.admin_token))
    assert r.status_code == 200 and r.json()["limits"]["runs"] == 1 and r.json()["overrides"] == {"runs": 1}
    first = await post_run(flows, h, "sleep 30")
    await until_event(flows, h, first, "text")  # running, in its VM
    before = await counts(flows, uid)
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi"}, headers=h)
    refused(r, 429, "quota_exceeded", "runs")
    assert await counts(flows, uid) == before  # no run row, no VM
    mine = (await flows.client.get("/api/me/quotas", headers=h)).json()
    assert mine["usage"]["runs"] == 1 and mine["usage"]["vms"] == 1 and mine["limits"]["runs"] == 1
    # Another user is not held back by this one's quota.
    _, other = await logged_in(flows)
    assert (await wait_run(flows, other, await post_run(flows, other, "hi")))["status"] == "succeeded"
    await flows.client.post(f"/api/runs/{first}/cancel", headers=h)
    assert (await wait_run(flows, h, first))["status"] == "cancelled"
    # Once it ended, the next one is admitted.
    assert (await wait_run(flows, h, await post_run(flows, h, "hi")))["status"] == "succeeded"
    assert admission.defaults.runs >= 1
    await no_vms_left(flows)


async def test_a_login_past_the_users_quota_is_refused(flows: Api) -> None:
    uid, token = await flows.new_user()
    h = flows.auth(token)
    await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": {"logins": 1}},
                           headers=flows.auth(flows.admin_token))
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    before = await counts(flows, uid)
    refused(await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h),
            429, "quota_exceeded", "logins")
    assert await counts(flows, uid) == before
    await flows.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h)
    await wait_status(flows, h, sid, "cancelled")
    await no_vms_left(flows)


async def test_a_full_host_refuses_with_503_and_frees_up_after(flows: Api) -> None:
    admission = flows.services.admission
    s = flows.services.settings
    admission.host = HostCapacity(vcpus=s.vm_cli_vcpu, memory_mb=100_000)  # room for one CLI VM
    uid, h = await logged_in(flows)
    other_uid, other = await logged_in(flows)  # (the logins' VMs are gone again: nothing holds the host)
    first = await post_run(flows, h, "sleep 30")
    await until_event(flows, h, first, "text")
    before = await counts(flows, other_uid)
    refused(await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi"}, headers=other),
            503, "host_capacity", "vcpus")
    refused(await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=other),
            503, "host_capacity", "vcpus")
    assert await counts(flows, other_uid) == before
    report = (await flows.client.get("/api/quotas/host", headers=flows.auth(flows.admin_token))).json()
    host = report["capacity"]
    assert host["vcpus"] == {"used": s.vm_cli_vcpu, "capacity": s.vm_cli_vcpu}
    assert report["servers"] == []  # this server has not joined a cluster (its heartbeat is not running)
    await flows.services.cluster.start(runs_vms=True)
    try:  # every server that runs VMs, this one marked (here the only one): its VMs' use as the database has it
        [this] = (await flows.client.get("/api/quotas/host", headers=flows.auth(flows.admin_token))).json()["servers"]
        assert this["this"] and this["server_id"] == str(flows.services.server_id)
        assert this["vcpus"] == {"used": s.vm_cli_vcpu, "capacity": flows.services.cluster.capacity.vcpus}
    finally:
        await flows.services.cluster.stop()
    metrics = (await flows.client.get("/metrics")).text
    assert f'polydev_host_used{{resource="vcpus"}} {float(s.vm_cli_vcpu)}' in metrics
    assert f'polydev_host_capacity{{resource="vcpus"}} {float(s.vm_cli_vcpu)}' in metrics
    await flows.client.post(f"/api/runs/{first}/cancel", headers=h)
    await wait_run(flows, h, first)
    assert (await wait_run(flows, other, await post_run(flows, other, "hi")))["status"] == "succeeded"
    admission.host = replace(admission.host, vcpus=1000)
    await no_vms_left(flows)


async def test_requests_arriving_together_cannot_all_pass_on_the_same_room(flows: Api) -> None:
    """Six runs posted at once on a host with room for two CLI VMs: two are admitted, four refused, though no
    VM row exists yet when the later ones are checked (each admitted run holds its share until its VM's row
    does)."""
    admission = flows.services.admission
    s = flows.services.settings
    users = [await api_key_user(flows) for _ in range(6)]
    admission.host = HostCapacity(vcpus=2 * s.vm_cli_vcpu, memory_mb=100_000)
    try:
        answers = await asyncio.gather(*(flows.client.post(
            "/api/runs", json={"provider": "claude_code", "prompt": "sleep 5"}, headers=h) for h in users))
        assert sorted(r.status_code for r in answers) == [202, 202, 503, 503, 503, 503], [r.text for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["limit"] == "vcpus", r.text
        for h, r in zip(users, answers, strict=True):
            if r.status_code == 202:
                assert (await wait_run(flows, h, r.json()["id"]))["status"] == "succeeded"
        assert admission._held == []  # nothing held once the VMs' rows (and then their ends) count them
    finally:
        admission.host = replace(admission.host, vcpus=1000)
    await no_vms_left(flows)


async def test_a_host_out_of_disk_space_refuses_new_vms_with_503(flows: Api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    admission = flows.services.admission
    kept = admission.disk
    uid, h = await logged_in(flows)
    before = await counts(flows, uid)
    # A data directory that must keep more free than its file system holds: every new VM is refused.
    admission.disk = DiskSpace(tmp_path, DiskSpace(tmp_path, 0).total_mb() + 1)
    try:
        r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi"}, headers=h)
        refused(r, 503, "host_capacity", "disk_mb")
        assert "out of disk space" in r.json()["error"]["message"]
        refused(await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h),
                503, "host_capacity", "disk_mb")
        assert await counts(flows, uid) == before
        host = (await flows.client.get("/api/quotas/host", headers=flows.auth(flows.admin_token))).json()
        assert host["capacity"]["disk_mb"]["capacity"] == DiskSpace(tmp_path, 0).total_mb()
    finally:
        admission.disk = kept
    assert (await wait_run(flows, h, await post_run(flows, h, "hi")))["status"] == "succeeded"


async def test_vms_through_the_api_count_too(flows: Api) -> None:
    admin = flows.auth(flows.admin_token)
    uid, token = await flows.new_user()
    await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": {"vms": 0}}, headers=admin)
    me = (await flows.client.get("/api/me", headers=admin)).json()["id"]
    await flows.client.put(f"/api/users/{me}/quotas", json={"limits": {"memory_mb": 1}}, headers=admin)
    r = await flows.client.post("/api/vms", json={"purpose": "cli"}, headers=admin)
    refused(r, 429, "quota_exceeded", "memory_mb")
    await flows.client.put(f"/api/users/{me}/quotas", json={"limits": {}}, headers=admin)  # {} drops them
    assert (await flows.client.get(f"/api/users/{me}/quotas", headers=admin)).json()["overrides"] == {}


@pytest.mark.parametrize("limits, problem", [
    ({"gpus": 1}, "unknown quota 'gpus'"),
    ({"runs": -1}, "whole number"),
])
async def test_bad_quota_changes_are_422_and_change_nothing(flows: Api, limits: dict, problem: str) -> None:
    admin = flows.auth(flows.admin_token)
    uid, token = await flows.new_user()
    await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": {"runs": 2}}, headers=admin)
    r = await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": limits}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_quotas" and problem in r.text, r.text
    assert (await flows.client.get(f"/api/users/{uid}/quotas", headers=admin)).json()["overrides"] == {"runs": 2}
    # Not an admin: neither reads another user's quotas nor sets any.
    h = flows.auth(token)
    assert (await flows.client.get(f"/api/users/{uid}/quotas", headers=h)).status_code == 403
    assert (await flows.client.put(f"/api/users/{uid}/quotas", json={"limits": {}}, headers=h)).status_code == 403
    missing = f"/api/users/{uuid.uuid4()}/quotas"
    assert (await flows.client.get(missing, headers=admin)).json()["error"]["code"] == "not_found"
