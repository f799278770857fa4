"""The guest agent over HTTP, against a local agent process; tests/vm/test_guest_agent_in_vm.py runs every test
here that takes `agent` again against the agent inside a real VM."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import httpx
import pytest

from polydev import protocol as p
from polydev.vm.agent_client import AgentClient, AgentError

pytest_plugins = ["tests.support.vm_fixtures"]  # fixtures: agent, local_agent

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


def test_exec_and_files_as_another_account(agent: AgentClient, scratch: str) -> None:
    # `nobody` is in every Debian system, the host's and the image's; its home does not exist, so cwd is /.
    ran = agent.exec(["sh", "-c", 'id -u; id -g; echo "$HOME $USER"; pwd'], user="nobody")
    assert ran.stdout.decode().split("\n")[:4] == ["65534", "65534", "/nonexistent nobody", "/"]
    assert agent.exec(["id", "-un"], user="nobody", env={"USER": "kept"}, cwd="/tmp").exit_code == 0
    agent.put_file(f"{scratch}/made/by/agent.txt", b"x", owner="nobody")
    owners = agent.exec(["stat", "-c", "%u", scratch, f"{scratch}/made", f"{scratch}/made/by/agent.txt"])
    assert owners.stdout.split() == [b"65534"] * 3
    entry = agent.fs("mkdir", f"{scratch}/made/dir/deeper", user="nobody")[0]
    assert entry.owner == "nobody" and agent.fs("stat", f"{scratch}/made/dir")[0].owner == "nobody"
    assert agent.exec(["touch", f"{scratch}/made/by/mine"], user="nobody").exit_code == 0  # it is theirs
    for call in (lambda: agent.exec(["true"], user="nosuchaccount"),
                 lambda: agent.put_file(f"{scratch}/no", b"x", owner="nosuchaccount"),
                 lambda: agent.fs("mkdir", f"{scratch}/nodir", user="nosuchaccount")):
        with pytest.raises(AgentError) as refused:
            call()
        assert refused.value.status == 422 and "does not exist" in refused.value.reason
    assert agent.exec(["sh", "-c", f"test ! -e {scratch}/no && test ! -e {scratch}/nodir"]).exit_code == 0
    agent.exec(["rm", "-r", scratch])


def _waiting_shells(agent: AgentClient, marker: str, ready_only: bool = True) -> set[int]:
    """Pids of the agent's login shells started ahead whose environment holds `marker` and that are ready: their
    ready pipe (`printf . >&N`) closed, as it is once their login files have run (read by root in /proc)."""
    found = agent.exec(["sh", "-c", f"grep -lsz {marker} /proc/[0-9]*/environ; true"]).stdout.decode()
    ready = set()
    for pid in {int(line.split("/")[2]) for line in found.split()}:
        cmdline = agent.exec(["cat", f"/proc/{pid}/cmdline"]).stdout.decode(errors="replace")
        if "__polydev_command" in cmdline:
            fd = cmdline.split("printf . >&", 1)[1].split(";", 1)[0]
            if not ready_only or agent.exec(["test", "-e", f"/proc/{pid}/fd/{fd}"]).exit_code != 0:
                ready.add(pid)
    return ready


def test_a_login_shell_exec_is_run_by_a_shell_started_before_it(agent: AgentClient) -> None:
    marker = f"WARM_TEST={secrets.token_hex(6)}"
    env, shell = {"WARM_TEST": marker.split("=")[1]}, ["/bin/bash", "-l", "-c"]
    first = agent.exec([*shell, 'echo "$WARM_TEST"'], env=env, cwd="/tmp")
    assert first.stdout.decode() == f"{env['WARM_TEST']}\n"
    time.sleep(0.5)
    assert not _waiting_shells(agent, marker)  # a kind asked for once gets none
    agent.exec([*shell, "true"], env=env, cwd="/tmp")
    deadline = time.monotonic() + 60
    while not (waiting := _waiting_shells(agent, marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(waiting) == 1  # one shell like the last, ready
    script = 'echo "$WARM_TEST $$ $0 ${__polydev_command-unset}"; pwd; read -r x; echo "read $?"\n' \
             "echo $(ps -o ni= -p $$); echo 'it''s' err >&2; exit 7\n"
    second = agent.exec([*shell, script], env=env, cwd="/tmp")
    pid = second.events[0].pid
    assert pid in waiting
    assert second.stdout.decode().split("\n") == [f"{env['WARM_TEST']} {pid} /bin/bash unset", "/tmp", "read 1",
                                                   "0", ""]  # its priority back to normal, stdin at its end
    assert (second.stderr, second.exit_code) == (b"its err\n", 7)
    other = agent.exec([*shell, "echo $$; cd /; pwd"], env={**env, "MORE": "1"})  # not like the waiting one
    assert other.stdout.decode().split()[1] == "/" and int(other.stdout.split()[0]) not in waiting
    broken = agent.exec([*shell, "if then"], env=env, cwd="/tmp")  # a syntax error, as bash -c reports it
    assert broken.exit_code == 2 and b"syntax error" in broken.stderr
    as_nobody = ([*shell, 'echo "$(id -u) $(id -G) $HOME $$"'], {"env": env, "user": "nobody", "cwd": "/tmp"})
    for _ in range(2):  # asked for twice: a shell under nobody's ids is started ahead (through setpriv)
        assert agent.exec(as_nobody[0], **as_nobody[1]).stdout.decode().split()[:3] == ["65534", "65534",
                                                                                          "/nonexistent"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        theirs = {pid for pid in _waiting_shells(agent, marker)
                  if b"Uid:\t65534" in agent.exec(["cat", f"/proc/{pid}/status"]).stdout}
        if theirs:
            break
        time.sleep(0.2)
    third = agent.exec(as_nobody[0], **as_nobody[1])
    assert third.stdout.decode().split() == ["65534", "65534", "/nonexistent", str(third.events[0].pid)]
    assert third.events[0].pid in theirs


def test_a_login_shell_still_reading_its_login_files_is_left_for_a_later_exec(agent: AgentClient, scratch: str
                                                                              ) -> None:
    # A HOME of its own whose login is slow only in a shell started ahead (which waits at nice 19: the agent
    # renices it right after its exec, well within the first 0.2 s).
    agent.put_file(f"{scratch}/.bash_profile",
                   b'sleep 0.2; read -r -a f < /proc/$$/stat; if [ "${f[18]}" = 19 ]; then sleep 2; fi\n')
    marker = f"WARM_SLOW={secrets.token_hex(6)}"
    env = {"HOME": scratch, "WARM_SLOW": marker.split("=")[1]}
    run = ["/bin/bash", "-l", "-c", "echo $$"]
    for _ in range(2):  # the second starts one ahead, which is in its login files for 2 s more
        agent.exec(run, env=env)
    starting = _waiting_shells(agent, marker, ready_only=False)
    assert len(starting) == 1 and not _waiting_shells(agent, marker)
    third = agent.exec(run, env=env)  # a fresh shell, not the one still starting
    assert int(third.stdout) not in starting and int(third.stdout) == third.events[0].pid
    deadline = time.monotonic() + 60
    while not _waiting_shells(agent, marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert int(agent.exec(run, env=env).stdout) in starting  # once ready, it is taken
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


@pytest.mark.parametrize("route, body, needle", [
    ("/exec", b"not json", "not JSON"),
    ("/exec", b"[1, 2]", "object"),
    ("/exec", b"{}", "args"),
    ("/exec", b'{"args": []}', "program"),
    ("/exec", b'{"args": "ls"}', "list of strings"),
    ("/exec", b'{"args": ["ls"], "bogus": 1}', "bogus"),
    ("/exec", b'{"args": ["ls"], "env": {"A": 1}}', "env"),
    ("/exec", b'{"args": ["ls"], "timeout_s": -1}', "timeout_s"),
    ("/exec", b'{"args": ["ls"], "pty": "yes"}', "pty"),
    ("/exec", b'{"args": ["cat"], "stdin": "%%%"}', "base64"),
    ("/input", b'{"exec_id": "x", "data": "%%%"}', "base64"),
    ("/input", b'{"data": "aGk="}', "exec_id"),
    ("/input", b'{"exec_id": "x", "eof": "yes"}', "eof"),
    ("/input", b'{"exec_id": "x", "extra": 1}', "extra"),
    ("/watch", b'{"paths": [], "timeout": 1}', "1 to 16"),
    ("/watch", b'{"paths": ["relative"], "timeout": 1}', "absolute"),
    ("/watch", b'{"paths": "/tmp/x", "timeout": 1}', "list of strings"),
    ("/watch", b'{"paths": ["/tmp/x"]}', "timeout"),
    ("/watch", b'{"paths": ["/tmp/x"], "timeout": 301}', "timeout"),
    ("/watch", b'{"paths": ["/tmp/x"], "timeout": -1}', "timeout"),
    ("/watch", b'{"paths": ["/tmp/x"], "timeout": 1, "min_size": -1}', "min_size"),
    ("/watch", b'{"paths": ["/tmp/x"], "timeout": 1, "min_size": true}', "min_size"),
])
def test_malformed_body_is_a_400_with_a_reason(agent: AgentClient, route: str, body: bytes, needle: str) -> None:
    response = agent._http.post(route, content=body)
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


# -- POST /input ------------------------------------------------------------------------------------------------


def _stdout(events: list[p.ExecEvent]) -> bytes:
    return b"".join(e.bytes() for e in events if e.type == "stdout")


def test_input_reaches_a_pty_exec_after_its_prompt(agent: AgentClient) -> None:
    # The paste-code login: the CLI prompts on a terminal and the code arrives later, on another connection.
    stream = agent.exec_stream(["bash", "-c", "printf 'Paste code here if prompted >'; read -r x; echo got:$x; "
                                "cat >/dev/null; echo closed"], pty=True, timeout_s=120)
    start = next(stream)
    assert start.exec_id
    seen = b""
    for event in stream:
        seen += event.bytes() if event.type == "stdout" else b""
        if b"prompted >" in seen:
            break
    assert agent.write_input(start.exec_id, b"code-123\n") == len(b"code-123\n")
    assert agent.write_input(start.exec_id, b"", eof=True) == 0  # Ctrl-D at a line start: cat sees EOF
    rest = list(stream)
    assert rest[-1].type == "exit" and rest[-1].code == 0
    assert b"got:code-123" in _stdout(rest) and b"closed" in _stdout(rest)
    with pytest.raises(AgentError) as finished:
        agent.write_input(start.exec_id, b"late\n")
    assert finished.value.status == 404


def test_input_to_a_pipe_kept_open_follows_the_initial_stdin(agent: AgentClient) -> None:
    stream = agent.exec_stream(["sh", "-c", "read -r a; echo first:$a; cat; echo end"], stdin=b"one\n",
                               keep_stdin_open=True, timeout_s=120)
    start = next(stream)
    assert start.exec_id
    assert agent.write_input(start.exec_id, b"two\n") == 4
    assert agent.write_input(start.exec_id, b"three", eof=True) == 5  # eof closes the pipe: cat ends
    rest = list(stream)
    assert rest[-1].type == "exit" and rest[-1].code == 0
    assert _stdout(rest) == b"first:one\ntwo\nthreeend\n"
    with pytest.raises(AgentError) as finished:
        agent.write_input(start.exec_id, b"x")
    assert finished.value.status == 404


def test_input_errors(agent: AgentClient) -> None:
    with pytest.raises(AgentError) as unknown:
        agent.write_input("no-such-exec", b"x")
    assert unknown.value.status == 404
    # A pipe exec started without keep_stdin_open has no stdin to write to.
    stream = agent.exec_stream(["sleep", "300"])
    start = next(stream)
    assert start.exec_id
    with pytest.raises(AgentError) as closed:
        agent.write_input(start.exec_id, b"x")
    assert closed.value.status == 409 and "keep_stdin_open" in closed.value.reason
    agent.signal(start.exec_id, "KILL")
    assert list(stream)[-1].code == -9


# -- POST /watch ------------------------------------------------------------------------------------------------


def test_watch_answers_with_a_file_written_later(agent: AgentClient, scratch: str) -> None:
    # Written beside the target and renamed into place, as a careful CLI does; mode 0600 like a credential.
    write = (f"sleep 0.5; mkdir -p {scratch}; printf secret > {scratch}/cred.tmp; chmod 600 {scratch}/cred.tmp; "
             f"mv {scratch}/cred.tmp {scratch}/cred")
    stream = agent.exec_stream(["sh", "-c", write], timeout_s=120)
    assert next(stream).type == "start"
    response = agent._http.post("/watch", json={"paths": [f"{scratch}/never", f"{scratch}/cred"], "timeout": 120},
                                timeout=180)
    assert response.status_code == 200
    assert response.json() == {"path": f"{scratch}/cred", "size": 6, "mode": "0600"}
    assert list(stream)[-1].code == 0
    assert agent.watch([f"{scratch}/cred"], timeout=30) == f"{scratch}/cred"  # already there: answers at once
    agent.exec(["rm", "-r", scratch])


def test_watch_times_out_with_null(agent: AgentClient, scratch: str) -> None:
    # Neither a missing file, nor a directory, nor a file smaller than min_size counts.
    agent.put_file(f"{scratch}/empty", b"")
    assert agent.watch([f"{scratch}/never", scratch, f"{scratch}/empty"], timeout=0.5) is None
    assert agent.watch([f"{scratch}/empty"], timeout=0) is None
    assert agent.watch([f"{scratch}/empty"], timeout=10, min_size=0) == f"{scratch}/empty"
    agent.exec(["rm", "-r", scratch])


@pytest.fixture
def local_client(local_agent: tuple[str, str]) -> Iterator[AgentClient]:
    with AgentClient(*local_agent, timeout=60) as client:
        yield client


def test_watch_waits_for_a_growing_file_to_settle(local_client: AgentClient, scratch: str) -> None:
    # Local agent only: under an emulated CPU the writer itself may stall past the settle window, which is
    # indistinguishable from having finished.
    path = f"{scratch}/growing"
    writer = ("import os, sys, time\nos.makedirs(os.path.dirname(sys.argv[1]))\nf = open(sys.argv[1], 'ab', 0)\n"
              "for _ in range(25):\n    f.write(b'x' * 100)\n    time.sleep(0.02)\n")
    stream = local_client.exec_stream(["python3", "-c", writer, path], timeout_s=120)
    assert next(stream).type == "start"
    response = local_client._http.post("/watch", json={"paths": [path], "timeout": 120}, timeout=180)
    assert response.json()["size"] == 2500  # not a size from half way
    assert list(stream)[-1].code == 0
    local_client.exec(["rm", "-r", scratch])


def _agent_threads(agent: AgentClient) -> int:
    # The exec's parent process is the agent; each open connection holds one of its threads.
    return int(agent.exec(["sh", "-c", "ls /proc/$PPID/task | wc -l"]).stdout)


def _eventually(check: Callable[[], bool], within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if check():
            return True
    return False


def test_watch_ends_when_the_client_disconnects(agent: AgentClient, scratch: str) -> None:
    url = urlparse(agent.base_url)
    body = json.dumps({"paths": [f"{scratch}/never"], "timeout": 300}).encode()
    head = (f"POST /watch HTTP/1.1\r\nHost: x\r\nAuthorization: {agent._http.headers['Authorization']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    before = _agent_threads(agent)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head + body)
        assert _eventually(lambda: _agent_threads(agent) > before), "the watch never started"
    assert _eventually(lambda: _agent_threads(agent) <= before), "the watch outlived its client"


# -- detach execs: they outlive their connection, and /attach follows them again --------------------------------

def test_detached_exec_outlives_its_client_and_attach_resumes_from_seq(agent: AgentClient, scratch: str) -> None:
    marker = f"{scratch}-detached"
    events = agent.exec_stream(["sh", "-c", f"for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done; touch {marker}"],
                               detach=True, meta='{"tag": "counter"}')
    start = next(events)
    first = next(events)
    assert start.type == "start" and first.type == "stdout" and first.bytes() == b"1\n"
    events.close()  # the client goes; an ordinary exec would be killed now
    listed = {d.exec_id: d for d in agent.execs()}
    assert start.exec_id in listed and listed[start.exec_id].meta == '{"tag": "counter"}'
    assert listed[start.exec_id].pid == start.pid
    rest = list(agent.attach(start.exec_id, after=first.seq))
    assert rest[0].seq == first.seq + 1 and [e.seq for e in rest] == list(range(first.seq + 1, rest[-1].seq + 1))
    assert b"".join(e.bytes() for e in rest if e.type == "stdout") == b"2\n3\n4\n5\n6\n"
    assert rest[-1].type == "exit" and rest[-1].code == 0
    assert agent.exec(["test", "-e", marker]).exit_code == 0  # it ran to its end
    agent.exec(["rm", "-f", marker])
    # Finished, it is still listed (with its exit) for a late attach, which gets just the exit.
    done = {d.exec_id: d for d in agent.execs()}[start.exec_id]
    assert not done.running and done.last_seq == rest[-1].seq
    late = list(agent.attach(start.exec_id, after=rest[-2].seq))
    assert [e.type for e in late] == ["exit"]


def test_detached_exec_takes_signals_and_input_like_any(agent: AgentClient) -> None:
    events = agent.exec_stream(["cat"], detach=True, keep_stdin_open=True)
    start = next(events)
    events.close()
    assert agent.write_input(start.exec_id or "", b"hello\n", eof=True) == 6
    got = list(agent.attach(start.exec_id or ""))
    assert got[0].type == "start"  # after=-1: everything the backlog holds
    assert b"".join(e.bytes() for e in got if e.type == "stdout") == b"hello\n"
    assert got[-1].type == "exit" and got[-1].code == 0
    sleeper = agent.exec_stream(["sleep", "60"], detach=True)
    pid_event = next(sleeper)
    sleeper.close()
    agent.signal(pid_event.exec_id or "", "KILL")
    assert list(agent.attach(pid_event.exec_id or ""))[-1].code == -9


def test_attach_refuses_unknown_and_meta_without_detach(agent: AgentClient) -> None:
    with pytest.raises(AgentError) as exc:
        list(agent.attach("0123456789abcdef"))
    assert exc.value.status == 404
    with pytest.raises(AgentError) as exc:
        list(agent.exec_stream(["true"], meta="x"))
    assert exc.value.status == 400 and "detach" in exc.value.reason
