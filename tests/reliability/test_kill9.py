"""kill -9 of the server with logins and runs at each step (real VMs, the scripted CLI): a login whose VM is being
made, one waiting for the user's code, a run whose VM is being made and one whose CLI is running. The next
start ends every one of them `failed` with the reason, and nothing is left: the killed server's VMs are
ended by their supervisors and its work directories, leases and rows by the next start's reconcile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev.client import PolydevClient
from polydev.vm import images
from tests.reliability.conftest import LOGIN_TIMEOUT_S, Row, scripted_server
from tests.support import orphans
from tests.support.live_server import LiveServer, crash
from tests.support.load import make_users
from tests.support.waits import eventually

LOGIN_LOST = "the server restarted before the login finished; start a new session"
RUN_LOST = "the server restarted before the run finished"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kill9")


def serve(root: Path, test_image: images.Image) -> Iterator[LiveServer]:
    return scripted_server(root, test_image, LOGIN_TIMEOUT_SECONDS=str(LOGIN_TIMEOUT_S))


def test_kill_9_at_each_step_of_a_login_and_a_run(root: Path, test_image: images.Image, report: list[Row]) -> None:
    first = serve(root, test_image)
    server = next(first)
    steps: dict[str, tuple[str, str]] = {}  # step → (kind, id)
    try:
        # Two users: a user has one login at a time.
        token, second = make_users(server.url, server.admin_token, 2, prefix="kill9")
        with PolydevClient(server.url, token, timeout=120) as pd:
            waiting = pd.start_login("claude_code")["session_id"]
            running = pd.start_run("codex", "sleep 120", timeout=600)["id"]  # prints "working", then sleeps
            assert pd.wait_session(waiting, timeout=600)["status"] == "awaiting_user_auth"
            for ev in pd.run_events(running):
                if ev["type"] == "text":
                    break  # the CLI is running in its VM
            assert pd.run(running)["status"] == "running"
            steps["login: waiting for the user's code"] = ("login", waiting)
            steps["run: CLI running"] = ("run", running)
            # Two more, killed while their VMs are being made (a restore takes a good part of a second here;
            # whatever point of it the kill hits, the outcome must be the same).
            starting_run = pd.start_run("gemini_cli", "sleep 120", timeout=600)["id"]
            with PolydevClient(server.url, second) as other:
                starting_login = other.start_login("claude_code")["session_id"]
                steps["login: VM being made"] = ("login", starting_login)
            steps["run: VM being made"] = ("run", starting_run)
            at_kill = {step: pd.run(i)["status"] if kind == "run" else
                       pd.session(i)["status"] if i == waiting else "initializing"
                       for step, (kind, i) in steps.items()}
        crash(server)
    finally:
        first.close()

    second_start = serve(root, test_image)
    restarted = next(second_start)
    try:
        ended: dict[str, tuple[str, str | None]] = {}
        tokens = {"login: VM being made": second}
        for step, (kind, i) in steps.items():
            with PolydevClient(restarted.url, tokens.get(step, token)) as pd:
                state = pd.session(i) if kind == "login" else pd.run(i)
            ended[step] = (state["status"], state["error_message"])
        found: dict[str, int] = {}

        def clean() -> bool:
            found.update(orphans.find(restarted.data_dir))
            return not any(found.values())

        eventually(clean, timeout=120, every=1.0)
    finally:
        second_start.close()
    after_stop = orphans.find(restarted.data_dir)
    for step, (status, reason) in ended.items():
        report.append(Row(f"kill -9: {step}", f"1 {steps[step][0]} (was {at_kill[step]})", "SIGKILL of the server",
                          f"{int(status == 'failed' and bool(reason))}/1", sum(found.values()), 0))
    assert ended == {step: ("failed", LOGIN_LOST if kind == "login" else RUN_LOST)
                     for step, (kind, _) in steps.items()}
    assert found == dict.fromkeys(found, 0), orphans.describe(found)
    assert after_stop == dict.fromkeys(after_stop, 0), orphans.describe(after_stop)
