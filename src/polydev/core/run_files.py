"""The files a user sends with a run, checked before anything starts.

A name is a relative path inside the run's working directory: segments separated by `/`, none of them empty
(so no leading, trailing or doubled `/`), `.` or `..`. It holds no control or format characters (Unicode
categories Cc, Cf, Zl, Zp, and lone surrogates): a newline or a right-to-left override in a file name makes
a listing lie about what is there, and the agent would fail on some of them only once the VM is up. A name
is at most NAME_MAX bytes per segment and PATH_MAX_BYTES in all (UTF-8), and no file may be the directory
of another. Each rejection names the file, escaped (repr), so the message itself shows what was wrong.
"""

from __future__ import annotations

import unicodedata

from polydev.core.errors import BadRunFiles, RunFilesTooLarge

NAME_MAX = 255  # bytes in one segment: what Linux file systems allow
PATH_MAX_BYTES = 1024  # bytes in a whole name: deep enough for a project tree, far below PATH_MAX
_FORBIDDEN = {"Cc": "a control character", "Cf": "a format character", "Cs": "a lone surrogate",
              "Zl": "a line separator", "Zp": "a paragraph separator"}  # by Unicode category


def _shown(name: str) -> str:
    return repr(name[:80] + ("…" if len(name) > 80 else ""))


def _problem(name: str) -> str | None:
    """Why `name` is not a file name a run may have, or None."""
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "must be relative to the working directory (no leading /)"
    if name.endswith("/"):
        return "must name a file, not a directory (no trailing /)"
    bad = next((c for c in name if unicodedata.category(c) in _FORBIDDEN), None)
    if bad is not None:
        return f"contains U+{ord(bad):04X}, {_FORBIDDEN[unicodedata.category(bad)]}"
    if len(name.encode()) > PATH_MAX_BYTES:
        return f"is longer than {PATH_MAX_BYTES} bytes"
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            return "must not have empty, '.' or '..' segments"
        if len(segment.encode()) > NAME_MAX:
            return f"has a segment longer than {NAME_MAX} bytes"
    return None


def check_files(files: dict[str, str] | None, limit: int) -> dict[str, bytes]:
    """The run's files as bytes by name; BadRunFiles for a bad name, a file that is also another's
    directory, or more than `limit` bytes in all."""
    out: dict[str, bytes] = {}
    total = 0
    for name, content in (files or {}).items():
        problem = _problem(name)
        if problem is not None:
            raise BadRunFiles(f"file name {_shown(name)} {problem}")
        try:
            data = content.encode()
        except UnicodeEncodeError:  # JSON may carry a lone surrogate ("\ud800"): not text a file can hold
            raise BadRunFiles(f"file {_shown(name)} is not valid Unicode text (a lone surrogate)") from None
        total += len(data)
        out[name] = data
    for name in out:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in out:
                raise BadRunFiles(f"file name {_shown(parent)} is also a directory, of {_shown(name)}")
    if total > limit:
        raise RunFilesTooLarge(f"files total {total} bytes; the limit is {limit}")
    return out
