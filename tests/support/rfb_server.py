"""A scripted RFB 3.8 server standing in for the login VM's Xtigervnc (`-SecurityTypes VncAuth -PasswordFile`),
and the VNC password arithmetic written out from the protocol's description, independently of
polydev.core.rfb: the password file is the password DES-encrypted under VNC's fixed key, and VncAuth's
answer is the challenge DES-encrypted under the password; VNC's DES reads each key byte's bits in reverse.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VERSION = b"RFB 003.008\n"
NONE, VNC_AUTH = 1, 2
VNCPASSWD_KEY = bytes((23, 82, 107, 6, 35, 78, 88, 7))  # tigervnc's d3desObfuscationKey, VNC bit order


def _vnc_des(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    standard = bytes(int(format(b, "08b")[::-1], 2) for b in key.ljust(8, b"\0")[:8])
    cipher = Cipher(TripleDES(standard + standard + standard), modes.ECB())
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def password_from_file(data: bytes) -> bytes:
    """What Xtigervnc reads from its password file: 8 bytes, up to the first NUL."""
    return _vnc_des(VNCPASSWD_KEY, data[:8], decrypt=True).split(b"\0")[0]


def expected_response(password: bytes, challenge: bytes) -> bytes:
    return _vnc_des(password, challenge)


class ScriptedVnc:
    """The VM side. `offer`: the security types it offers (VncAuth alone, as the login browser's Xtigervnc).
    For VncAuth it reads the password from `password_file` at each connection, as Xtigervnc does, and checks
    the answer to a random challenge. Once in, it echoes every byte back, so both directions can be checked.
    It records what each connection that got past the banner did: `results` ("ok", "failed", "dropped") and
    `chosen` security types."""

    def __init__(self, password_file: Path | Callable[[], Path], offer: bytes = bytes([VNC_AUTH])) -> None:
        self.password_file = password_file
        self.offer = offer
        self.connections = 0
        self.chosen: list[int] = []
        self.results: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _path(self) -> Path:
        return self.password_file() if callable(self.password_file) else self.password_file

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(VERSION)
            try:
                version = await reader.readexactly(12)
            except asyncio.IncompleteReadError:
                return  # a readiness probe: it reads the banner and goes
            if version != VERSION:
                self.results.append("dropped")
                return
            writer.write(bytes([len(self.offer)]) + self.offer)
            chosen = (await reader.readexactly(1))[0]
            self.chosen.append(chosen)
            if chosen not in self.offer:
                await self._fail(writer, "security type not offered")
                return
            if chosen == VNC_AUTH:
                challenge = os.urandom(16)
                writer.write(challenge)
                answer = await reader.readexactly(16)
                if answer != expected_response(password_from_file(self._path().read_bytes()), challenge):
                    await self._fail(writer, "Authentication failure")
                    return
            writer.write(b"\0\0\0\0")
            self.results.append("ok")
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.results.append("dropped")
        finally:
            writer.close()

    async def _fail(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self.results.append("failed")
        writer.write(b"\0\0\0\1" + struct.pack(">I", len(reason)) + reason.encode())
        await writer.drain()
