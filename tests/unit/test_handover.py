"""The token handover's one request, against a loopback stand-in for the agent (no VM)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from polydev.vm import handover
from tests.support.servers import serve_connections


@pytest.fixture
def agent() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """A one-request-per-connection server: answers with the next canned reply; records what it got."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    replies: list[bytes] = []
    received: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        received.append(data)
        conn.sendall(replies.pop(0) if replies else b"")

    serve_connections(server, answer)
    yield server.getsockname()[1], replies, received
    server.close()


def test_the_new_token_is_posted_with_the_old_one(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, received = agent
    replies.append(b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 16\r\n\r\n{"rotated": true}')
    handover.rotate_token("127.0.0.1", port, "old-token", "new-token")
    head, body = received[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /token HTTP/1.1\r\n") and b"Authorization: Bearer old-token" in head
    sent = json.loads(body)
    # The host's clock goes along, for a restored guest whose clock stopped at its snapshot.
    assert sent["token"] == "new-token" and set(sent) == {"token", "now"}
    assert abs(sent["now"] - time.time()) < 60


def test_a_refusal_is_final_and_names_no_token(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, _ = agent
    replies.append(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n")
    with pytest.raises(handover.HandoverRefused, match="401") as caught:
        handover.rotate_token("127.0.0.1", port, "old-token", "new-token")
    assert "old-token" not in str(caught.value) and "new-token" not in str(caught.value)


def test_a_connection_closed_without_an_answer_is_worth_retrying(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, _, _ = agent  # no reply queued: the server closes (as QEMU's port forward does before the guest is up)
    with pytest.raises(ConnectionResetError):
        handover.rotate_token("127.0.0.1", port, "old-token", "new-token")


def test_a_socket_for_this_namespace_needs_no_setns() -> None:
    with handover.socket_in_netns(None) as sock:
        assert sock.family == socket.AF_INET


def test_a_missing_namespace_is_an_error_not_a_socket_in_the_wrong_place() -> None:
    with pytest.raises(OSError):
        handover.socket_in_netns("polydev-no-such-namespace")


OK = b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 16\r\n\r\n{"rotated": true}'
REFUSED = b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n"


def test_a_handover_whose_answer_was_lost_is_found_done_by_the_new_token(
        agent: tuple[int, list[bytes], list[bytes]]) -> None:
    """A slow guest took the new token but its answer came too late (here: never): the retry's old token is
    refused, and a request with the new one shows the handover had happened (found by tests/reliability)."""
    port, replies, received = agent
    replies += [b"", REFUSED, OK]
    handover.hand_over("127.0.0.1", port, "old-token", "new-token", deadline=time.monotonic() + 30,
                       alive=lambda: True)
    bearers = [next(line for line in r.split(b"\r\n") if line.startswith(b"Authorization")) for r in received]
    assert bearers == [b"Authorization: Bearer old-token"] * 2 + [b"Authorization: Bearer new-token"]


def test_a_refusal_of_both_tokens_after_a_retry_is_still_final(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, received = agent
    replies += [b"", REFUSED, REFUSED]
    with pytest.raises(handover.HandoverRefused, match="401"):
        handover.hand_over("127.0.0.1", port, "old-token", "new-token", deadline=time.monotonic() + 30,
                           alive=lambda: True)
    assert len(received) == 3


def test_a_refusal_at_the_first_attempt_asks_nothing_more(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, received = agent
    replies += [REFUSED, OK]
    with pytest.raises(handover.HandoverRefused):
        handover.hand_over("127.0.0.1", port, "old-token", "new-token", deadline=time.monotonic() + 30,
                           alive=lambda: True)
    assert len(received) == 1


async def test_the_event_loops_handover_finds_a_lost_answer_too(agent: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, _ = agent
    replies += [b"", REFUSED, OK]
    await handover.hand_over_async("127.0.0.1", port, "old-token", "new-token", deadline=time.monotonic() + 30,
                                   alive=lambda: True)
    assert replies == []
