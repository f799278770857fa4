"""Pieces the three adapters share: the run environment and the parser skeleton.

The parser skeleton holds the one rule every CLI's stream obeys in Polydev: `feed` only ever yields
`text`, `tool_call`, `tool_result` and `status`; the terminal event is decided by the CLI's own final line
but emitted by `finish`, once the exit code is known, so a stream ends in exactly one `done` or `error` even
when a CLI prints its success line and then dies (or dies before printing it).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

# The logs' redaction, reused: a CLI's own error text may quote a token, and it ends up in a user's event.
from polydev.logging import _scrub
from polydev.providers.base import GuestEnv, event

GUEST_PATH = "/usr/local/bin:/usr/bin:/bin"
# How much of a CLI's non-JSON output is kept to explain a crash, and how long one message may be.
TAIL_LINES = 5
MAX_MESSAGE = 500
MAX_RAW = 2000  # an unknown event kept as status: its object, cut to this many characters
# A tool's output goes into every event store and stream; the model saw (at most) the CLI's own cut anyway.
MAX_TOOL_OUTPUT = 64 * 1024


def run_env(env: GuestEnv, extra: Mapping[str, str | None]) -> dict[str, str]:
    """A clean environment for a run: nothing of the agent's own leaks in; `None` values are left out.

    TERM=dumb keeps colour codes out of the output we parse.
    """
    base = {"HOME": env.home, "PATH": GUEST_PATH, "LANG": "C.UTF-8", "TERM": "dumb", "USER": "root",
            "SHELL": "/bin/bash"}
    return {**base, **env.proxy_vars(), **present(extra)}


def present(values: Mapping[str, str | None]) -> dict[str, str]:
    """The variables that have a value (an unset CA or base URL means: leave the variable out)."""
    return {k: v for k, v in values.items() if v is not None}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


def last_complete(pattern: str, output: str) -> str | None:
    """The last match of `pattern` in a login's output (colours removed) that is followed by whitespace.

    Output arrives in chunks: a URL or code cut off at the end of what has arrived so far is not yet whole.
    """
    matches = re.findall(f"(?:{pattern})(?=\\s)", _ANSI.sub("", output))
    return matches[-1] if matches else None


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on this line, or None for anything else (warnings, stderr noise, partial lines)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def clean(text: object, limit: int = MAX_MESSAGE) -> str:
    """A message fit for an event a user sees: secrets redacted, bounded in length."""
    out = str(_scrub(_ANSI.sub("", str(text)))).strip()
    return out if len(out) <= limit else out[: limit - 1] + "…"


def tool_result(call_id: object, output: object, *, is_error: bool, **extra: Any) -> dict[str, Any]:
    """A `tool_result` event; the output is text, cut at MAX_TOOL_OUTPUT characters (`truncated` says so)."""
    text = "" if output is None else output if isinstance(output, str) else json.dumps(output)
    if len(text) > MAX_TOOL_OUTPUT:
        extra["truncated"] = True
        text = text[:MAX_TOOL_OUTPUT]
    return event("tool_result", id=call_id, output=text, is_error=is_error, **extra)


def int_fields(source: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, int]:
    return {n: int(source[n]) for n in names if isinstance(source.get(n), (int, float))}


class StreamParser:
    """Base of the per-CLI parsers: subclasses map one JSON object with `_map` and call `_succeed` or
    `_fail` when they see the CLI's final event."""

    cli = "cli"  # the name used in crash messages
    # What an exit code means, for CLIs whose codes say it better than their last output line.
    exit_reasons: ClassVar[Mapping[int, str]] = {}
    # The event types (the objects' `type`) this parser was written for, those it ignores on purpose
    # included. A newer CLI may send others: each is passed on as a `status` event naming its raw type (with
    # the object, cut short), never dropped unseen or taken for one it resembles.
    known_types: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._terminal: dict[str, Any] | None = None  # the done / error decided by the stream
        self._last_error: str | None = None  # a non-fatal error seen on the way, to explain a crash
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._finished = False

    def feed(self, line: str) -> list[dict[str, Any]]:
        if self._finished:
            return []
        obj = json_object(line)
        if obj is None:
            if line.strip():
                self._tail.append(line.strip())
            return []
        kind = obj.get("type")
        if self.known_types and kind not in self.known_types:
            return [self._unknown(kind, obj)]
        return self._map(obj)

    def finish(self, exit_code: int) -> list[dict[str, Any]]:
        if self._finished:
            return []
        self._finished = True
        terminal = self._terminal
        if terminal is not None and terminal["type"] == "done" and exit_code != 0:
            # The CLI said it succeeded and then failed anyway (killed while exiting, a crash in cleanup).
            return [event("error", message=f"{self.cli} exited with code {exit_code} after finishing",
                          exit_code=exit_code)]
        if terminal is not None:
            return [terminal]
        why = self.exit_reasons.get(exit_code) or self._last_error or (self._tail[-1] if self._tail else None)
        detail = f": {clean(why)}" if why else ""
        if exit_code == 0:
            return [event("error", message=f"{self.cli} exited without a final result{detail}", exit_code=0)]
        return [event("error", message=f"{self.cli} exited with code {exit_code}{detail}", exit_code=exit_code)]

    # -- for subclasses
    def _map(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _succeed(self, usage: dict[str, Any], result: str | None, **extra: Any) -> None:
        if self._terminal is None:
            fields: dict[str, Any] = {"usage": usage, **extra}
            if result is not None:
                fields["result"] = result
            self._terminal = event("done", **fields)

    def _fail(self, message: object) -> None:
        if self._terminal is None:
            self._terminal = event("error", message=clean(message or f"{self.cli} reported an error"))

    def _unknown(self, kind: object, obj: dict[str, Any]) -> dict[str, Any]:
        raw = json.dumps(obj, ensure_ascii=False)
        return event("status", message=f"{self.cli} sent an event of a type this adapter does not know: {kind!r}",
                     raw_type=str(kind), raw=raw if len(raw) <= MAX_RAW else raw[:MAX_RAW] + "…")

    def _warn(self, message: object) -> list[dict[str, Any]]:
        """A non-fatal error the CLI reported (a retry, a warning): shown as status, kept for a crash."""
        self._last_error = clean(message)
        return [event("status", message=self._last_error, level="warning")]
