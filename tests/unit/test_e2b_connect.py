"""The Connect protocol's JSON framing (api/e2b/connect.py) and the sandbox request routing (api/e2b/routing.py),
checked against the SDK's own client-side codec where it has one."""

from __future__ import annotations

import struct

import pytest
from e2b.envd.process import (
    process_pb,  # the SDK is a test dependency: a failure, not a skip, without it
)

from polydev.api.e2b.connect import (
    END_STREAM,
    RpcError,
    end_frame,
    field,
    frame,
    parse_envelope,
)
from polydev.api.e2b.routing import ENVD_PORT, named, sandbox_of


def test_a_frame_is_flag_length_and_json() -> None:
    data = frame({"event": {"start": {"pid": 7}}})
    flags, length = struct.unpack(">BI", data[:5])
    assert flags == 0 and length == len(data) - 5 and data[5:] == b'{"event":{"start":{"pid":7}}}'
    assert parse_envelope(data) == {"event": {"start": {"pid": 7}}}


def test_the_end_frame_carries_the_error() -> None:
    assert end_frame()[0] == END_STREAM and end_frame()[5:] == b"{}"
    body = end_frame(RpcError("not_found", "no such process"))
    assert body[5:] == b'{"error":{"code":"not_found","message":"no such process"}}'


def test_the_sdks_decoder_reads_our_frames() -> None:
    message = process_pb.StartResponse.from_json(frame({"event": {"data": {"stdout": "aGkK"}}})[5:].decode())
    assert message.event.event.field == "data" and message.event.event.value.output.value == b"hi\n"


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00", b"\x01\x00\x00\x00\x02{}", b"\x00\x00\x00\x00\x09{}",
                                  b"\x00\x00\x00\x00\x02[]", b"\x00\x00\x00\x00\x03{x}"])
def test_bad_envelopes_are_refused_as_the_callers_fault(body: bytes) -> None:
    with pytest.raises(RpcError) as refused:
        parse_envelope(body)
    assert refused.value.code in ("invalid_argument", "unimplemented")


def test_field_checks_types_and_defaults_what_is_absent() -> None:
    msg = {"process": {"pid": 3, "cmd": "ls"}, "flag": True}
    assert field(msg, "process", "pid", kind=int) == 3
    assert field(msg, "process", "cwd", default="/root") == "/root"
    for path, kind in ((("process", "cmd"), int), (("flag",), int), (("process", "pid", "x"), int)):
        with pytest.raises(RpcError):
            field(msg, *path, kind=kind)


def scope(**headers: str) -> dict[str, object]:
    return {"type": "http", "headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_routing_by_host_name_under_the_sandbox_domain_or_by_header() -> None:
    domain = "sbx.example"
    assert sandbox_of(scope(host="49983-iabc123.sbx.example:8000"), domain) == (ENVD_PORT, "iabc123")
    assert sandbox_of(scope(host="8080-iabc123.sbx.example"), domain) == (8080, "iabc123")
    assert sandbox_of(scope(host="8080-iabc123.other.example"), domain) is None
    assert sandbox_of(scope(host="8080-iabc123.sbx.example"), None) is None  # no SANDBOX_DOMAIN: no host names
    assert sandbox_of(scope(host="127.0.0.1:8000", E2b_Sandbox_Id="iabc123", E2b_Sandbox_Port="49983"), None) == \
        (ENVD_PORT, "iabc123")
    assert sandbox_of(scope(host="127.0.0.1:8000", E2b_Sandbox_Id="../etc"), domain) == (ENVD_PORT, "-")
    assert sandbox_of(scope(host="polydev.example"), domain) is None


def test_a_request_passed_to_a_peer_names_its_sandbox_and_port_without_the_host() -> None:
    """The Host (`{port}-{id}.{domain}`) does not survive the hop to the sandbox's server: the headers do."""
    original = scope(host="8080-iabc123.sbx.example", E2b_Sandbox_Port="1")
    passed = named(original, "iabc123", 8080)
    without_host = {**passed, "headers": [(k, v) for k, v in passed["headers"] if k != b"host"]}  # type: ignore[union-attr]
    assert sandbox_of(without_host, None) == (8080, "iabc123")  # on a peer with no SANDBOX_DOMAIN even
    assert [v for k, v in passed["headers"] if k == b"e2b-sandbox-port"] == [b"8080"]  # type: ignore[union-attr]
