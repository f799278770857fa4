"""`polydev login` and `polydev run` against a live server whose claude_code CLI is the scripted stand-in
(tests/support/flow_fakes.py), and the SDK's event stream resuming after a given event and after a connection
dropped mid-event (by a proxy that cuts it, tests/support/cutting_proxy.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from polydev.client import PolydevClient
from tests.support.cutting_proxy import cutting_proxy
from tests.support.flow_api import sse
from tests.support.live_server import LiveServer


def cli_env(server: LiveServer, token: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "POLYDEV_URL": server.url, "POLYDEV_TOKEN": token, "NO_COLOR": "1",
            "COLUMNS": "200"}


def new_user_token(server: LiveServer) -> str:
    with PolydevClient(server.url, server.admin_token) as pd:
        user = pd.create_user(f"cli{time.time_ns()}")
        return pd.issue_token(user["id"])["token"]


def polydev_login(server: LiveServer, token: str, code: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, "-m", "polydev", "login", "claude_code"], env=cli_env(server, token),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    # The user reads the URL, signs in, and pastes the code (typed before the prompt shows: it waits in stdin).
    proc.stdin.write(code + "\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_login_then_run_from_the_terminal(fake_flow_server: LiveServer, tmp_path: Path) -> None:
    token = new_user_token(fake_flow_server)
    done = polydev_login(fake_flow_server, token, "good-code")
    assert done.returncode == 0, done.stderr
    assert "https://auth.fake.test/authorize?" in done.stderr and "connected" in done.stderr
    with PolydevClient(fake_flow_server.url, token) as pd:
        assert [c["provider"] for c in pd.credentials()] == ["claude_code"]

    note = tmp_path / "note.txt"
    note.write_text("from the terminal")
    ran = subprocess.run([sys.executable, "-m", "polydev", "run", "claude_code", "hello", "--file", str(note)],
                         env=cli_env(fake_flow_server, token), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == "answer to: hello"  # the answer on stdout, the rest on stderr
    assert "from the terminal" in ran.stderr and "done" in ran.stderr

    as_json = subprocess.run([sys.executable, "-m", "polydev", "run", "claude_code", "crash", "--json"],
                             env=cli_env(fake_flow_server, token), capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 1 and "run failed" in as_json.stderr
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[-1]["type"] == "error"


def test_a_rejected_code_fails_the_login_command(fake_flow_server: LiveServer) -> None:
    token = new_user_token(fake_flow_server)
    done = polydev_login(fake_flow_server, token, "wrong-code")
    assert done.returncode == 1 and "login failed" in done.stderr and "invalid code" in done.stderr


def test_run_without_a_credential_says_what_to_do(fake_flow_server: LiveServer) -> None:
    token = new_user_token(fake_flow_server)
    ran = subprocess.run([sys.executable, "-m", "polydev", "run", "claude_code", "hi"],
                         env=cli_env(fake_flow_server, token), capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "polydev login claude_code" in ran.stderr


def test_sdk_event_stream_resumes_after_a_given_event(fake_flow_server: LiveServer) -> None:
    token = new_user_token(fake_flow_server)
    assert polydev_login(fake_flow_server, token, "good-code").returncode == 0
    with PolydevClient(fake_flow_server.url, token) as pd:
        run = pd.start_run("claude_code", "hello")
        events = list(pd.run_events(run["id"]))
        assert events[-1]["type"] == "done"
        assert list(pd.run_events(run["id"], after=1)) == events[2:]
        assert pd.run(run["id"])["status"] == "succeeded"
        assert pd.runs()[0]["id"] == run["id"]


def test_sdk_event_stream_resumes_a_dropped_connection(fake_flow_server: LiveServer) -> None:
    token = new_user_token(fake_flow_server)
    assert polydev_login(fake_flow_server, token, "good-code").returncode == 0
    server = urlparse(fake_flow_server.url)
    assert server.hostname is not None and server.port is not None
    with PolydevClient(fake_flow_server.url, token) as pd:
        # It works for a while: the stream is live when the connection drops (the test does not rely on it).
        run = pd.start_run("claude_code", "sleep 2", files={"note.txt": "from the file"})["id"]
        with cutting_proxy(server.hostname, server.port, cut_at_event=3) as proxy, \
                PolydevClient(proxy.url, token) as through_proxy:
            resumed = list(through_proxy.run_events(run))
        # The whole stream as stored, read afterwards in one piece, with the events' ids.
        whole = sse(httpx.get(f"{fake_flow_server.url}/api/runs/{run}/events",
                              headers={"Authorization": f"Bearer {token}"}, timeout=60).text)
    assert proxy.cuts == 1 and len(proxy.requests) == 2, proxy.requests
    # The client came back after the last event it had whole (the second; the third was cut in half) ...
    assert proxy.header(0, "Last-Event-ID") is None  # (from the start: no header)
    assert proxy.header(1, "Last-Event-ID") == str(whole[1][0])
    # ... and saw every event once, in order: none missed, none repeated, the half one not taken for whole.
    assert resumed == [data for _, _, data in whole]
    assert len(resumed) > 3 and resumed[-1]["type"] == "done"
