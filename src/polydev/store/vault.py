"""Credential vault: AES-256-GCM with a per-record key.

Each record gets a random 16-byte salt and a random 12-byte IV. Its key is HKDF-SHA256(master key, salt),
so no two records share a key even under one master key. The associated data binds the record to its user
and provider: a ciphertext copied into another user's or another provider's row fails authentication.
Each record stores the id of the master key that sealed it, which is what lets `polydev keys rotate`
re-encrypt records one by one while every record stays readable.

Master keys come from CREDENTIAL_ENCRYPTION_KEY (+ CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS during a rotation)
or, in the embedded default, from a key file in the data directory that is generated on first use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = structlog.get_logger(__name__)

KEY_BYTES = 32
SALT_BYTES = 16
IV_BYTES = 12
TAG_BYTES = 16
_HKDF_INFO = b"polydev credential record v1"


class VaultError(Exception):
    """A record cannot be opened: wrong key, wrong row, or tampered. Never carries key material."""


class KeyConfigError(ValueError):
    """A configured master key is not base64 of 32 bytes."""


@dataclass(frozen=True)
class SealedRecord:
    """What the `credentials` row stores (the seed's four columns, base64) plus the key id."""

    ciphertext: str
    iv: str
    tag: str
    salt: str
    key_id: str


def key_id_of(key: bytes) -> str:
    # An HMAC rather than a plain hash of the key, so the id says nothing usable about the key.
    return hmac.new(key, b"polydev master key id", hashlib.sha256).hexdigest()[:16]


def generate_master_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def decode_master_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError("master key is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyConfigError(f"master key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class Keyring:
    """The primary key seals; every key in the ring can open."""

    primary: bytes
    others: tuple[bytes, ...] = ()

    @property
    def primary_id(self) -> str:
        return key_id_of(self.primary)

    def by_id(self) -> dict[str, bytes]:
        return {key_id_of(k): k for k in (self.primary, *self.others)}


class KeySource:
    """Where the keyring comes from. `load` may be called often; implementations keep it cheap."""

    def load(self) -> Keyring:  # pragma: no cover - interface
        raise NotImplementedError

    def changed(self) -> bool:
        return False


class StaticKeySource(KeySource):
    def __init__(self, primary: str, previous: list[str] | None = None) -> None:
        self._ring = Keyring(decode_master_key(primary), tuple(decode_master_key(k) for k in previous or []))

    def load(self) -> Keyring:
        return self._ring


class FileKeySource(KeySource):
    """One base64 key a line, the first one primary; mode 0600. Generated on first use.

    The file is re-read when it changes, so a `polydev keys rotate` run from another process takes
    effect in a running server without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None

    def ensure(self) -> None:
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write([generate_master_key()])
        log.warning(
            "master_key_generated",
            path=str(self.path),
            message="PRODUCTION MUST SET ITS OWN CREDENTIAL_ENCRYPTION_KEY: a master key was generated into the "
                    "data directory; anyone who can read that file can decrypt every stored credential",
        )

    def write(self, keys: list[str]) -> None:
        for k in keys:
            decode_master_key(k)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(keys) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read_lines(self) -> list[str]:
        return [line.strip() for line in self.path.read_text().splitlines() if line.strip()]

    def load(self) -> Keyring:
        self.ensure()
        self._mtime = self.path.stat().st_mtime_ns
        keys = [decode_master_key(k) for k in self.read_lines()]
        if not keys:
            raise KeyConfigError(f"{self.path} holds no key")
        return Keyring(keys[0], tuple(keys[1:]))

    def changed(self) -> bool:
        try:
            return self.path.stat().st_mtime_ns != self._mtime
        except FileNotFoundError:
            return True


def _aad(user_id: uuid.UUID | str, provider: str) -> bytes:
    return f"polydev/credential/v1|{user_id}|{provider}".encode()


def _record_key(master: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=_HKDF_INFO).derive(master)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"record {what} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise VaultError(f"record {what} has the wrong length")
    return raw


class Vault:
    def __init__(self, source: KeySource) -> None:
        self._source = source
        self._ring = source.load()

    @property
    def keyring(self) -> Keyring:
        if self._source.changed():
            self._ring = self._source.load()
        return self._ring

    @property
    def primary_key_id(self) -> str:
        return self.keyring.primary_id

    def derive(self, label: str) -> bytes:
        """A 32-byte secret for `label`, HKDF-SHA256 of the primary master key: every server configured with
        the same key derives the same one (the peers' hop between servers, polydev.core.cluster)."""
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                    info=b"polydev derived secret v1: " + label.encode()).derive(self.keyring.primary)

    def seal(self, user_id: uuid.UUID | str, provider: str, plaintext: bytes) -> SealedRecord:
        ring = self.keyring
        salt = secrets.token_bytes(SALT_BYTES)
        iv = secrets.token_bytes(IV_BYTES)
        sealed = AESGCM(_record_key(ring.primary, salt)).encrypt(iv, plaintext, _aad(user_id, provider))
        return SealedRecord(
            ciphertext=_b64(sealed[:-TAG_BYTES]),
            iv=_b64(iv),
            tag=_b64(sealed[-TAG_BYTES:]),
            salt=_b64(salt),
            key_id=ring.primary_id,
        )

    def open(self, user_id: uuid.UUID | str, provider: str, record: SealedRecord) -> bytes:
        master = self.keyring.by_id().get(record.key_id)
        if master is None:
            # Another process may have rotated the key file since we last looked.
            self._ring = self._source.load()
            master = self._ring.by_id().get(record.key_id)
        if master is None:
            raise VaultError(f"no master key with id {record.key_id} is configured")
        salt = _unb64(record.salt, "salt", SALT_BYTES)
        iv = _unb64(record.iv, "iv", IV_BYTES)
        tag = _unb64(record.tag, "tag", TAG_BYTES)
        ciphertext = _unb64(record.ciphertext, "ciphertext")
        try:
            return AESGCM(_record_key(master, salt)).decrypt(iv, ciphertext + tag, _aad(user_id, provider))
        except InvalidTag:
            raise VaultError("credential record failed authentication (wrong key, user or provider)") from None


def key_source_from_settings(primary: str | None, previous: str | None, key_file: Path) -> KeySource:
    if primary:
        return StaticKeySource(primary, [k for k in (previous or "").split(",") if k.strip()])
    return FileKeySource(key_file)
