"""The guest agent over HTTP: each test runs against a local agent process and against a real VM (mark vm)."""

from __future__ import annotations

import os
import secrets
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from polydev import protocol as p
from polydev.vm.agent_client import AgentClient, AgentError
pytest_plugins = ["tests.vm_fixtures"]  # fixtures: agent, local_agent, test_image, test_vm (one VM per session)

GONE = 'test ! -e /proc/{pid} || [ "$(cut -d" " -f3 /proc/{pid}/stat)" = Z ]'  # exited (or only a zombie)


@pytest.fixture
def scratch() -> str:
    return f"/tmp/polydev-agent-test-{secrets.token_hex(6)}"


def wait_until_gone(agent: AgentClient, pid: int, within_s: float = 20.0) -> bool:
    """The kill after a disconnect happens in the agent's thread, after this side closed: poll for it."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if agent.exec(["sh", "-c", GONE.format(pid=pid)]).exit_code == 0:
            return True
    return False


def test_exec_events_are_ordered_and_carry_exit_code(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 7"])
    types = [e.type for e in result.events]
    assert types[0] == "start" and types[-1] == "exit"
    assert [e.seq for e in result.events] == list(range(len(result.events)))
    assert result.exit_code == 7
    assert result.stdout == b"one\nthree\n"
    assert result.stderr == b"two\n"
    # Output separated by pauses arrives in the order it was written.
    chunks = [(e.type, e.bytes()) for e in result.events if e.type in ("stdout", "stderr")]
    assert chunks == [("stdout", b"one\n"), ("stderr", b"two\n"), ("stdout", b"three\n")]


def test_exec_zero_and_signal_exit(agent: AgentClient) -> None:
    assert agent.exec(["true"]).exit_code == 0
    assert agent.exec(["sh", "-c", "kill -TERM $$"]).exit_code == -15


def test_exec_env_and_cwd(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", 'echo "$FOO:$(pwd):$HOME"'], env={"FOO": "bar baz"}, cwd="/usr")
    assert result.stdout == b"bar baz:/usr:/root\n"


def test_exec_stdin_binary_round_trip(agent: AgentClient) -> None:
    data = bytes(range(256)) * 300  # 76 KB with NULs: more than a pipe buffer, so the writer must not block
    result = agent.exec(["cat"], stdin=data)
    assert result.exit_code == 0
    assert result.stdout == data


def test_exec_without_stdin_reads_eof(agent: AgentClient) -> None:
    result = agent.exec(["cat"], timeout_s=30)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"", False)


def test_exec_pty(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; read line; echo got:$line"],
                        pty=True, stdin=b"hello\n", timeout_s=60)
    assert result.exit_code == 0
    assert b"is-a-tty" in result.stdout
    assert b"got:hello" in result.stdout
    plain = agent.exec(["sh", "-c", "test -t 1 && echo tty || echo no-tty"])
    assert plain.stdout == b"no-tty\n"


def test_exec_timeout_kills_the_process_group(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "sleep 300 & echo $!; wait"], timeout_s=1.5)
    assert result.timed_out
    assert result.exit_code == -9
    child = int(result.stdout.split()[0])
    assert wait_until_gone(agent, child), "the background child survived the timeout"


def test_exec_killed_when_client_disconnects(agent: AgentClient) -> None:
    events = agent.exec_stream(["sh", "-c", "echo $$; sleep 300"])
    pid = None
    for event in events:
        if event.type == "stdout":
            pid = int(event.bytes())
            break
    events.close()  # leaving the stream closes the connection
    assert pid is not None
    assert wait_until_gone(agent, pid), "the process outlived its client"


def test_signal_reaches_running_exec(agent: AgentClient) -> None:
    stream = agent.exec_stream(["sleep", "300"])
    start = next(stream)
    assert start.type == "start" and start.exec_id
    agent.signal(start.exec_id, "INT")
    rest = list(stream)
    assert rest[-1].type == "exit" and rest[-1].code == -2
    with pytest.raises(AgentError) as info:
        agent.signal(start.exec_id, "TERM")
    assert info.value.status == 404


def test_file_round_trip_with_mode(agent: AgentClient, scratch: str) -> None:
    data = os.urandom(200_000)
    info = agent.put_file(f"{scratch}/sub/secret.bin", data, mode=0o600)
    assert info["size"] == len(data) and info["mode"] == 0o600
    body, mode = agent.get_file(f"{scratch}/sub/secret.bin")
    assert body == data and mode == 0o600
    listed = agent.exec(["stat", "-c", "%a %s", f"{scratch}/sub/secret.bin"])
    assert listed.stdout.split() == [b"600", str(len(data)).encode()]
    agent.put_file(f"{scratch}/sub/secret.bin", b"#!/bin/sh\necho replaced\n", mode=0o755)
    assert agent.exec([f"{scratch}/sub/secret.bin"]).stdout == b"replaced\n"
    agent.exec(["rm", "-r", scratch])


def test_file_errors(agent: AgentClient, scratch: str) -> None:
    with pytest.raises(AgentError) as missing:
        agent.get_file(f"{scratch}/nope")
    assert missing.value.status == 404
    with pytest.raises(AgentError) as relative:
        agent.put_file("relative/path", b"x")
    assert relative.value.status == 400 and "absolute" in relative.value.reason
    with pytest.raises(AgentError) as bad_mode:
        agent.put_file(f"{scratch}/x", b"x", mode=0o1234567)
    assert bad_mode.value.status == 400 and "mode" in bad_mode.value.reason
    with pytest.raises(AgentError) as directory:
        agent.get_file("/tmp")
    assert directory.value.status == 409


def test_calls_without_the_token_are_rejected(agent: AgentClient) -> None:
    base = agent.base_url
    assert httpx.get(f"{base}/livez").status_code == 200  # the bare liveness probe needs no token
    wrong = {"Authorization": "Bearer " + "x" * 32}
    for headers in ({}, wrong, {"Authorization": "Basic abc"}):
        assert httpx.get(f"{base}/health", headers=headers).status_code == 401
        assert httpx.post(f"{base}/exec", json={"args": ["true"]}, headers=headers).status_code == 401
        assert httpx.put(f"{base}/files", params={"path": "/tmp/x"}, content=b"x", headers=headers).status_code == 401
        assert httpx.get(f"{base}/files", params={"path": "/etc/hostname"}, headers=headers).status_code == 401
        assert httpx.post(f"{base}/signal", json={"exec_id": "x"}, headers=headers).status_code == 401
    assert agent.health().status == "ok"


@pytest.mark.parametrize("body, needle", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "object"),
    (b"{}", "args"),
    (b'{"args": []}', "program"),
    (b'{"args": "ls"}', "list of strings"),
    (b'{"args": ["ls"], "bogus": 1}', "bogus"),
    (b'{"args": ["ls"], "env": {"A": 1}}', "env"),
    (b'{"args": ["ls"], "timeout_s": -1}', "timeout_s"),
    (b'{"args": ["ls"], "pty": "yes"}', "pty"),
])
def test_malformed_exec_is_a_400_with_a_reason(agent: AgentClient, body: bytes, needle: str) -> None:
    response = agent._http.post("/exec", content=body)
    assert response.status_code == 400
    assert needle in response.json()["error"]


def test_unstartable_program_and_bad_routes(agent: AgentClient) -> None:
    response = agent._http.post("/exec", json={"args": ["/no/such/program"]})
    assert response.status_code == 422 and "/no/such/program" in response.json()["error"]
    response = agent._http.post("/exec", json={"args": ["ls"], "cwd": "/no/such/dir"})
    assert response.status_code == 422
    assert agent._http.get("/nope").status_code == 404
    assert agent._http.get("/exec").status_code == 405
    assert agent._http.post("/signal", json={"exec_id": "x", "signal": "BOGUS"}).status_code == 400


def test_body_without_length_is_refused(agent: AgentClient) -> None:
    url = urlparse(agent.base_url)
    token = agent._http.headers["Authorization"]
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(f"POST /exec HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n".encode())
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 411")
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")


def test_token_rotation(agent: AgentClient) -> None:
    old = agent._http.headers["Authorization"].split()[1]
    new = secrets.token_urlsafe(24)
    agent.rotate_token(new)
    try:
        assert agent.health().status == "ok"
        assert httpx.get(f"{agent.base_url}/health", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    finally:
        agent.rotate_token(old)
    assert agent.health().protocol == p.PROTOCOL_VERSION
