"""POST /fs: file-system operations for the host (stat, list, mkdir, move, remove) without a process each.

Spawning `stat` or `find` per call costs a fork and an exec, which is tens of milliseconds on an emulated CPU;
these run in the agent's own thread. Only the standard library: the agent runs on Debian's python3.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from polydev.guest import accounts
from polydev.protocol import MAX_LIST_ENTRIES, FsEntry, FsRequest


class FsError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def run(req: FsRequest) -> list[FsEntry]:
    path = os.path.normpath(req.path)
    try:
        if req.op == "stat":
            return [entry(path)]
        if req.op == "list":
            if not os.path.isdir(path):
                raise FsError(404 if not os.path.lexists(path) else 400, f"{path} is not a directory")
            out: list[FsEntry] = []
            _walk(path, req.depth, out)
            return out
        if req.op == "mkdir":
            if os.path.lexists(path):
                raise FsError(409, f"{path} already exists")
            owner = None if req.user is None else accounts.lookup(req.user)
            made = [*accounts.missing_parents(path), path]
            os.makedirs(path)
            accounts.give(made, owner)
            return [entry(path)]
        if req.op == "move":
            assert req.destination is not None
            target = os.path.normpath(req.destination)
            os.lstat(path)  # FileNotFoundError: 404 for the source, not a half-made parent
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
            return [entry(target)]
        # remove: a directory with everything in it, as `rm -rf` would (but the path must exist)
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil  # here: the agent's start-up on an emulated CPU does not pay for it

            shutil.rmtree(path)
        else:
            os.unlink(path)
        return []
    except FileNotFoundError:
        raise FsError(404, f"{req.path} does not exist") from None
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise FsError(409, exc.strerror or str(exc)) from None
    except PermissionError as exc:
        raise FsError(403, exc.strerror or str(exc)) from None
    except accounts.NoSuchUser as exc:
        raise FsError(422, str(exc)) from None


def _walk(directory: str, depth: int, out: list[FsEntry]) -> None:
    try:
        names = sorted(os.listdir(directory))
    except (PermissionError, FileNotFoundError):  # vanished or unreadable below the top: skipped
        return
    for name in names:
        if len(out) >= MAX_LIST_ENTRIES:
            raise FsError(413, f"more than {MAX_LIST_ENTRIES} entries; list with a smaller depth")
        path = os.path.join(directory, name)
        try:
            found = entry(path)
        except FileNotFoundError:
            continue
        out.append(found)
        if depth > 1 and found.type == "dir":
            _walk(path, depth - 1, out)


def entry(path: str) -> FsEntry:
    st = os.lstat(path)
    mode = st.st_mode
    kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else \
        "symlink" if stat.S_ISLNK(mode) else "other"
    return FsEntry(name=os.path.basename(path) or "/", path=path, type=kind, size=st.st_size,
                   mode=stat.S_IMODE(mode), permissions=stat.filemode(mode), owner=_user(st.st_uid),
                   group=_group(st.st_gid), mtime=st.st_mtime,
                   symlink_target=os.readlink(path) if kind == "symlink" else None)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
