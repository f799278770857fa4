"""PostgreSQL, then Redis, stopped and started again while logins and runs are under way (real VMs, the scripted
CLI, a server on a database and a Redis of this test's own): what a request gets while a store is down is a
JSON error (a 503 naming the store, never a bare 500 or a hang; runs wait for the database to store their
events and their end), and once both are back every login and run
ends with a status (and a reason when it did not succeed), nothing is lost (the logins complete with the code
sent after the outages, their credentials stored) and nothing is left behind."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from polydev.client import PolydevClient
from polydev.store.vault import generate_master_key
from polydev.vm import images
from tests.reliability.conftest import LONG, Row, ask, scripted_server
from tests.reliability.test_load import left_behind
from tests.support import servers
from tests.support.load import make_users

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# A login each, and runs on the three providers in turn. CI's version keeps the VMs few (each one is minutes of
# emulated CPU on 2 cores); the long run (POLYDEV_RELIABILITY_LONG=1) holds more through the outages.
USERS, RUNS = (4, 8) if LONG else (2, 3)
OUTAGE_S = 10
SESSION_END = ("completed", "failed", "timeout", "cancelled")
RUN_END = ("succeeded", "failed", "timeout", "cancelled")


@pytest.fixture(scope="module")
def stores() -> Iterator[tuple[servers.Server, servers.Server]]:
    pg, redis = servers.start_postgres(private=True), servers.start_redis(private=True)
    yield pg, redis
    redis.close()
    pg.close()


def _names_the_store(code: int, body: dict) -> bool:
    """/health says which part is down (503 "degraded"); the API answers 503 store_unavailable."""
    return code == 503 and (body.get("error", {}).get("code") == "store_unavailable"
                            or body.get("status") == "degraded")


def _until_ended(url: str, token: str, ends: tuple[str, ...], timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = ask("GET", url, token)
        if code == 200 and body.get("status") in ends:
            return body
        time.sleep(1)
    return {"status": None, "error_message": f"did not end within {timeout:.0f} s (last answer {code}: {body})"}


def test_the_database_and_redis_stopped_and_restarted_under_load(tmp_path_factory: pytest.TempPathFactory,
                                                                  test_image: images.Image, stores,
                                                                  report: list[Row]) -> None:
    pg, redis = stores
    database = servers.create_database(pg.url, f"t_{uuid.uuid4().hex[:16]}")
    running = scripted_server(tmp_path_factory.mktemp("outage"), test_image, DATABASE_URL=database,
                              REDIS_URL=redis.url, CREDENTIAL_ENCRYPTION_KEY=generate_master_key(),
                              LOGIN_TIMEOUT_SECONDS="1200")
    server = next(running)
    during: dict[str, list[tuple[int, dict]]] = {}
    try:
        tokens = make_users(server.url, server.admin_token, USERS, prefix="outage")
        logins: list[tuple[str, str]] = []
        runs: list[tuple[str, str]] = []
        for i, token in enumerate(tokens):
            with PolydevClient(server.url, token, timeout=120) as pd:
                logins.append((token, pd.start_login("claude_code")["session_id"]))
        for i in range(RUNS):
            token = tokens[i % USERS]
            provider = ("claude_code", "codex", "gemini_cli")[i % 3]
            with PolydevClient(server.url, token, timeout=120) as pd:
                runs.append((token, pd.start_run(provider, "sleep 20", timeout=900)["id"]))
        # Under way: every login shows its page, the runs are in their VMs or on their way to them.
        for token, sid in logins:
            with PolydevClient(server.url, token, timeout=120) as pd:
                assert pd.wait_session(sid, timeout=900)["status"] == "awaiting_user_auth"

        for name, store in (("PostgreSQL", pg), ("Redis", redis)):
            store.halt()
            try:
                time.sleep(2)
                token, rid = runs[0]
                answers = [ask("GET", f"{server.url}/api/runs/{rid}", token),
                           ask("GET", f"{server.url}/api/auth/sessions/{logins[0][1]}", logins[0][0]),
                           ask("GET", f"{server.url}/health", token)]
                during[name] = answers
                time.sleep(OUTAGE_S)
            finally:
                store.resume()

        for token, sid in logins:  # the code the user pastes once the stores are back
            with PolydevClient(server.url, token, timeout=120) as pd:
                state = pd.session(sid)
                if state["status"] == "awaiting_user_auth":
                    pd.submit_code(sid, "good-code")
        ended_logins = [_until_ended(f"{server.url}/api/auth/sessions/{sid}", t, SESSION_END) for t, sid in logins]
        ended_runs = [_until_ended(f"{server.url}/api/runs/{rid}", t, RUN_END) for t, rid in runs]
        found = left_behind(server, database)
        health = httpx.get(f"{server.url}/health", timeout=30)
    finally:
        running.close()

    jobs = ended_logins + ended_runs
    with_reason = [j for j in jobs if j["status"] in ("completed", "succeeded") or
                   (j["status"] is not None and j.get("error_message"))]
    # A 503 naming the store that is down (with Retry-After) is the answer designed for an outage, not an error.
    server_errors = [code for answers in during.values() for code, body in answers
                     if code == 0 or code >= 500 and not _names_the_store(code, body)]
    report.append(Row("database and Redis restarted", f"{USERS} logins + {RUNS} runs under way",
                      f"PostgreSQL, then Redis, down {OUTAGE_S + 2} s each", f"{len(with_reason)}/{len(jobs)}",
                      sum(found.values()), len(server_errors)))
    # While a store was down, answers were clear JSON errors or answers, never a hang or a bare 500.
    assert server_errors == [], during
    assert health.status_code == 200, health.text
    assert len(with_reason) == len(jobs), jobs
    # Nothing lost: the logins finished with the code sent after the outages.
    assert [j["status"] for j in ended_logins] == ["completed"] * USERS, ended_logins
    assert found == dict.fromkeys(found, 0), found
