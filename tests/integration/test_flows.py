"""The login and run flows through the API, with the real guest agent as the "VM" (on the host, in a temporary
directory) and a scripted CLI (tests/support/flow_fakes.py): statuses, codes, credential capture and write-back, the
SSE stream, and every fault ending in the right status with nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from polydev.core.guest import Guest
from polydev.providers import ADAPTERS
from polydev.providers.base import GuestFile
from polydev.store.runs import StoredEvent
from polydev.vm.engine import VMCreateError, find_marked_processes
from tests.support.app import Api
from tests.support.flow_api import (
    api_key_user,
    logged_in,
    login,
    no_vms_left,
    post_run,
    sse,
    stored,
    until_event,
    wait_run,
    wait_status,
)
from tests.support.flow_fakes import CREDS, DEVICE_APPROVED, FakeAdapter
from tests.support.servers import free_port

# -- login ---------------------------------------------------------------------------------------------------

async def test_login_with_a_pasted_code_stores_the_credential_and_destroys_the_vm(flows: Api) -> None:
    uid, token = await flows.new_user()
    h = flows.auth(token)
    r = await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["status"] == "initializing" and first["accepts_code"] is True
    sid = first["session_id"]
    waiting = await wait_status(flows, h, sid, "awaiting_user_auth")
    assert waiting["auth_url"].startswith("https://auth.fake.test/authorize?")  # caught by the BROWSER hook
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 202, r.text
    done = await wait_status(flows, h, sid, "completed", "failed")
    assert done["status"] == "completed", done
    bundle = await stored(flows, uid)
    assert json.loads(bundle.files[CREDS][0])["access"] == "from-paste"
    assert bundle.files[CREDS][1] == 0o600
    # The sealed row holds ciphertext only.
    rows = await flows.services.credentials.list(uuid.UUID(uid))
    assert rows[0].kind == "oauth" and b"from-paste" not in rows[0].encrypted_credentials.encode()
    await no_vms_left(flows)


async def test_session_events_stream_every_status_until_the_end(flows: Api) -> None:
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")

    async def paste_soon() -> None:
        await asyncio.sleep(0.3)
        await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)

    task = asyncio.create_task(paste_soon())
    r = await flows.client.get(f"/api/auth/sessions/{sid}/events", headers=h)
    await task
    statuses = [data["status"] for _, kind, data in sse(r.text) if kind == "session"]
    assert statuses[0] == "awaiting_user_auth" and statuses[-1] == "completed"


async def test_login_through_the_cli_callback_url(flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter("callback", port))
    uid, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    # A pasted code is refused for a CLI without a code prompt; another port is not this login's callback.
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "code_rejected"
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code",
                                json={"code": f"http://localhost:{port + 1}/callback?code=good-code"}, headers=h)
    assert r.status_code == 422
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code",
                                json={"code": f"http://localhost:{port}/callback?code=good-code&state=s1"}, headers=h)
    assert r.status_code == 202, r.text
    assert (await wait_status(flows, h, sid, "completed", "failed"))["status"] == "completed"
    assert json.loads((await stored(flows, uid)).files[CREDS][0])["access"] == "from-callback"
    await no_vms_left(flows)


async def test_device_login_shows_the_code_and_completes(flows: Api) -> None:
    uid, token = await flows.new_user()
    h = flows.auth(token)
    r = await flows.client.post("/api/auth/start", json={"provider": "claude_code", "method": "device"}, headers=h)
    sid = r.json()["session_id"]
    # The scripted CLI waits for the user's approval, which comes only after the code was read: the login
    # cannot get past the code before this check.
    body = await wait_status(flows, h, sid, "awaiting_user_auth", "completed", "failed")
    assert body["status"] == "awaiting_user_auth", body
    assert body["device_code"] == "ABCD-1234" and body["auth_url"] == "https://auth.fake.test/device"
    approved = Path(flows.services.guest_paths.home) / DEVICE_APPROVED
    approved.parent.mkdir(parents=True, exist_ok=True)
    approved.touch()
    assert (await wait_status(flows, h, sid, "completed", "failed"))["status"] == "completed"
    assert json.loads((await stored(flows, uid)).files[CREDS][0])["access"] == "from-device"


async def test_a_wrong_code_fails_the_session_with_the_cli_s_words(flows: Api) -> None:
    uid, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "bad-code"}, headers=h)
    body = await wait_status(flows, h, sid, "failed", "completed")
    assert body["status"] == "failed" and "invalid code" in body["error_message"]
    assert await flows.services.credentials.list(uuid.UUID(uid)) == []
    await no_vms_left(flows)


async def test_cancel_ends_the_session_and_its_vm(flows: Api) -> None:
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    r = await flows.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["error_message"] == "cancelled by the user"
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"
    await no_vms_left(flows)


async def test_a_cancel_while_the_login_cleans_up_waits_for_it(flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login failed by itself and is destroying its VM when the user's cancel arrives: the cancel must
    not cut that short (the VM left running, the session never ended); it answers once the login has ended,
    with how it ended."""
    engine = flows.services.engine
    assert engine is not None
    destroy, destroying, release = engine.destroy, asyncio.Event(), asyncio.Event()

    async def slow_destroy(vm_id: uuid.UUID) -> bool:
        destroying.set()
        await release.wait()
        return await destroy(vm_id)

    monkeypatch.setattr(engine, "destroy", slow_destroy)
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "bad-code"}, headers=h)
    await asyncio.wait_for(destroying.wait(), 30)
    cancel = asyncio.create_task(flows.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h))
    await asyncio.sleep(0.3)
    assert not cancel.done()  # waiting for the clean-up
    release.set()
    r = await asyncio.wait_for(cancel, 30)
    assert r.status_code == 200 and r.json()["status"] == "failed" and "invalid code" in r.json()["error_message"]
    await no_vms_left(flows)


async def test_login_timeout_ends_the_session_with_the_reason(flows: Api) -> None:
    flows.services.login_flow.timeout = 3
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    body = await wait_status(flows, h, sid, "timeout", "failed", "completed")
    assert body["status"] == "timeout" and "3 s" in body["error_message"]
    await no_vms_left(flows)


async def test_a_login_cli_that_fails_fails_the_session(flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter("fail"))
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    body = await wait_status(flows, h, sid, "failed", "completed")
    assert "status 4" in body["error_message"] and "cannot reach the provider" in body["error_message"]
    await no_vms_left(flows)


REFUSAL = "api.example.com refused: not on the allow-list for claude_code runs"


async def test_a_failure_after_an_egress_refusal_says_the_gateway_s_reason(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = flows.services.engine
    assert engine is not None
    monkeypatch.setattr(engine, "egress_refusal", lambda vm_id, host=None: REFUSAL if host is None else None)
    _, h = await logged_in(flows)
    run = await wait_run(flows, h, await post_run(flows, h, "crash"))
    assert run["status"] == "failed" and run["error_message"] == f"egress: {REFUSAL}"
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter("fail"))
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    body = await wait_status(flows, h, sid, "failed", "completed")
    assert body["error_message"] == f"egress: {REFUSAL}"
    await no_vms_left(flows)


async def test_a_login_left_unfinished_times_out_for_that_reason_whatever_was_refused(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page appeared: a refusal afterwards (the sign-in page pulling something) is not why it ended."""
    engine = flows.services.engine
    assert engine is not None
    # Refused: some other host, never the sign-in page's.
    monkeypatch.setattr(engine, "egress_refusal", lambda vm_id, host=None: REFUSAL if host is None else None)
    flows.services.login_flow.timeout = 15
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await wait_status(flows, h, sid, "awaiting_user_auth")
    body = await wait_status(flows, h, sid, "timeout", "failed", "completed")
    assert body["status"] == "timeout" and "was not completed within 15 s" in body["error_message"], body
    await no_vms_left(flows)


async def test_a_sign_in_page_the_gateway_cannot_reach_fails_the_login_at_once(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """No route out: the VM's browser (or CLI) was refused the sign-in page's host. The session fails with
    the gateway's reason for that host, long before its timeout, and leaves nothing."""
    engine = flows.services.engine
    assert engine is not None
    asked: list[str | None] = []

    def refusal(vm_id: uuid.UUID, host: str | None = None) -> str | None:
        asked.append(host)
        if host is None:
            return "cdn.example refused: DNS lookup failed"  # a later, unrelated one: not the reason given
        return f"DNS lookup for {host} failed on the host: Name or service not known"

    monkeypatch.setattr(engine, "egress_refusal", refusal)
    flows.services.login_flow.timeout = 600
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    body = await wait_status(flows, h, sid, "failed", "timeout", "completed", timeout=60)
    [host] = {h for h in asked if h is not None}  # the sign-in page's host (the fake CLI's URL)
    assert body["status"] == "failed" and host == "auth.fake.test"
    assert body["error_message"] == f"egress: DNS lookup for {host} failed on the host: Name or service not known"
    await no_vms_left(flows)


async def test_another_user_cannot_see_code_or_cancel_a_session(flows: Api) -> None:
    _, token_a = await flows.new_user()
    _, token_b = await flows.new_user()
    ha, hb = flows.auth(token_a), flows.auth(token_b)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=ha)).json()["session_id"]
    await wait_status(flows, ha, sid, "awaiting_user_auth")
    for method, path, body in (("GET", "", None), ("POST", "/code", {"code": "good-code"}), ("POST", "/cancel", None),
                               ("GET", "/events", None)):
        r = await flows.client.request(method, f"/api/auth/sessions/{sid}{path}", json=body, headers=hb)
        assert r.status_code == 404, (path, r.text)
    assert (await flows.client.get(f"/api/auth/sessions/{sid}", headers=ha)).json()["status"] == "awaiting_user_auth"
    await flows.client.post(f"/api/auth/sessions/{sid}/cancel", headers=ha)


@pytest.mark.parametrize("body, code", [
    ({"provider": "nope"}, 422),
    ({}, 422),
    ({"provider": "claude_code", "method": "carrier-pigeon"}, 422),
    ({"provider": "gemini_cli", "method": "device"}, 422),
    ({"provider": "claude_code", "extra": 1}, 422),
])
async def test_bad_login_requests_are_4xx_and_start_nothing(flows: Api, body: dict, code: int) -> None:
    _, token = await flows.new_user()
    r = await flows.client.post("/api/auth/start", json=body, headers=flows.auth(token))
    assert r.status_code == code and "error" in r.json(), r.text
    assert await flows.services.login_sessions.repo.live() == []
    await no_vms_left(flows)


# -- runs ----------------------------------------------------------------------------------------------------

async def test_run_streams_events_in_order_ending_in_done(flows: Api) -> None:
    _, h = await logged_in(flows)
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hello",
                                                   "files": {"note.txt": "the note"}}, headers=h)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    kinds = [kind for _, kind, _ in events]
    assert [seq for seq, _, _ in events] == list(range(len(events)))
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("text", kinds.index("tool_result"))
    assert {"type": "status", "message": "init oauth:from-paste"} in [d for _, _, d in events]
    assert any(d.get("output") == "the note" for _, _, d in events)
    run = await wait_run(flows, h, rid)
    assert run["status"] == "succeeded" and run["usage"] == {"output_tokens": 7}
    assert run["credential_refreshed"] is False
    # A client that connects late, or resumes after event 2, gets the rest and only the rest.
    again = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert again == events
    resumed = sse((await flows.client.get(f"/api/runs/{rid}/events", headers={**h, "Last-Event-ID": "2"})).text)
    assert resumed == events[3:]
    await no_vms_left(flows)


async def test_a_refreshed_credential_is_written_back_encrypted(flows: Api) -> None:
    uid, h = await logged_in(flows)
    rid = await post_run(flows, h, "refresh")
    run = await wait_run(flows, h, rid)
    assert run["status"] == "succeeded" and run["credential_refreshed"] is True
    assert json.loads((await stored(flows, uid)).files[CREDS][0])["access"] == "refreshed"
    # The next run starts from the refreshed credential.
    rid = await post_run(flows, h, "again")
    await wait_run(flows, h, rid)
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert {"type": "status", "message": "init oauth:refreshed"} in [d for _, _, d in events]


async def test_api_key_runs_use_the_key_and_never_show_it(flows: Api) -> None:
    _, token = await flows.new_user()
    h = flows.auth(token)
    key = "sk-fake-" + uuid.uuid4().hex
    assert (await flows.client.put("/api/credentials/claude_code/api-key", json={"api_key": key},
                                   headers=h)).status_code == 200
    rid = await post_run(flows, h, "hi")
    run = await wait_run(flows, h, rid)
    events = (await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text
    assert run["status"] == "succeeded" and "init api_key" in events
    assert key not in events and key not in json.dumps(run)


async def test_a_crashing_cli_fails_the_run_with_the_reason(flows: Api) -> None:
    _, h = await logged_in(flows)
    rid = await post_run(flows, h, "crash")
    run = await wait_run(flows, h, rid)
    assert run["status"] == "failed" and run["exit_code"] == 2 and "status 2" in run["error_message"]
    metrics = (await flows.client.get("/metrics")).text
    assert 'polydev_runs{status="failed"} 1.0' in metrics and 'polydev_runs{status="running"} 0.0' in metrics
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert events[-1][1] == "error" and "done" not in [k for _, k, _ in events]
    await no_vms_left(flows)


async def test_cancel_mid_run_kills_the_cli_and_destroys_the_vm(flows: Api) -> None:
    _, h = await logged_in(flows)
    rid = await post_run(flows, h, "sleep 60")
    await until_event(flows, h, rid, "text")
    r = await flows.client.post(f"/api/runs/{rid}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert events[-1][1] == "error" and events[-1][2]["message"] == "cancelled by the user"
    await no_vms_left(flows)
    # The credential is free again.
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "next"}, headers=h)
    assert r.status_code == 202
    await wait_run(flows, h, r.json()["id"])


async def test_a_vm_that_dies_mid_run_fails_the_run(flows: Api) -> None:
    _, h = await logged_in(flows)
    rid = await post_run(flows, h, "sleep 60")
    await until_event(flows, h, rid, "text")
    engine = flows.services.engine
    assert engine is not None
    [vm] = await engine.list()
    row = await engine.vms.get(vm.id)
    assert row is not None and row.backend_pid
    os.killpg(row.backend_pid, signal.SIGKILL)  # the "VM" (the agent) dies
    run = await wait_run(flows, h, rid)
    assert run["status"] == "failed" and "VM stopped responding" in run["error_message"], run
    await no_vms_left(flows)


async def test_run_timeout_stops_the_cli(flows: Api) -> None:
    _, h = await logged_in(flows)
    rid = await post_run(flows, h, "sleep 60", timeout=10)
    run = await wait_run(flows, h, rid, timeout=90)
    assert run["status"] == "timeout" and "10 s" in run["error_message"]
    await no_vms_left(flows)


@pytest.mark.parametrize("prompt, why", [
    ("stall", "Reading additional input from stdin... / fetch failed: connect ECONNREFUSED api.fake.test:443"),
    ("stall retry", "connect ECONNREFUSED api.fake.test:443, retry 1/10"),  # a retry it reported, over stderr
])
async def test_a_timed_out_run_keeps_what_the_cli_last_complained_of(flows: Api, prompt: str, why: str) -> None:
    h = await api_key_user(flows)
    flows.services.run_flow.default_timeout = 4  # (a request may ask for 10 s at least)
    rid = await post_run(flows, h, prompt)
    run = await wait_run(flows, h, rid)
    assert run["status"] == "timeout", run
    assert run["error_message"] == f"the run did not finish within 4 s; Fake CLI's last error: {why}"
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert events[-1][1] == "error" and events[-1][2]["message"] == run["error_message"]
    await no_vms_left(flows)


async def test_one_live_run_per_credential(flows: Api) -> None:
    _, h = await logged_in(flows)
    first = await post_run(flows, h, "sleep 60")
    r = await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "second"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "credential_busy"
    await flows.client.post(f"/api/runs/{first}/cancel", headers=h)


async def test_bad_run_requests_are_4xx_that_say_what_to_do(flows: Api) -> None:
    _, token = await flows.new_user()
    h = flows.auth(token)
    limit = flows.services.settings.max_prompt_bytes
    cases = [
        ({"provider": "nope", "prompt": "x"}, 422, None),
        ({"provider": "claude_code", "prompt": ""}, 422, "empty_prompt"),
        ({"provider": "claude_code", "prompt": "   "}, 422, "empty_prompt"),
        ({"provider": "claude_code", "prompt": "x" * (limit + 1)}, 413, "prompt_too_large"),
        ({"provider": "claude_code", "prompt": "x", "timeout": 10 ** 6}, 422, "timeout_too_long"),
        ({"provider": "claude_code", "prompt": "x", "files": {"../etc/passwd": "x"}}, 422, "bad_files"),
        ({"provider": "claude_code", "prompt": "x"}, 409, "no_credential"),
    ]
    for body, status, code in cases:
        r = await flows.client.post("/api/runs", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        if code:
            assert r.json()["error"]["code"] == code
    assert "polydev login claude_code" in r.json()["error"]["message"]
    assert (await flows.client.get("/api/runs", headers=h)).json() == []
    await no_vms_left(flows)


async def test_another_user_cannot_see_or_cancel_a_run(flows: Api) -> None:
    _, token_a = await flows.new_user()
    _, token_b = await flows.new_user()
    ha, hb = flows.auth(token_a), flows.auth(token_b)
    await login(flows, ha)
    rid = (await flows.client.post("/api/runs", json={"provider": "claude_code", "prompt": "hi"}, headers=ha)).json()["id"]
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        r = await flows.client.request(method, f"/api/runs/{rid}{path}", headers=hb)
        assert r.status_code == 404, (path, r.text)
    assert (await flows.client.get("/api/runs", headers=hb)).json() == []
    assert (await wait_run(flows, ha, rid))["status"] == "succeeded"


# -- runs on the warm pool's prepared VMs ------------------------------------------------------------------

class PutLog:
    """Every Guest.put, with the task that made it: the run's own task is named run-<id>."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, int]] = []
        put = Guest.put

        async def logged(guest: Guest, *files: GuestFile) -> None:
            task = asyncio.current_task()
            self.calls += [(task.get_name() if task else "", f.path, f.mode) for f in files]
            await put(guest, *files)

        monkeypatch.setattr(Guest, "put", logged)

    def of_run(self, rid: str) -> dict[str, int]:
        return {path: mode for task, path, mode in self.calls if task == f"run-{rid}"}


def with_guest_ca(api: Api, root: Path) -> str:
    """Configure an extra CA for the guests, at a path inside the host-side "guest" (the real one, under
    /usr/local, is not the test's to write); returns that path."""
    svc = api.services
    path = f"{root}/ca/extra-ca.pem"
    svc.run_flow.ca_pem = b"-----BEGIN CERTIFICATE-----\ntest CA\n-----END CERTIFICATE-----\n"
    svc.run_flow._guest_env = lambda provider: replace(svc.guest_env(provider), ca_cert_path=path)
    return path


async def test_a_pooled_vm_is_prepared_and_its_run_puts_only_its_own_files(
        flows: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = flows.services.engine
    assert engine is not None and engine.pool.prepare is not None, "services wire the run flow's preparation"
    env = flows.services.guest_env("claude_code")
    ca_path = with_guest_ca(flows, tmp_path / "guest")
    engine.pool.size = 1
    assert await engine.fill_pool() == 1
    [pooled] = await engine.list()
    # Before any run: the pooled VM's agent already holds the base files (nothing else has used this guest).
    with engine.agent(pooled.id) as agent:
        assert agent.get_file(f"{env.workdir}/.polydev") == (b"", 0o600)
        assert agent.get_file(ca_path) == (flows.services.run_flow.ca_pem, 0o644)
    puts = PutLog(monkeypatch)
    h = await api_key_user(flows)
    rid = await post_run(flows, h, "hello", files={"note.txt": "the note"})
    run = await wait_run(flows, h, rid)
    assert run["status"] == "succeeded", run
    row = await flows.services.runs.get(uuid.UUID(rid))
    assert row is not None and row.vm_id == pooled.id, "the run got the pooled VM"
    # Only its own files: the CLI's settings and the user's file; no base files, no credential (API key).
    assert puts.of_run(rid) == {f"{env.home}/.fake/settings.json": 0o644, f"{env.workdir}/note.txt": 0o644}
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert any(d.get("output") == "the note" for _, _, d in events) and events[-1][1] == "done"
    assert [seq for seq, _, _ in events] == list(range(len(events)))
    assert [d["message"] for _, _, d in events[:2]] == ["starting a VM", "running Fake CLI"]
    await engine.close()  # the pool's VMs too
    await no_vms_left(flows)


async def test_an_oauth_run_on_a_prepared_vm_puts_its_credential_private(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _, h = await logged_in(flows)  # the login, before the pool exists, takes a fresh VM
    engine = flows.services.engine
    assert engine is not None
    engine.pool.size = 1
    await engine.fill_pool()
    [pooled] = engine.pool.ready
    puts = PutLog(monkeypatch)
    rid = await post_run(flows, h, "hello")
    assert (await wait_run(flows, h, rid))["status"] == "succeeded"
    row = await flows.services.runs.get(uuid.UUID(rid))
    assert row is not None and row.vm_id == pooled
    env = flows.services.guest_env("claude_code")
    assert puts.of_run(rid) == {f"{env.home}/.fake/settings.json": 0o644, env.home_path(CREDS): 0o600}
    await engine.close()


async def test_a_run_on_an_unprepared_vm_puts_the_base_files_itself(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    assert flows.services.engine is not None and flows.services.engine.pool.size == 0
    puts = PutLog(monkeypatch)
    h = await api_key_user(flows)
    rid = await post_run(flows, h, "hello")
    assert (await wait_run(flows, h, rid))["status"] == "succeeded"
    env = flows.services.guest_env("claude_code")
    assert puts.of_run(rid) == {f"{env.workdir}/.polydev": 0o600, f"{env.home}/.fake/settings.json": 0o644}
    await no_vms_left(flows)


async def test_a_failed_preparation_pools_nothing_leaves_nothing_and_the_pool_fills_later(
        flows: Api, tmp_path: Path) -> None:
    engine = flows.services.engine
    assert engine is not None
    env = flows.services.guest_env("claude_code")
    blocker = Path(env.workdir)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the working directory goes: the staging PUT fails")
    engine.pool.size = 1
    with pytest.raises(VMCreateError, match="pool preparation failed"):
        await engine.fill_pool()
    assert engine.pool.ready == () and await engine.list() == []
    assert find_marked_processes(engine.tag) == {} and await engine.leases.held() == {}
    assert not any(engine.vms_dir.iterdir()), "the VM's disk is gone"
    [row] = await engine.vms.list(live_only=False)
    assert row.status == "failed" and "pool preparation failed" in (row.error_message or "")
    # The background filler keeps trying; once the guest can be prepared, the pool fills.
    engine.start_pool(retry_after=0.05)
    for _ in range(200):
        if len(await engine.vms.list(live_only=False)) >= 3:  # it has retried (and failed) at least once more
            break
        await asyncio.sleep(0.05)
    blocker.unlink()
    for _ in range(600):
        if engine.pool.ready:
            break
        await asyncio.sleep(0.05)
    assert len(engine.pool.ready) == 1
    pooled = engine.pool.ready[0]
    vm = await engine.create(None, "cli")
    assert vm.prepared and vm.id == pooled
    await engine.close()
    await no_vms_left(flows)


async def test_a_reader_woken_with_events_that_do_not_follow_on_reads_them_from_the_table(flows: Api) -> None:
    """The writer hands stored events to this process's readers; a reader that missed one (here: 0) must
    not skip it by taking the handed-on 1."""
    svc = flows.services
    uid, _ = await flows.new_user()
    row = await svc.runs.create(uuid.UUID(uid), "claude_code", "x", timeout_seconds=60, credential_kind="api_key")
    got: list[int] = []

    async def read() -> None:
        async for ev in svc.run_flow.stream(row.id):
            if ev is not None:
                got.append(ev.seq)

    reader = asyncio.create_task(read())
    while row.id not in svc.run_flow.events._waiters:  # the reader is waiting
        await asyncio.sleep(0.01)
    first, second = StoredEvent(0, {"type": "text", "text": "a"}), StoredEvent(1, {"type": "text", "text": "b"})
    await svc.runs.append_events(row.id, [first, second])
    svc.run_flow.events.notify(row.id, [second])
    for _ in range(500):
        if len(got) >= 2:
            break
        await asyncio.sleep(0.01)
    await svc.runs.finish(row.id, "succeeded")
    svc.run_flow.events.notify(row.id)
    await asyncio.wait_for(reader, 30)
    assert got == [0, 1]


async def test_a_run_whose_vm_does_not_start_streams_its_first_status_then_the_reason(
        flows: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first status is stored while the VM is being created; a creation that fails at once must still
    leave the stream in order: that status, then the error."""
    async def no_vm(*args: Any, **kw: Any) -> Any:
        raise VMCreateError(uuid.uuid4(), "no capacity left")

    assert flows.services.engine is not None
    monkeypatch.setattr(flows.services.engine, "create", no_vm)
    h = await api_key_user(flows)
    rid = await post_run(flows, h, "hi")
    run = await wait_run(flows, h, rid)
    assert run["status"] == "failed" and "no capacity left" in run["error_message"]
    events = sse((await flows.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert [(seq, kind) for seq, kind, _ in events] == [(0, "status"), (1, "error")]
    assert events[0][2]["message"] == "starting a VM" and "no capacity left" in events[1][2]["message"]


async def test_cancel_of_a_run_no_process_drives_ends_its_stream_after_what_was_stored(flows: Api) -> None:
    """A run whose server stopped (not reclaimed yet): cancel ends it, its last event numbered after the
    stored ones (it was numbered 0 before, colliding with the first)."""
    from polydev.providers.base import event
    from polydev.store.runs import StoredEvent

    uid, h = await logged_in(flows)
    runs = flows.services.runs
    row = await runs.create(uuid.UUID(uid), "claude_code", "p", timeout_seconds=60, credential_kind="oauth")
    await runs.append_events(row.id, [StoredEvent(0, event("status", message="starting a VM")),
                                      StoredEvent(1, event("text", text="hi"))])
    r = await flows.client.post(f"/api/runs/{row.id}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    stored_events = await runs.events_after(row.id)
    assert [e.seq for e in stored_events] == [0, 1, 2]
    assert stored_events[-1].data == {"type": "error", "message": "cancelled by the user"}
    assert await runs.last_seq(row.id) == 2 and await runs.last_seq(uuid.uuid4()) == -1
