"""What the login and run flows raise to their callers (the API routes turn each into its answer), and how
a failure reads in a session's or run's `error_message`."""

from __future__ import annotations

from polydev.store.runs import CredentialBusy
from polydev.vm.agent_client import AgentUnreachable


class FlowUnavailable(Exception):
    """The server cannot run VMs right now; the text says why."""


class SessionNotFound(Exception):
    """No login session by that id for this user."""


class SessionExpired(Exception):
    """The login session left the session store before it ended (its TTL passed without activity)."""


class SessionNotLive(Exception):
    """The session exists but is not being driven here (ended, or by another replica)."""


class CodeRejected(ValueError):
    """What the user pasted is not this login's code or callback URL; the text says what to paste."""


class LoginError(Exception):
    """Why a login failed, in words for the user (never a secret)."""


class NoCredential(Exception):
    """The user has stored nothing for this provider."""


class BadRunFiles(ValueError):
    """The files sent with a run break core/run_files.py's rule for names, or are too large; the text says
    which file and why."""


class RunFilesTooLarge(BadRunFiles):
    """The files sent with a run are more than MAX_RUN_FILES_BYTES in all (a 413, like a prompt too large)."""


def describe(exc: BaseException) -> str:
    """An unexpected failure as a session or run reports it: the exception's type and text. A VM's agent
    that could not be reached is named by what failed (ConnectError, ReadTimeout), which is what
    AgentUnreachable's text says."""
    return str(exc) if isinstance(exc, AgentUnreachable) else f"{type(exc).__name__}: {exc}"


__all__ = ["BadRunFiles", "RunFilesTooLarge", "CodeRejected", "CredentialBusy", "FlowUnavailable", "LoginError", "NoCredential",
           "SessionExpired", "SessionNotFound", "SessionNotLive", "describe"]


class TurnRefused(ValueError):
    """A turn that cannot be: its conversation is missing (not_found), with another provider, or on another
    workspace (the text says which)."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found
