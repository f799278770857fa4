"""guest/warm.key_of: which execs a login shell started ahead may stand in for, and what must match."""

from __future__ import annotations

import pytest

from polydev.guest import warm
from polydev.protocol import ExecRequest

SHELL = ["/bin/bash", "-l", "-c", "echo hi"]
ENV = {"PATH": "/bin", "HOME": "/home/user"}


@pytest.mark.parametrize("req", [
    ExecRequest(args=["/bin/bash", "-c", "echo hi"]),  # not a login shell
    ExecRequest(args=["bash", "-l", "-c", "echo hi"]),  # another program path: another binary, perhaps
    ExecRequest(args=[*SHELL, "extra"]),  # $0 and positional arguments the waiting shell does not have
    ExecRequest(args=SHELL, pty=True),  # a terminal is made per exec
    ExecRequest(args=SHELL, stdin="aGk="),  # its stdin is /dev/null
    ExecRequest(args=SHELL, keep_stdin_open=True),
])
def test_execs_a_waiting_shell_cannot_stand_in_for(req: ExecRequest) -> None:
    assert warm.key_of(req, ENV, None, {}) is None


def test_the_kind_is_its_environment_cwd_and_account() -> None:
    key = warm.key_of(ExecRequest(args=SHELL), ENV, "/tmp", {"user": 1000, "group": 1000})
    assert key == warm.key_of(ExecRequest(args=["/bin/bash", "-l", "-c", "other"], detach=True),
                              dict(reversed(ENV.items())), "/tmp", {"group": 1000, "user": 1000})
    assert key != warm.key_of(ExecRequest(args=SHELL), {**ENV, "X": "1"}, "/tmp", {"user": 1000, "group": 1000})
    assert key != warm.key_of(ExecRequest(args=SHELL), ENV, "/", {"user": 1000, "group": 1000})
    assert key != warm.key_of(ExecRequest(args=SHELL), ENV, "/tmp", {})
