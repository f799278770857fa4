"""The egress admin API and the accounting read side, on both deployments (SQLite + memory, PostgreSQL +
Redis): admins set each mode, non-admins cannot and see only their own usage, bad input changes nothing,
and an upstream proxy's password never comes back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from polydev.config.egress import AddressPool
from polydev.store.egress import Delta
from tests.support.app import Api

POOL = AddressPool.parse("203.0.113.10-203.0.113.11,2001:db8:7::/64")
PASSWORD = "pr0xy-Secret-9f3a"
PROXY = f"http://carol:{PASSWORD}@proxy.example.test:3128"


@pytest.fixture
def changed(api: Api) -> list[uuid.UUID]:
    """The pool the operator configured, and the users whose cached gateway route was dropped."""
    seen: list[uuid.UUID] = []
    api.services.egress_admin.pool = POOL
    api.services.egress_admin.on_change = seen.append
    return seen


async def put(api: Api, uid: str, body: dict[str, Any], token: str | None = None) -> httpx.Response:
    return await api.client.put(f"/api/users/{uid}/egress", json=body, headers=api.auth(token or api.admin_token))


async def get(api: Api, uid: str, token: str | None = None) -> httpx.Response:
    return await api.client.get(f"/api/users/{uid}/egress", headers=api.auth(token or api.admin_token))


async def test_admin_sets_each_mode(api: Api, changed: list[uuid.UUID]) -> None:
    uid, _ = await api.new_user()
    r = await get(api, uid)
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "direct" and r.json()["address"] is None and r.json()["has_proxy"] is False

    r = await put(api, uid, {"mode": "address"})
    assert r.status_code == 200, r.text
    assert (r.json()["address"], r.json()["family"]) == ("203.0.113.10", 4)
    r = await put(api, uid, {"mode": "address", "family": 6, "limits": {"concurrent": 3}})
    assert (r.json()["address"], r.json()["family"]) == ("2001:db8:7::1", 6)
    assert r.json()["limits"] == {"concurrent": 3} and r.json()["effective_limits"]["concurrent"] == 3

    r = await put(api, uid, {"mode": "proxy", "proxy_url": PROXY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "proxy" and body["has_proxy"] is True
    assert body["proxy"] == "http://proxy.example.test:3128"
    assert PASSWORD not in r.text and "carol" not in r.text
    assert body["limits"] == {"concurrent": 3}  # limits left out: kept

    r = await put(api, uid, {"mode": "proxy", "proxy_url": "socks5://proxy2.example.test"})
    assert r.json()["proxy"] == "socks5://proxy2.example.test:1080"
    r = await put(api, uid, {"mode": "direct", "limits": {}})
    assert r.json()["mode"] == "direct" and r.json()["has_proxy"] is False and r.json()["limits"] == {}
    assert (await get(api, uid)).json()["mode"] == "direct"
    assert changed == [uuid.UUID(uid)] * 5  # every change told the gateway

    listed = await api.client.get("/api/egress/identities", headers=api.auth(api.admin_token))
    assert listed.status_code == 200
    assert {i["user_name"] for i in listed.json()} >= {"admin"} and uid in {i["user_id"] for i in listed.json()}


async def test_the_proxy_password_is_never_answered_or_logged(api: Api, changed: list[uuid.UUID]) -> None:
    uid, _ = await api.new_user()
    with capture_logs() as logs:
        answers = [await put(api, uid, {"mode": "proxy", "proxy_url": PROXY}),
                   await get(api, uid),
                   await api.client.get("/api/egress/identities", headers=api.auth(api.admin_token)),
                   await put(api, uid, {"mode": "proxy"}),  # keeps the sealed URL
                   await put(api, uid, {"mode": "proxy", "proxy_url": f"ftp://carol:{PASSWORD}@x.test"}),
                   await put(api, uid, {"mode": "proxy", "proxy_url": f"http://carol:{PASSWORD}@x.test:99999"}),
                   await put(api, uid, {"mode": "direct", "proxy_url": PROXY}),
                   await put(api, uid, {"mode": "proxy", "proxy_url": PROXY, "bogus": 1})]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 422, 422, 422, 422]
    for a in answers:
        assert PASSWORD not in a.text, a.text
    assert answers[3].json()["proxy"] == "http://proxy.example.test:3128"
    assert logs and PASSWORD not in repr(logs)
    assert await api.services.egress_admin.repo.proxy_url(uuid.UUID(uid)) == PROXY  # refused ones changed nothing


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"mode": "tunnel"}, 422, "bad_egress_mode"),
    ({"mode": "proxy", "proxy_url": "ftp://proxy.test"}, 422, "bad_proxy_url"),
    ({"mode": "proxy", "proxy_url": "http://"}, 422, "bad_proxy_url"),
    ({"mode": "proxy"}, 422, "bad_proxy_url"),  # no URL given and none stored
    ({"mode": "direct", "proxy_url": "http://proxy.test"}, 422, "bad_proxy_url"),
    ({"mode": "address", "family": 5}, 422, "bad_egress_family"),
    ({"mode": "direct", "family": 4}, 422, "bad_egress_family"),
    ({"mode": "address", "limits": {"parallel": 3}}, 422, "bad_egress_limits"),
    ({"mode": "address", "limits": {"concurrent": 0}}, 422, "bad_egress_limits"),
    ({"mode": "address", "limits": {"bytes_per_day": -1}}, 422, "bad_egress_limits"),
    ({"mode": "address", "limits": {"per_minute": "many"}}, 422, "validation_error"),
    ({"proxy_url": "http://proxy.test"}, 422, "validation_error"),
])
async def test_bad_input_changes_nothing(api: Api, changed: list[uuid.UUID], body: dict[str, Any], status: int,
                                         code: str) -> None:
    uid, _ = await api.new_user()
    before = (await put(api, uid, {"mode": "direct", "limits": {"per_minute": 7}})).json()
    r = await put(api, uid, body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.json()["error"]["message"]
    assert (await get(api, uid)).json() == before
    assert await api.services.egress_admin.repo.proxy_url(uuid.UUID(uid)) is None
    assert len(changed) == 1


async def test_address_pool_empty_or_exhausted(api: Api, changed: list[uuid.UUID]) -> None:
    a, _ = await api.new_user()
    b, _ = await api.new_user()
    c, _ = await api.new_user()
    assert (await put(api, a, {"mode": "address", "family": 4})).json()["address"] == "203.0.113.10"
    assert (await put(api, b, {"mode": "address", "family": 4})).json()["address"] == "203.0.113.11"
    r = await put(api, c, {"mode": "address", "family": 4})
    assert r.status_code == 409 and r.json()["error"]["code"] == "address_pool_exhausted"
    assert "EGRESS_ADDRESS_POOL" in r.json()["error"]["message"]
    assert (await get(api, c)).json()["mode"] == "direct"

    api.services.egress_admin.pool = AddressPool.parse("203.0.113.10-203.0.113.11")
    r = await put(api, c, {"mode": "address", "family": 6})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_address_pool"
    assert "IPv6" in r.json()["error"]["message"]
    api.services.egress_admin.pool = AddressPool()
    r = await put(api, c, {"mode": "address"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_address_pool"
    assert "EGRESS_ADDRESS_POOL" in r.json()["error"]["message"]
    assert (await get(api, c)).json()["mode"] == "direct"


async def test_non_admins_get_403_and_unknown_users_404(api: Api, changed: list[uuid.UUID]) -> None:
    uid, token = await api.new_user()
    assert (await get(api, uid, token)).status_code == 403  # not even their own
    r = await put(api, uid, {"mode": "direct"}, token)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (await api.client.get("/api/egress/identities", headers=api.auth(token))).status_code == 403
    r = await api.client.get("/api/egress/usage?all=true", headers=api.auth(token))
    assert r.status_code == 403
    assert changed == []

    nobody = str(uuid.uuid4())
    for r in (await get(api, nobody), await put(api, nobody, {"mode": "direct"})):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await get(api, "not-a-uuid")
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_id"
    assert (await api.client.get("/api/egress/usage")).status_code == 401


async def test_usage_is_your_own_unless_an_admin_asks_for_all(api: Api) -> None:
    a, a_token = await api.new_user("alice")
    b, b_token = await api.new_user("bob")
    now = datetime.now(UTC)
    await api.services.egress_admin.repo.record([
        Delta(uuid.UUID(a), "api.anthropic.com", 3, 100, 2000, 0, None, now, now),
        Delta(uuid.UUID(b), "api.openai.com", 1, 10, 20, 2, "not on the allow-list for codex runs", now, now),
        Delta(None, "platform.claude.com", 1, 1, 1, 0, None, now, now),
    ])
    mine = await api.client.get("/api/egress/usage", headers=api.auth(a_token))
    assert mine.status_code == 200
    assert [(u["host"], u["connections"], u["bytes_up"], u["bytes_down"]) for u in mine.json()] == [
        ("api.anthropic.com", 3, 100, 2000)]
    assert mine.json()[0]["user_name"] == "alice"
    assert set(mine.json()[0]) == {"user_id", "user_name", "host", "connections", "bytes_up", "bytes_down",
                                   "refusals", "last_refusal", "first_seen", "last_seen"}
    theirs = (await api.client.get("/api/egress/usage", headers=api.auth(b_token))).json()
    assert [(u["host"], u["refusals"], u["last_refusal"]) for u in theirs] == [
        ("api.openai.com", 2, "not on the allow-list for codex runs")]
    # all=false for a non-admin is just their own
    assert (await api.client.get("/api/egress/usage?all=false", headers=api.auth(b_token))).json() == theirs

    everyone = await api.client.get("/api/egress/usage?all=true", headers=api.auth(api.admin_token))
    assert everyone.status_code == 200
    assert {(u["user_name"], u["host"]) for u in everyone.json()} == {
        ("alice", "api.anthropic.com"), ("bob", "api.openai.com"), (None, "platform.claude.com")}
    assert (await api.client.get("/api/egress/usage", headers=api.auth(api.admin_token))).json() == []


async def test_metrics_show_egress_totals_without_a_user_label(api: Api) -> None:
    from polydev.egress.usage import UsageBook

    book = UsageBook()
    book.connected(uuid.uuid4(), "api.anthropic.com", "run")
    book.transferred(uuid.uuid4(), "api.anthropic.com", 5, 7)
    text = (await api.client.get("/metrics")).text
    assert 'polydev_egress_tunnels_total{purpose="run",result="opened"}' in text
    assert 'polydev_egress_bytes_total{direction="down"}' in text
    assert "user" not in "".join(line for line in text.splitlines() if line.startswith("polydev_egress"))
