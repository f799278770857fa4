"""What the workspace service takes and gives (core/workspaces.py): its errors, limits, views and sources."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime


class WorkspaceError(Exception):
    """Base: the text is the reason, as the API gives it."""


class WorkspaceNotFound(WorkspaceError):
    pass


class WorkspaceLimit(WorkspaceError):
    pass


class WorkspaceInvalid(WorkspaceError):
    """What was asked for cannot be (a repository URL or branch that is not usable); changes nothing."""


class WorkspaceUnavailable(WorkspaceError):
    pass


class WorkspaceBusy(WorkspaceError):
    """Not ready for that now (still being made, or it failed); the text says which."""


@dataclass(frozen=True)
class Limits:
    workspaces: int = 10  # per user, whatever their state
    total_bytes: int = 5 * 1024**3  # of all the user's workspaces, as last measured
    upload_bytes: int = 100 * 1024**2  # one archive
    paused: int = 3  # paused with their memory saved, per user


@dataclass(frozen=True)
class GitAccess:
    """How git in a workspace's VM reaches a remote: the gateway as the guest's proxy (None: no gateway),
    the operator's extra CA, and the hosts workspaces may reach (the gateway's allow-list for them)."""

    proxy: Callable[[], str | None] = lambda: None
    ca_pem: bytes | None = None
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkspaceView:
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    source: str
    repo_url: str | None
    branch: str | None
    state: str
    size_bytes: int
    error: str | None
    vm_id: uuid.UUID | None
    created_at: datetime
    used_at: datetime


@dataclass(frozen=True)
class Source:
    kind: str  # empty | archive | git
    archive: bytes | None = None
    archive_kind: str | None = None  # ARCHIVE_KINDS
    repo_url: str | None = None  # git
    branch: str | None = None  # git: the branch to check out (None: the remote's default)
    git_token: str | None = field(default=None, repr=False)  # git: sealed into the row, never logged


@dataclass(frozen=True)
class Pushed:
    branch: str
    commit: str
    remote: str


