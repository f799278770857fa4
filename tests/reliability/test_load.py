"""Load: 20 logins and 50 runs by 20 users at once (locust, over real HTTP), each in a real VM with the scripted
CLI. Every one ends with a status (and a reason when it did not succeed), no request answers 5xx, and once all
have ended nothing is left: no VM process, work directory, egress socket, lease or live row. A refused request
(429) names the limit it hit."""

from __future__ import annotations

import os

import httpx

from polydev.client import PolydevClient
from tests.reliability.conftest import LOGIN_TIMEOUT_S, LONG, Row
from tests.support import orphans
from tests.support.live_server import LiveServer
from tests.support.load import make_users, run_jobs
from tests.support.waits import eventually

USERS, LOGINS, RUNS = 20, 20, 50
if os.environ.get("POLYDEV_RELIABILITY_LOAD"):  # "LOGINS,RUNS": a smaller load for a quick look on a busy machine
    LOGINS, RUNS = (int(n) for n in os.environ["POLYDEV_RELIABILITY_LOAD"].split(","))
ROUNDS = 3 if LONG else 1


def left_behind(server: LiveServer, db_url: str | None = None) -> dict[str, int]:
    """What is left once the server has had a moment to finish destroying the VMs of runs that just ended
    (`db_url`: its DATABASE_URL, when not the embedded SQLite)."""
    found: dict[str, int] = {}

    def clean() -> bool:
        found.update(orphans.find(server.data_dir, db_url))
        return not any(found.values())

    eventually(clean, timeout=60, every=1.0)
    return found


def test_logins_and_runs_at_once_all_end_with_a_reason_and_leave_nothing(server: LiveServer,
                                                                          report: list[Row]) -> None:
    tokens = make_users(server.url, server.admin_token, USERS)
    for round_ in range(ROUNDS):
        # The clients wait past the server's own limits (LOGIN_TIMEOUT_SECONDS, the runs' timeout): every job
        # ends by the server's word, never by a client giving up on a login the server still drives.
        result = run_jobs([server.url], [tokens], logins=LOGINS, runs=RUNS, timeout=LOGIN_TIMEOUT_S + 120,
                          wall_s=LOGIN_TIMEOUT_S + 600)
        found = left_behind(server)
        ended = [j for j in result.jobs if j.get("status") and (j["status"] in ("completed", "succeeded")
                                                                 or j.get("reason"))]
        report.append(Row("load" + (f" round {round_ + 1}" if ROUNDS > 1 else ""),
                          f"{LOGINS} logins + {RUNS} runs at once, {USERS} users ({result.wall_s:.0f} s)", "none",
                          f"{len(ended)}/{len(result.jobs)}", sum(found.values()), len(result.server_errors)))
        assert result.server_errors == []
        assert result.without_reason() == []
        statuses = {(j["kind"], j["status"]) for j in result.jobs}
        # The scripted CLI succeeds at both: anything else is the platform failing under load.
        assert statuses == {("login", "completed"), ("run", "succeeded")}, \
            sorted({(j["kind"], j["status"], j.get("reason")) for j in result.jobs}, key=str)
        assert found == dict.fromkeys(found, 0), orphans.describe(found)


def test_a_refusal_under_quota_is_a_429_naming_its_limit(server: LiveServer) -> None:
    [token] = make_users(server.url, server.admin_token, 1, prefix="capped")
    with PolydevClient(server.url, server.admin_token) as admin, PolydevClient(server.url, token) as pd:
        admin.set_quotas(pd.me()["id"], {"runs": 0})
    answer = httpx.post(f"{server.url}/api/runs", json={"provider": "codex", "prompt": "hello"},
                        headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert error["code"] == "quota_exceeded" and "quota runs" in error["message"], error
    assert orphans.find(server.data_dir)["run rows live"] == 0
