"""The VNC bridge's RFB security handshakes (polydev.core.rfb): VncAuth into a scripted VNC server that reads
its password file the way Xtigervnc does, None offered to the viewer, and the password file's format."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polydev.core import rfb
from tests.support.rfb_server import NONE, VNC_AUTH, ScriptedVnc, password_from_file


def test_the_password_file_is_what_vncpasswd_writes() -> None:
    # What `vncpasswd -f` writes for "password": the value published for every VNC flavour.
    assert rfb.password_file(b"password") == bytes.fromhex("dbd83cfd727a1458")


def test_new_passwords_are_random_vnc_passwords_that_survive_the_file() -> None:
    passwords = {rfb.new_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        # VNC stops at a NUL and drops each byte's top bit: anything else would shorten the key unseen.
        assert len(password) == 8 and all(1 <= b < 128 for b in password)
        assert password_from_file(rfb.password_file(password)) == password


@contextlib.asynccontextmanager
async def vnc(tmp_path: Path, password: bytes, offer: bytes = bytes([VNC_AUTH])) -> AsyncIterator[
        tuple[ScriptedVnc, asyncio.StreamReader, asyncio.StreamWriter]]:
    (tmp_path / "vnc-password").write_bytes(rfb.password_file(password))
    server = ScriptedVnc(tmp_path / "vnc-password", offer)
    host, port = await server.start()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield server, reader, writer
    finally:
        writer.close()
        server.close()


def send(writer: asyncio.StreamWriter) -> rfb.Write:
    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return write


async def test_authenticates_with_vnc_auth_and_stops_before_client_init(tmp_path: Path) -> None:
    password = rfb.new_password()
    async with vnc(tmp_path, password) as (server, reader, writer):
        await rfb.authenticate(reader.readexactly, send(writer), password)
        assert server.chosen == [VNC_AUTH] and server.results == ["ok"]
        # What follows is the viewer's: the stream is right after SecurityResult (the server echoes it).
        writer.write(b"\x01")
        assert await asyncio.wait_for(reader.readexactly(1), 30) == b"\x01"


async def test_a_wrong_password_is_an_error_with_the_servers_reason(tmp_path: Path) -> None:
    async with vnc(tmp_path, b"right-pw") as (server, reader, writer):
        with pytest.raises(rfb.RfbError, match="refused the password: Authentication failure"):
            await rfb.authenticate(reader.readexactly, send(writer), b"wrong-pw")
    assert server.results == ["failed"]


async def test_a_server_that_lets_anyone_in_is_refused(tmp_path: Path) -> None:
    password = rfb.new_password()
    async with vnc(tmp_path, password, offer=bytes([NONE, VNC_AUTH])) as (server, reader, writer):
        with pytest.raises(rfb.RfbError, match="lets anyone in"):
            await rfb.authenticate(reader.readexactly, send(writer), password)
    assert server.chosen == []


async def test_a_server_without_vnc_auth_or_that_refuses_at_once() -> None:
    async def scripted(script: bytes) -> str:
        data = bytearray(script)

        async def read(n: int) -> bytes:
            out = bytes(data[:n])
            del data[:n]
            return out

        async def write(_: bytes) -> None:
            pass

        with pytest.raises(rfb.RfbError) as info:
            await rfb.authenticate(read, write, b"pw")
        return str(info.value)

    assert "offers [16, 19]" in await scripted(rfb.VERSION + b"\x02\x10\x13")
    reason = b"too many connections"
    assert await scripted(rfb.VERSION + b"\0" + struct.pack(">I", len(reason)) + reason) == (
        "the VM's VNC server refused the connection: too many connections")
    assert "RFB 3.8" in await scripted(b"RFB 003.003\n")


class Viewer:
    """The viewer's side as bytes: what it will send, and what it was sent."""

    def __init__(self, sends: bytes) -> None:
        self.pending = bytearray(sends)
        self.received = b""

    async def read(self, n: int) -> bytes:
        if len(self.pending) < n:
            raise EOFError
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    async def write(self, data: bytes) -> None:
        self.received += data


async def test_the_viewer_is_offered_none_alone() -> None:
    viewer = Viewer(rfb.VERSION + bytes([NONE]) + b"\x01")  # version, security None, ClientInit
    await rfb.serve_none(viewer.read, viewer.write)
    assert viewer.received == rfb.VERSION + b"\x01\x01" + b"\0\0\0\0"
    assert viewer.pending == b"\x01"  # ClientInit is left for the VM
    # RFB 3.7 has no SecurityResult after None.
    viewer = Viewer(b"RFB 003.007\n" + bytes([NONE]))
    await rfb.serve_none(viewer.read, viewer.write)
    assert viewer.received == rfb.VERSION + b"\x01\x01"


async def test_a_viewer_that_asks_for_anything_else_is_refused() -> None:
    viewer = Viewer(rfb.VERSION + bytes([VNC_AUTH]))
    with pytest.raises(rfb.RfbError, match="not offered"):
        await rfb.serve_none(viewer.read, viewer.write)
    assert viewer.received.startswith(rfb.VERSION + b"\x01\x01" + b"\0\0\0\1")  # SecurityResult: failed
    viewer = Viewer(b"RFB 003.003\n")
    with pytest.raises(rfb.RfbError, match="3.7 or 3.8"):
        await rfb.serve_none(viewer.read, viewer.write)
