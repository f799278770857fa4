"""AgentClient's failures as its callers see them: an agent that answered an error is an AgentError with its
status; one that did not answer (usably) is an AgentUnreachable, named by what failed. No VM, no agent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from polydev.core.errors import describe
from polydev.core.run_flow import _reason
from polydev.vm.agent_client import AgentClient, AgentError, AgentUnreachable
from tests.support.servers import free_port, serve_connections


@pytest.fixture
def broken_gzip_agent() -> Iterator[str]:
    """Answers every request 200 with a body that says it is gzip and is not."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n"
                     b"X-Polydev-Mode: 0644\r\nConnection: close\r\n\r\nnot gzip!")

    serve_connections(server, answer)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_an_agent_nobody_listens_for_is_unreachable_named_by_the_transport_error() -> None:
    with AgentClient(f"http://127.0.0.1:{free_port()}", "t", timeout=5) as agent:
        with pytest.raises(AgentUnreachable) as info:
            agent.get_file("/etc/hostname")
        with pytest.raises(AgentUnreachable) as streamed:
            list(agent.exec_stream(["true"]))
    exc = info.value
    assert isinstance(exc, AgentError) and exc.status == 0  # callers that take any agent failure still do
    assert isinstance(exc.cause, httpx.ConnectError) and isinstance(streamed.value.cause, httpx.ConnectError)
    assert str(exc).startswith("ConnectError: ") and describe(exc) == str(exc)
    # A session's or run's error reads as it did when the httpx error reached the flows unwrapped.
    assert _reason(exc, vm_started=False) == f"the VM stopped responding during the run ({exc})"
    assert _reason(ValueError("x"), vm_started=True) == "ValueError: x"


def test_an_answer_that_cannot_be_read_is_unreachable_too(broken_gzip_agent: str) -> None:
    with AgentClient(broken_gzip_agent, "t", timeout=5) as agent, pytest.raises(AgentUnreachable) as info:
        agent.get_file("/etc/hostname")
    assert isinstance(info.value.cause, httpx.DecodingError) and not isinstance(info.value.cause,
                                                                               httpx.TransportError)
    assert str(info.value).startswith("DecodingError: ")
