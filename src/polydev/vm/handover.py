"""Handing a restored guest's agent its own token: one `POST /token` on a plain socket.

A restored guest still holds the snapshot's token; the first request that succeeds also proves the agent
answers, which is what "the VM is ready" means. Two reasons this is a bare socket and not httpx:
- a tap-mode VM is reached through its slot from the namespace that plays the host (the root namespace in
  production, a namespace of their own in tests): the socket is created in that namespace by a short-lived
  thread (setns(2) changes only the calling thread, and a socket keeps the namespace it was made in), so the
  engine itself never leaves its own namespace;
- it runs on every VM creation's critical path, where building an httpx client costs more than the request.
The agent serves one request per connection (Connection: close), so reading to EOF gets the whole answer.

`hand_over` (from a thread) and `hand_over_async` (from the event loop) retry until the restored guest's
network answers: both backends' restores end with one of them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns` (and pyroute2) keep named namespaces


RETRY_PAUSE_S = 0.01  # between attempts while the restored guest's network comes up


class HandoverRefused(Exception):
    """The agent answered, but not with success (a wrong old token, say): retrying will not help."""


class HandoverTimeout(Exception):
    """The agent did not answer before the deadline, or its VM died while we waited. Reads "did not answer
    (<the last error's type>)", to follow "the restored agent [at <url>]"."""

    def __init__(self, last_error: OSError) -> None:
        super().__init__(f"did not answer ({type(last_error).__name__})")
        self.last_error = last_error


def socket_in_netns(netns: str | None) -> socket.socket:
    """A TCP socket that lives in the named network namespace (None: this thread's own)."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:  # a throwaway thread: it ends in the other namespace, nobody else runs on it
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=make, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def rotate_token(host: str, port: int, old_token: str, new_token: str, *, netns: str | None = None,
                 timeout: float = 5.0) -> None:
    """Replace the agent's token. OSError while the guest's network is not answering yet (retry);
    HandoverRefused when the agent said no."""
    # The host's time goes along: a restored guest's clock stopped when its snapshot was taken.
    body = json.dumps({"token": new_token, "now": time.time()}).encode()
    head = (f"POST /token HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {old_token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket_in_netns(netns) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(head + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if not reply:  # accepted and closed: in user mode, QEMU's port forward before the guest is reachable
        raise ConnectionResetError("the agent closed the connection without answering")
    status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionResetError(f"not an HTTP answer: {status_line[:80]!r}")
    if parts[1] != "200":  # the reason is the agent's, never the tokens
        raise HandoverRefused(f"agent answered {status_line[:120]}")


def _attempt(host: str, port: int, old_token: str, new_token: str, netns: str | None,
             deadline: float, retried: bool = False) -> OSError | None:
    """One rotate_token; None when it succeeded, the error when the guest did not answer (yet).

    `retried`: an earlier attempt failed, and it may have failed only after the agent took the new token (its
    answer came after our timeout: a slow guest on a loaded host). The agent then refuses the old token, so
    a refusal is checked with the new one before it counts: accepted, the handover had happened."""
    timeout = max(0.1, min(5.0, deadline - time.monotonic()))
    try:
        rotate_token(host, port, old_token, new_token, netns=netns, timeout=timeout)
    except OSError as exc:
        return exc
    except HandoverRefused as refused:
        if not retried:
            raise
        try:
            rotate_token(host, port, new_token, new_token, netns=netns, timeout=timeout)
        except (OSError, HandoverRefused):
            raise refused from None
    return None


def hand_over(host: str, port: int, old_token: str, new_token: str, *, deadline: float,
              alive: Callable[[], bool], netns: str | None = None) -> None:
    """Give a restored guest's agent its own token, retrying while its network comes up (a moment after
    the resume). `deadline` is on time.monotonic(); `alive` says whether the VM still runs. Raises
    HandoverTimeout (no answer in time, or the VM died) or HandoverRefused (the agent said no: final)."""
    retried = False
    while (error := _attempt(host, port, old_token, new_token, netns, deadline, retried)) is not None:
        if not alive() or time.monotonic() > deadline:
            raise HandoverTimeout(error) from None
        retried = True
        time.sleep(RETRY_PAUSE_S)


async def hand_over_async(host: str, port: int, old_token: str, new_token: str, *, deadline: float,
                          alive: Callable[[], bool], netns: str | None = None) -> None:
    """hand_over from the event loop: each attempt in a thread, the pauses on the loop (so a cancel lands
    between attempts)."""
    retried = False
    while (error := await asyncio.to_thread(_attempt, host, port, old_token, new_token, netns,
                                            deadline, retried)) is not None:
        if not alive() or time.monotonic() > deadline:
            raise HandoverTimeout(error) from None
        retried = True
        await asyncio.sleep(RETRY_PAUSE_S)
