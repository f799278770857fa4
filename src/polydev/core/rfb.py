"""RFB (VNC) security as the control plane speaks it: the login VM's VNC server wants a password only this
server holds, and the VNC bridge (api/routes/vnc.py) answers it on the user's behalf.

Why: the VM's VNC port is reachable by more than the bridge. User networking forwards it to a 127.0.0.1
port that any local process or user can open; in tap mode any local process can route to the slot's address.
A VNC server without a password there would hand the sign-in browser, to watch and to type into, to anyone
on the host, past the ticket. So each login gets a random password (`new_password`), written into its guest
through the agent as Xtigervnc's password file (`password_file`): never on a command line, in a log or in an
API answer. The bridge authenticates to the VM with it (`authenticate`: RFB 3.8, VncAuth), then offers the
user's noVNC the None security type (`serve_none`), the single-use ticket having been the user's credential.
Everything after the security handshake (ClientInit, ServerInit, the session) passes through unchanged.

VncAuth is DES of a 16-byte challenge keyed with the password: a weak cipher (56-bit key; a recorded exchange
can be brute-forced offline), but recording needs root on the host, which reads this process's memory
anyway. Online, a guess costs a connection to an emulated guest: 2^55 guesses do not fit in a login's life,
and the password dies with the login.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Awaitable, Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VERSION = b"RFB 003.008\n"
VERSION_3_7 = b"RFB 003.007\n"
SECURITY_NONE, SECURITY_VNC_AUTH = 1, 2
RESULT_OK = b"\0\0\0\0"
MAX_REASON = 4096  # a failure reason is a line of text; never allocate what a confused peer announces


class RfbError(Exception):
    """The other side did not complete the security handshake as expected. The message says why and holds
    nothing secret (the peer's failure reason at most)."""


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def _des_key(key: bytes) -> bytes:
    """VNC's DES takes each key byte's bits in reverse order (its d3des reads them LSB first): as a standard
    DES key, each byte is bit-reversed. Padded with NULs to 8 bytes, as VNC does for shorter passwords."""
    return bytes(_reverse_bits(b) for b in key.ljust(8, b"\0")[:8])


# The fixed key VNC "encrypts" password files with (vncpasswd's d3desObfuscationKey), as a standard DES key.
_FILE_KEY = _des_key(bytes((23, 82, 107, 6, 35, 78, 88, 7)))


def _des(key: bytes, data: bytes) -> bytes:
    # Single DES is legacy in OpenSSL 3; triple DES with one key three times (EDE: K, K⁻¹, K) is single DES.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def new_password() -> bytes:
    """8 random bytes in 1..127: VNC ends a password at its first NUL, and ignores each byte's top bit (it
    becomes a DES parity bit), so these carry all the key VncAuth has: 8 × 7 bits, less the NUL."""
    return bytes(secrets.randbelow(127) + 1 for _ in range(8))


def password_file(password: bytes) -> bytes:
    """The password as Xtigervnc's `-PasswordFile` (what `vncpasswd` writes): DES under VNC's fixed key."""
    return _des(_FILE_KEY, password.ljust(8, b"\0")[:8])


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """The VncAuth answer to a server's 16-byte challenge: each 8-byte half DES-encrypted with the password."""
    if len(challenge) != 16:
        raise ValueError("a VncAuth challenge is 16 bytes")
    return _des(_des_key(password), challenge)


Read = Callable[[int], Awaitable[bytes]]  # exactly n bytes, or raises
Write = Callable[[bytes], Awaitable[None]]


async def _reason(read: Read) -> str:
    (length,) = struct.unpack(">I", await read(4))
    return (await read(min(length, MAX_REASON))).decode("utf-8", "replace")


async def authenticate(read: Read, write: Write, password: bytes) -> None:
    """As the client, through the VM's security handshake with VncAuth; returns when the server said OK,
    before ClientInit (which the user's viewer sends). Raises RfbError otherwise."""
    if await read(12) != VERSION:  # Xtigervnc speaks 3.8: anything else is not the server we started
        raise RfbError("the VM's VNC server does not speak RFB 3.8")
    await write(VERSION)
    types = await read((await read(1))[0])
    if not types:
        raise RfbError(f"the VM's VNC server refused the connection: {await _reason(read)}")
    if SECURITY_NONE in types:  # its password file is not in force: refuse to go on as if it were
        raise RfbError("the VM's VNC server lets anyone in (security type None)")
    if SECURITY_VNC_AUTH not in types:
        raise RfbError(f"the VM's VNC server does not offer VNC authentication (offers {list(types)})")
    await write(bytes([SECURITY_VNC_AUTH]))
    await write(vnc_auth_response(password, await read(16)))
    if await read(4) != RESULT_OK:
        raise RfbError(f"the VM's VNC server refused the password: {await _reason(read)}")


async def serve_none(read: Read, write: Write) -> None:
    """As the server, through the user's viewer's security handshake, offering None alone: the viewer was
    let in by its ticket. Returns before ClientInit, which then passes through to the VM. Raises RfbError
    when the viewer does not follow (RFB 3.7 and 3.8; noVNC answers 3.8 to a 3.8 server)."""
    await write(VERSION)
    version = await read(12)
    if version not in (VERSION, VERSION_3_7):
        raise RfbError("the viewer does not speak RFB 3.7 or 3.8")
    await write(bytes([1, SECURITY_NONE]))
    if (await read(1))[0] != SECURITY_NONE:
        if version == VERSION:
            reason = b"only security type None is offered here"
            await write(b"\0\0\0\1" + struct.pack(">I", len(reason)) + reason)
        raise RfbError("the viewer chose a security type that was not offered")
    if version == VERSION:  # 3.7 sends no SecurityResult for None
        await write(RESULT_OK)
