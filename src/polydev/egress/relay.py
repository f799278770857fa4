"""Moving a tunnel's bytes both ways, once the CONNECT is answered.

On Linux the payload goes socket → pipe → socket with splice(2): the kernel moves it and Python only counts
it, so one tunnel runs at a good share of a direct connection's speed (bench/egress.py; a read/write loop
through asyncio streams reached about a third of it). Where splice cannot be used (a stream whose transport
is not a plain socket, such as TLS to a proxy) the bytes are copied through the streams instead.

Either way: each direction ends on its own (a half-close is passed on, the other direction may still be
sending); when one side breaks off, both are ended; the caller closes the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any

from polydev.egress.routes import Streams

Count = Callable[[int, bool], None]  # (bytes, upward: guest → upstream)

CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = 1031  # linux/fcntl.h
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def relay(guest: Streams, upstream: Streams, count: Count) -> None:
    """Relay until both directions have ended or one side broke off; `count` is told each piece moved."""
    if hasattr(os, "splice") and _plain(guest[1]) and _plain(upstream[1]):
        with contextlib.suppress(ConnectionError, OSError):  # a side gone before the relay began: it ends
            await _splice_both(guest, upstream, count)
    else:
        await _copy_both(guest, upstream, count)


def _plain(writer: asyncio.StreamWriter) -> bool:
    return writer.get_extra_info("sslcontext") is None and writer.get_extra_info("socket") is not None


async def _copy_both(guest: Streams, upstream: Streams, count: Count) -> None:
    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                count(len(data), up)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()  # half-close: the other direction may still be sending
        except (ConnectionError, OSError):
            # One side broke off: end both, so the other direction's read returns instead of waiting on
            # a peer that will never send again.
            guest[1].close()
            upstream[1].close()

    await asyncio.gather(copy(guest[0], upstream[1], True), copy(upstream[0], guest[1], False))


async def _take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, socket.socket]:
    """Stop the stream's transport from reading, flush what it still has to write, and hand back the bytes
    its reader had buffered (sent right behind the CONNECT, or behind a proxy's answer) with a socket of
    our own on the same connection (a duplicate: the transport keeps its own and closes it later)."""
    transport: Any = writer.transport
    transport.pause_reading()
    transport.set_write_buffer_limits(high=0)
    await writer.drain()  # returns once the transport's write buffer is empty
    reader.feed_eof()  # nothing more arrives through the reader: read() returns what it holds
    buffered = await reader.read()
    sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:  # the guest's side: a bigger send buffer, fewer waits (TCP tunes its own)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_SIZE)
    return buffered, sock


async def _splice_both(guest: Streams, upstream: Streams, count: Count) -> None:
    g_head, g_sock = await _take_over(*guest)
    try:
        u_head, u_sock = await _take_over(*upstream)
    except BaseException:
        g_sock.close()
        raise
    try:
        ups = asyncio.ensure_future(_splice(g_sock, u_sock, g_head, lambda n: count(n, True)))
        downs = asyncio.ensure_future(_splice(u_sock, g_sock, u_head, lambda n: count(n, False)))
        try:
            pending: set[asyncio.Future[None]] = {ups, downs}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() is not None for t in done):
                    break  # one side broke off: end both
        finally:
            for task in (ups, downs):
                task.cancel()
            await asyncio.gather(ups, downs, return_exceptions=True)
    finally:
        g_sock.close()
        u_sock.close()


async def _wait(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _splice(src: socket.socket, dst: socket.socket, head: bytes, count: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    if head:
        await loop.sock_sendall(dst, head)
        count(len(head))
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a bigger pipe, fewer round trips; the default 64 KiB works too
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            try:
                n = os.splice(src_fd, pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await _wait(src_fd, write=False)
                continue
            if n == 0:
                break
            count(n)
            while n:
                try:
                    n -= os.splice(pipe_r, dst_fd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await _wait(dst_fd, write=True)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # half-close: the other direction may still be sending
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
