"""The wire types validate what the agent receives and round-trip what it sends."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from polydev import protocol as p


def test_exec_request_defaults_and_round_trip() -> None:
    req = p.ExecRequest.from_json(b'{"args": ["ls", "-l"]}')
    assert req == p.ExecRequest(args=["ls", "-l"])
    again = p.ExecRequest.from_json(json.dumps(req.to_json()))
    assert again == req
    full = p.ExecRequest.from_json({"args": ["x"], "env": {"A": "1"}, "cwd": "/", "stdin": "aGk=", "pty": True,
                                    "timeout_s": 3, "user": "user"})
    assert full.timeout_s == 3.0 and full.pty and full.env == {"A": "1"} and full.user == "user"
    assert p.FsRequest.from_json({"op": "mkdir", "path": "/d", "user": "_svc-1"}).user == "_svc-1"


@pytest.mark.parametrize("raw, needle", [
    ("nope", "not JSON"), ("[]", "object"), ("{}", "args is required"), ('{"args": [""]}', "program"),
    ('{"args": ["a\\u0000b"]}', "NUL"), ('{"args": ["a"], "env": {"A=B": "c"}}', "env names"),
    ('{"args": ["a"], "timeout_s": true}', "timeout_s"), ('{"args": ["a"], "timeout_s": 0}', "positive"),
    ('{"args": ["a"], "cwd": 5}', "cwd"), ('{"args": ["a"], "extra": 1}', "extra"),
    ('{"args": ["a"], "user": "Root"}', "account name"), ('{"args": ["a"], "user": "../x"}', "account name"),
    ('{"args": ["a"], "user": ""}', "account name"), ('{"args": ["a"], "user": 0}', "account name"),
])
def test_exec_request_rejects_with_reason(raw: str, needle: str) -> None:
    with pytest.raises(p.ProtocolError, match=needle):
        p.ExecRequest.from_json(raw)


def test_event_lines_are_compact_and_parse_back() -> None:
    event = p.ExecEvent(seq=3, type="stdout", data=base64.b64encode(b"\x00hi").decode())
    line = event.to_line()
    assert line.endswith(b"\n") and b"timed_out" not in line and b"code" not in line
    back = p.ExecEvent.from_json(line)
    assert back == event and back.bytes() == b"\x00hi"
    with pytest.raises(p.ProtocolError):
        p.ExecEvent.from_json('{"seq": 1, "type": "bogus"}')


def test_signal_names_and_modes() -> None:
    assert p.signal_number("SIGTERM") == 15 and p.signal_number("kill") == 9 and p.signal_number("X") is None
    assert p.SignalRequest.from_json({"exec_id": "a"}).signal == "TERM"
    with pytest.raises(p.ProtocolError, match="unknown signal"):
        p.SignalRequest.from_json({"exec_id": "a", "signal": "NOPE"})
    assert p.parse_mode("0600") == 0o600 and p.parse_mode("4755") == 0o4755
    for bad in ("rw", "99", "17777"):
        with pytest.raises(p.ProtocolError):
            p.parse_mode(bad)


def test_token_request_needs_a_long_token() -> None:
    assert p.TokenRequest.from_json({"token": "x" * 16}).token == "x" * 16
    for bad in ({"token": "short"}, {"token": "has space in it!!"}, {},
                {"token": "x" * 16, "now": "yesterday"}, {"token": "x" * 16, "now": 12.5}):
        with pytest.raises(p.ProtocolError):
            p.TokenRequest.from_json(bad)
    with_clock = p.TokenRequest.from_json({"token": "x" * 16, "now": 1_790_000_000.25})
    assert with_clock.now == 1_790_000_000.25 and with_clock.to_json()["now"] == 1_790_000_000.25
    assert "now" not in p.TokenRequest("x" * 16).to_json()


def test_cmdline_parsing_keeps_only_polydev_keys() -> None:
    conf = p.parse_cmdline("console=ttyS0 quiet polydev.token=abc polydev.addr=10.0.2.15/24 root=/dev/vda\n")
    assert conf == {"polydev.token": "abc", "polydev.addr": "10.0.2.15/24"}


def test_guest_modules_import_without_pydantic_or_host_code() -> None:
    # The guest image has Debian's python3 only: protocol and the agent must not pull anything else in.
    code = ("import sys; import polydev.guest.agent, polydev.guest.init; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pydantic', 'httpx', 'typer', 'rich') "
            "or m.startswith(('polydev.vm', 'polydev.api', 'polydev.config', 'polydev.store'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_input_and_watch_requests_round_trip() -> None:
    req = p.InputRequest.from_json({"exec_id": "abc", "data": base64.b64encode(b"\x00code\n").decode(), "eof": True})
    assert req.payload() == b"\x00code\n" and req.eof
    assert p.InputRequest.from_json(req.to_json()) == req
    assert p.InputRequest.from_json({"exec_id": "abc"}).payload() == b""
    watch = p.WatchRequest.from_json({"paths": ["/a", "/b"], "timeout": 5})
    assert watch == p.WatchRequest(paths=["/a", "/b"], timeout=5.0, min_size=1)
    assert p.WatchRequest.from_json(watch.to_json()) == watch
    assert p.ExecRequest.from_json({"args": ["cat"], "keep_stdin_open": True}).keep_stdin_open


@pytest.mark.parametrize("kind, raw, needle", [
    (p.InputRequest, '{"exec_id": "a", "data": "not base64!"}', "base64"),
    (p.InputRequest, '{"exec_id": ""}', "exec_id"),
    (p.WatchRequest, json.dumps({"paths": [f"/f{i}" for i in range(17)], "timeout": 1}), "1 to 16"),
    (p.WatchRequest, '{"paths": ["/a\\u0000"], "timeout": 1}', "NUL"),
    (p.WatchRequest, '{"paths": ["/a"], "timeout": NaN}', "timeout"),
    (p.ExecRequest, '{"args": ["cat"], "stdin": "***"}', "stdin is not valid base64"),
    (p.ExecRequest, '{"args": ["cat"], "keep_stdin_open": 1}', "keep_stdin_open"),
])
def test_input_and_watch_requests_reject_with_reason(kind: type, raw: str, needle: str) -> None:
    with pytest.raises(p.ProtocolError, match=needle):
        kind.from_json(raw)
