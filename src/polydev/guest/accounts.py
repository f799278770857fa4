"""The guest's accounts, for a command or a file that belongs to a user other than the agent's own (root).

E2B's sandboxes run as `user` (uid 1000, home /home/user) unless a call asks for root, so the image has that
account (vm/build_steps.sandbox_user) and the agent runs a command as whichever account the host names. File
calls stay the agent's own (root) and hand what they make to the account afterwards.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


class NoSuchUser(LookupError):
    """The guest has no account of that name."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def env(self) -> dict[str, str]:
        """What a login as this account sets; the request's own env still goes over it."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def lookup(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise NoSuchUser(f"user {name!r} does not exist in this VM") from None
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir,
                   shell=entry.pw_shell or "/bin/sh")


def missing_parents(path: str) -> list[str]:
    """The directories above `path` that do not exist yet, outermost first (what makedirs will make)."""
    made: list[str] = []
    parent = os.path.dirname(path)
    while parent and parent != "/" and not os.path.lexists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    return made[::-1]


def give(paths: list[str], account: Account | None) -> None:
    """Hand files the agent made for `account` over to it (nothing for the agent's own account)."""
    if account is None:
        return
    for path in paths:
        os.lchown(path, account.uid, account.gid)
