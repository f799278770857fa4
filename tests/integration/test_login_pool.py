"""Pre-started logins (LOGIN_POOL, core/login_pool.py) through the API, on the same stand-in VMs as
test_flows.py (the real guest agent on the host, a scripted CLI): a taken login is at `awaiting_user_auth`
at once and finishes like any other, each goes to one user, unclaimed ones are replaced at their max age,
and a CLI that fails before its URL is not restarted hot. Nothing is left behind."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import ValidationError

from polydev.config import Settings, parse_login_pool
from polydev.core import login_pool
from polydev.providers import ADAPTERS
from tests.support.app import Api
from tests.support.flow_api import no_vms_left, stored, wait_status
from tests.support.flow_fakes import FakeAdapter

KEY = "claude_code:browser"
CREDS_ACCESS = b'"access": "from-paste"'


def use_pool(api: Api, n: int = 1, max_age: float = 60.0) -> None:
    flow = api.services.login_flow
    flow.pool_max_age = max_age
    flow.set_pool({("claude_code", None): n})
    flow.start_pool()


async def until(check, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def pooled_ready(api: Api, n: int = 1) -> None:
    async def ready() -> bool:
        return api.services.login_flow.pool.counts()[KEY]["ready"] >= n
    await until(ready, what="a pre-started login with its URL")


async def unowned_vms(api: Api) -> list[uuid.UUID]:
    assert api.services.engine is not None
    return [vm.id for vm in await api.services.engine.list() if vm.user_id is None]


async def test_a_pre_started_login_is_awaiting_at_once_and_completes(flows: Api) -> None:  # noqa: F811
    use_pool(flows)
    await pooled_ready(flows)
    [pooled_vm] = await unowned_vms(flows)
    health = (await flows.client.get("/health")).json()
    assert health["vm"]["login_pool"] == {KEY: {"held": 1, "ready": 1, "wanted": 1}}
    metrics = (await flows.client.get("/metrics")).text
    assert 'polydev_login_pool{method="browser",provider="claude_code",state="ready"} 1.0' in metrics
    uid, token = await flows.new_user()
    h = flows.auth(token)
    r = await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)
    assert r.status_code == 202, r.text
    first = r.json()
    # The answer to the start itself already carries the login page: no wait for the VM or the CLI.
    assert first["status"] == "awaiting_user_auth" and first["accepts_code"] is True
    assert first["auth_url"].startswith("https://auth.fake.test/authorize?")
    engine = flows.services.engine
    assert engine is not None
    # The pre-started login's VM is now the user's.
    assert [vm.id for vm in await engine.list(user_id=uuid.UUID(uid))] == [pooled_vm]
    sid = first["session_id"]
    r = await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert r.status_code == 202, r.text
    assert (await wait_status(flows, h, sid, "completed", "failed"))["status"] == "completed"
    assert CREDS_ACCESS in (await stored(flows, uid)).files[".fake/creds.json"][0]
    assert await engine.get(pooled_vm) is not None and (await engine.get(pooled_vm)).status == "destroyed"  # type: ignore[union-attr]
    # The pool has started a replacement for the next user.
    await pooled_ready(flows)
    assert pooled_vm not in await unowned_vms(flows)
    await flows.services.login_flow.close()
    await no_vms_left(flows)


async def test_each_pre_started_login_goes_to_one_user(flows: Api) -> None:  # noqa: F811
    use_pool(flows)
    await pooled_ready(flows)
    heads = []
    for _ in range(2):
        _, token = await flows.new_user()
        heads.append(flows.auth(token))
    a, b = await asyncio.gather(*(flows.client.post("/api/auth/start", json={"provider": "claude_code"},
                                                    headers=h) for h in heads))
    bodies = [a.json(), b.json()]
    assert sorted(body["status"] for body in bodies) == ["awaiting_user_auth", "initializing"]
    # The second user got a login of their own, started for them.
    late = next(body for body, h in zip(bodies, heads, strict=True) if body["status"] == "initializing")
    h_late = heads[bodies.index(late)]
    await wait_status(flows, h_late, late["session_id"], "awaiting_user_auth")
    engine = flows.services.engine
    assert engine is not None
    owners = [vm.user_id for vm in await engine.list() if vm.user_id is not None]
    assert len(owners) == 2 and len(set(owners)) == 2  # one VM each
    for body, h in zip(bodies, heads, strict=True):  # neither can act on the other's session
        other = heads[1 - heads.index(h)]
        r = await flows.client.post(f"/api/auth/sessions/{body['session_id']}/cancel", headers=other)
        assert r.status_code == 404
        r = await flows.client.post(f"/api/auth/sessions/{body['session_id']}/cancel", headers=h)
        assert r.json()["status"] == "cancelled"
    await flows.services.login_flow.close()
    await no_vms_left(flows)


async def test_a_taken_login_gets_the_full_login_timeout(flows: Api) -> None:  # noqa: F811
    use_pool(flows, max_age=15)
    await pooled_ready(flows)
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    await asyncio.sleep(16)  # past the pre-started login's max age: taken, it runs on the login's timeout (60 s)
    assert (await wait_status(flows, h, sid, "awaiting_user_auth", "timeout", "failed"))["status"] == \
        "awaiting_user_auth"
    await flows.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
    assert (await wait_status(flows, h, sid, "completed", "failed"))["status"] == "completed"
    await flows.services.login_flow.close()
    await no_vms_left(flows)


def counting_starts(api: Api) -> tuple[list[float], list[float]]:
    """Wrap the pool's pre-start: (when each pre-start began, when each pre-started login's task ended), on
    the event loop's clock, which is the one the pool's max age and back-off run on."""
    flow = api.services.login_flow
    loop = asyncio.get_running_loop()
    started: list[float] = []
    ended: list[float] = []
    prestart = flow.pool._prestart

    def counting(provider: str, method: str):  # type: ignore[no-untyped-def]
        started.append(loop.time())
        entry = prestart(provider, method)
        if entry is not None:
            # Registered before the pool's own callback: ends are recorded no later than the pool sees them.
            entry.task.add_done_callback(lambda _t: ended.append(loop.time()))
        return entry
    flow.pool._prestart = counting
    return started, ended


async def test_an_unclaimed_login_is_replaced_at_its_max_age(flows: Api) -> None:  # noqa: F811
    max_age = 15.0  # above the seconds a loaded machine needs to the URL: one that times out before is a failure
    use_pool(flows, max_age=max_age)
    started, _ = counting_starts(flows)
    await pooled_ready(flows)
    [first] = await unowned_vms(flows)

    async def replaced() -> bool:
        vms = await unowned_vms(flows)
        return bool(vms) and first not in vms
    await until(replaced, what="the replacement of an expired pre-started login")
    # Not before its max age: the replacement began no sooner than max_age after the first began (a lower
    # bound the code guarantees, whatever the machine's speed).
    assert len(started) == 2 and started[1] - started[0] >= max_age, started
    engine = flows.services.engine
    assert engine is not None
    row = await engine.get(first)
    assert row is not None and row.status == "destroyed"
    # No session was ever made for it.
    assert await flows.services.login_sessions.repo.live() == []
    await flows.services.login_flow.close()
    await no_vms_left(flows)


async def test_renewing_the_pool_replaces_unclaimed_logins_and_leaves_taken_ones(flows: Api) -> None:  # noqa: F811
    """After an image switch (core/image_follow.py) the logins nobody took are ended and started again (on the
    new image); one a user holds goes on."""
    use_pool(flows, n=2)
    await pooled_ready(flows, n=2)
    uid, token = await flows.new_user("renewer")
    r = await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=flows.auth(token))
    assert r.status_code == 202 and r.json()["status"] == "awaiting_user_auth", r.text
    session = r.json()["session_id"]
    await pooled_ready(flows, n=2)  # the taken one replaced
    before = set(await unowned_vms(flows))
    assert len(before) == 2
    assert await flows.services.login_flow.renew_pool() == 2

    async def renewed() -> bool:
        now = set(await unowned_vms(flows))
        return len(now) == 2 and not (now & before)
    await until(renewed, timeout=180, what="two new pre-started logins")
    state = (await flows.client.get(f"/api/auth/sessions/{session}", headers=flows.auth(token))).json()
    assert state["status"] == "awaiting_user_auth"  # the user's login was not touched
    await flows.services.login_flow.close()
    await no_vms_left(flows)


async def test_a_cli_failing_before_its_url_is_not_restarted_hot(flows: Api,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter("fail"))
    assert login_pool.FAILURE_BACKOFF_S == 30.0  # the documented back-off; shortened below to see it end
    backoff = 2.0
    monkeypatch.setattr(login_pool, "FAILURE_BACKOFF_S", backoff)
    use_pool(flows)
    flow = flows.services.login_flow
    started, ended = counting_starts(flows)

    # It tries again once the back-off is over, and not sooner: a lower bound on the loop's clock, which holds
    # whatever the machine's speed (without the back-off the retry follows the failure at once).
    async def retried() -> bool:
        return len(started) >= 2 and len(ended) >= 1
    await until(retried, what="the retry after the back-off")
    assert started[1] >= ended[0] + backoff, (started, ended)
    await flow.stop_pool()
    # A user still gets a login of their own, which says why it failed.
    _, token = await flows.new_user()
    h = flows.auth(token)
    sid = (await flows.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]
    body = await wait_status(flows, h, sid, "failed", "completed")
    assert "cannot reach the provider" in body["error_message"]
    await flow.close()
    await no_vms_left(flows)


def test_login_pool_setting_is_checked() -> None:
    assert parse_login_pool("claude_code=1, codex:device=2") == {("claude_code", None): 1, ("codex", "device"): 2}
    assert parse_login_pool("") == {}
    for bad in ("claude_code", "claude_code=x", "=1", "nope=1", "codex:paste=1"):
        with pytest.raises((ValueError, ValidationError)):
            Settings(login_pool=bad)


def test_login_pool_max_age_has_a_lower_bound() -> None:
    """A pre-started login younger than 30 s would be replaced about as fast as a CLI prints its URL under
    emulation (10–70 s): the pool would churn VMs and hand out logins about to expire."""
    assert Settings(login_pool_max_age_seconds=30).login_pool_max_age_seconds == 30
    for bad in (29, 0, -1):
        with pytest.raises(ValidationError, match="login_pool_max_age_seconds"):
            Settings(login_pool_max_age_seconds=bad)
