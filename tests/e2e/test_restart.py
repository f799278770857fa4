"""A server that crashes mid-login and mid-run, and its next start: the login session and the run it was driving
can never finish now (their VMs and CLI processes went with it), so the next start marks them failed with the
reason (`reclaim()` in core/login_flow.py and core/run_flow.py, called from the app's lifespan), instead of
leaving them live forever or expiring them with a misleading reason. On the embedded deployment and on
PostgreSQL + Redis, where the session store outlives the server and still says the login is waiting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev.client import PolydevClient
from tests.support import servers
from tests.support.live_server import LiveServer, crash, start_server

LOGIN_LOST = "the server restarted before the login finished; start a new session"
RUN_LOST = "the server restarted before the run finished"


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def deployment(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "embedded":
        return {}
    pg = servers.create_database(request.getfixturevalue("postgres_server"), f"t_{uuid.uuid4().hex[:16]}")
    return {"DATABASE_URL": pg, "REDIS_URL": request.getfixturevalue("redis_server")}


def serve(root: Path, env: dict[str, str]) -> Iterator[LiveServer]:
    """The server with the scripted CLI (tests/support/flow_fakes.py), on the data directory `root`."""
    return start_server(root, "tests.support.fake_vm_server", {"POLYDEV_TEST_FAKE_CLI": str(root / "guest"), **env})


def test_the_next_start_fails_what_a_crashed_server_was_driving(deployment: dict[str, str], tmp_path: Path) -> None:
    first = serve(tmp_path, deployment)
    crashed = next(first)
    try:
        with PolydevClient(crashed.url, crashed.admin_token) as admin:
            user = admin.create_user(f"restart{time.time_ns()}")
            token = admin.issue_token(user["id"])["token"]
        with PolydevClient(crashed.url, token) as pd:
            session = pd.start_login("claude_code")["session_id"]
            assert pd.wait_session(session, timeout=120)["status"] == "awaiting_user_auth"
            pd.set_api_key("claude_code", "sk-fake-key-0123")
            run = pd.start_run("claude_code", "sleep 20")["id"]  # prints "working", then works for 20 s
            before = []
            for ev in pd.run_events(run):
                before.append(ev)
                if ev["type"] == "text":
                    break  # mid-run: the CLI is sleeping
            assert pd.run(run)["status"] == "running"
        crash(crashed)  # not a shutdown: nothing gets to end the login or the run
    finally:
        first.close()

    second = serve(tmp_path, deployment)
    restarted = next(second)
    try:
        with PolydevClient(restarted.url, token) as pd:
            state = pd.session(session)
            assert (state["status"], state["error_message"]) == ("failed", LOGIN_LOST), state
            row = pd.run(run)
            assert (row["status"], row["error_message"]) == ("failed", RUN_LOST), row
            # The stream a client follows ends, with the reason as its last event; nothing before it changed.
            after = list(pd.run_events(run))
            assert after[:len(before)] == before
            assert after[len(before):] == [{"type": "error", "message": RUN_LOST}], after
        assert "flows_reclaimed" in restarted.log.read_text()
    finally:
        second.close()
