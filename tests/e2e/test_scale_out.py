"""Three servers on one PostgreSQL and one Redis, any of which answers for any VM (api/peers.py,
core/cluster.py): a login started on A is viewed through B and completed through C; a run A drives streams
its events through B and C; work sent to a server with no room runs on the roomiest; a VM's exec and destroy
sent to any server reach its host; and a server killed outright has its logins and runs ended failed, with
the reason, by the others, while new work goes to the survivors.

The servers are the real one with the stand-in hypervisor and the scripted CLI (tests/support/flow_fakes.py),
so logins and runs finish in seconds. A is the roomiest host, so work sent to it stays there; C has no room
for any VM (HOST_MEMORY_MB below a VM's size) and passes every new VM on.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from polydev.client import PolydevClient
from polydev.core.cluster import SERVER_HEADER
from tests.support.live_server import LiveServer
from tests.support.server_group import server_group, server_id

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SIZES = [{"HOST_VCPUS": "64", "HOST_MEMORY_MB": "262144"},  # A: the roomiest
         {"HOST_VCPUS": "8", "HOST_MEMORY_MB": "32768"},  # B
         {"HOST_VCPUS": "8", "HOST_MEMORY_MB": "256"}]  # C: full for any VM (a cli VM is 2048 MiB)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory, postgres_server: str,
         redis_server: str) -> Iterator[list[LiveServer]]:
    root = tmp_path_factory.mktemp("scale")
    envs = [{**size, "POLYDEV_TEST_FAKE_CLI": str(root / f"guest{i}")} for i, size in enumerate(SIZES)]
    with server_group(root, postgres_server, redis_server, envs) as group:
        yield group


@pytest.fixture(scope="module")
def ids(trio: list[LiveServer]) -> list[str]:
    return [server_id(s) for s in trio]


@pytest.fixture
def user(trio: list[LiveServer]) -> str:
    with PolydevClient(trio[0].url, trio[0].admin_token) as admin:
        created = admin.create_user(f"scale{time.time_ns()}")
        return admin.issue_token(created["id"])["token"]


def wait_for(probe, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := probe()) is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_a_login_started_on_a_is_viewed_through_b_and_completed_through_c(trio: list[LiveServer], ids: list[str],
                                                                           user: str) -> None:
    a, b, c = trio
    with PolydevClient(a.url, user) as on_a, PolydevClient(b.url, user) as on_b, PolydevClient(c.url, user) as on_c:
        session = on_a.start_login("claude_code")["session_id"]
        assert on_b.wait_session(session, timeout=120)["status"] == "awaiting_user_auth"
        # The VNC ticket asked of B is answered by A, which drives the login (the stand-in has no login
        # browser to show, so A says so).
        r = httpx.post(f"{b.url}/api/auth/sessions/{session}/vnc-ticket", headers={"Authorization": f"Bearer {user}"})
        assert r.headers[SERVER_HEADER] == ids[0], r.headers
        assert (r.status_code, r.json()["error"]["code"]) == (409, "vnc_unavailable"), r.text
        # The WebSocket opened on B is A's: A refuses a ticket it never issued, and B refuses as A did.
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://{b.url.removeprefix('http://')}/api/auth/sessions/{session}/vnc?ticket=forged",
                    subprotocols=["binary"], open_timeout=30)  # type: ignore[list-item]
        assert refused.value.response.status_code == 403
        assert "peer_websocket_refused" in b.log.read_text()
        on_c.submit_code(session, "good-code")
        final = on_c.wait_session(session, until=("completed", "failed", "timeout", "cancelled"), timeout=120)
        assert final["status"] == "completed", final
        assert [x["provider"] for x in on_b.credentials()] == ["claude_code"]


def test_a_run_driven_by_a_streams_its_events_through_b_and_c(trio: list[LiveServer], user: str) -> None:
    a, b, c = trio
    with PolydevClient(a.url, user) as on_a, PolydevClient(b.url, user) as on_b, PolydevClient(c.url, user) as on_c:
        on_a.set_api_key("claude_code", "sk-fake-key-0123")
        run = on_a.start_run("claude_code", "sleep 2")["id"]
        through_b = list(on_b.run_events(run))
        assert {"type": "text", "text": "working"} in through_b and through_b[-1]["type"] == "done", through_b
        assert list(on_c.run_events(run)) == through_b == list(on_a.run_events(run))
        assert on_c.run(run)["status"] == "succeeded"


def test_new_work_sent_to_a_full_server_runs_on_the_roomiest(trio: list[LiveServer], ids: list[str],
                                                            user: str) -> None:
    a, b, c = trio
    h = {"Authorization": f"Bearer {user}"}
    with PolydevClient(c.url, user) as on_c:
        on_c.set_api_key("claude_code", "sk-fake-key-0123")
    r = httpx.post(f"{c.url}/api/runs", json={"provider": "claude_code", "prompt": "hello"}, headers=h, timeout=60)
    assert r.status_code == 202, r.text
    assert r.headers[SERVER_HEADER] == ids[0], "C has no room: the run went to A"
    with PolydevClient(c.url, user) as on_c:
        assert list(on_c.run_events(r.json()["id"]))[-1]["type"] == "done"
    admin = {"Authorization": f"Bearer {a.admin_token}"}
    r = httpx.post(f"{c.url}/api/vms", json={"purpose": "cli"}, headers=admin, timeout=120)
    assert (r.status_code, r.headers[SERVER_HEADER]) == (201, ids[0]), r.text
    vm = r.json()["id"]
    # The VM's exec and destroy, sent to the other two, reach A, whose engine runs it.
    r = httpx.post(f"{b.url}/api/vms/{vm}/exec", json={"args": ["echo", "from A"]}, headers=admin, timeout=60)
    assert (r.status_code, r.headers[SERVER_HEADER], r.json()["stdout"]) == (200, ids[0], "from A\n"), r.text
    r = httpx.delete(f"{c.url}/api/vms/{vm}", headers=admin, timeout=60)
    assert (r.status_code, r.headers[SERVER_HEADER]) == (204, ids[0]), r.text


def test_a_sandbox_placed_through_c_lives_on_a_and_answers_through_b(trio: list[LiveServer], ids: list[str],
                                                                     user: str) -> None:
    """The unmodified e2b SDK with its control plane on C (full: the sandbox goes to A) and its envd URL on
    B: every envd call B gets is passed to A, whose engine runs the sandbox's VM and holds its processes."""
    from e2b import Sandbox  # the SDK as a test client only

    a, b, c = trio
    sbx = Sandbox.create(api_url=c.url, sandbox_url=b.url, api_key=user, timeout=300)
    try:
        assert sbx.commands.run("echo from the sandbox").stdout == "from the sandbox\n"
        sbx.files.write("/tmp/scale-out-note", "kept")
        assert sbx.files.read("/tmp/scale-out-note") == "kept"
        r = httpx.get(f"{b.url}/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"},
                      timeout=30)
        assert r.headers[SERVER_HEADER] == ids[0], "B passed the envd call to A, the sandbox's host"
        assert Sandbox.get_info(sbx.sandbox_id, api_url=b.url, api_key=user).sandbox_id == sbx.sandbox_id
    finally:
        assert Sandbox.kill(sbx.sandbox_id, api_url=b.url, api_key=user) is True
    r = httpx.get(f"{c.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": user}, timeout=30)
    assert r.status_code == 404, r.text


def test_a_killed_server_s_work_ends_failed_on_the_others_and_new_work_goes_to_survivors(
        trio: list[LiveServer], ids: list[str], user: str) -> None:
    a, b, c = trio
    h = {"Authorization": f"Bearer {user}"}
    with PolydevClient(a.url, user) as on_a:
        on_a.set_api_key("claude_code", "sk-fake-key-0123")
        r = httpx.post(f"{a.url}/api/runs", json={"provider": "claude_code", "prompt": "sleep 60"}, headers=h,
                       timeout=60)
        assert (r.status_code, r.headers[SERVER_HEADER]) == (202, ids[0]), r.text
        run = r.json()["id"]
        r = httpx.post(f"{a.url}/api/auth/start", json={"provider": "claude_code"}, headers=h, timeout=60)
        assert (r.status_code, r.headers[SERVER_HEADER]) == (202, ids[0]), r.text
        session = r.json()["session_id"]
        assert on_a.wait_session(session, timeout=120)["status"] == "awaiting_user_auth"
        assert on_a.run(run)["status"] in ("queued", "running")
    assert a.process is not None
    os.kill(a.process.pid, signal.SIGKILL)  # a crash: nothing on A gets to end anything
    a.process.wait()

    with PolydevClient(b.url, user) as on_b:
        state = wait_for(lambda: x if (x := on_b.session(session))["status"] != "awaiting_user_auth" else None,
                         "the login ends once A is taken for dead")
        assert state["status"] == "failed" and "stopped responding" in state["error_message"], state
        ended = wait_for(lambda: x if (x := on_b.run(run))["status"] not in ("queued", "running") else None,
                         "the run ends too")
        assert ended["status"] == "failed" and "stopped responding" in ended["error_message"], ended
        assert list(on_b.run_events(run))[-1] == {"type": "error", "message": ended["error_message"]}

    r = httpx.post(f"{c.url}/api/auth/start", json={"provider": "claude_code"}, headers=h, timeout=60)
    assert (r.status_code, r.headers[SERVER_HEADER]) == (202, ids[1]), "A is gone and C is full: B takes it"
    with PolydevClient(c.url, user) as on_c:
        session = r.json()["session_id"]
        assert on_c.wait_session(session, timeout=120)["status"] == "awaiting_user_auth"
        on_c.submit_code(session, "good-code")
        assert on_c.wait_session(session, until=("completed", "failed"), timeout=120)["status"] == "completed"
        r = httpx.post(f"{c.url}/api/runs", json={"provider": "claude_code", "prompt": "after"}, headers=h, timeout=60)
        assert (r.status_code, r.headers[SERVER_HEADER]) == (202, ids[1]), r.text
        assert list(on_c.run_events(r.json()["id"]))[-1]["type"] == "done"


