"""Keys and authenticated encryption for everything a store holds.

A store has two random 256-bit keys, wrapped in its ``config`` object with a
key-encryption key derived (HKDF-SHA256) from the deployment's key file:

* the *data key* seals blobs, pack headers, indexes and records (AES-256-GCM);
* the *id key* makes blob ids keyed BLAKE3 hashes. It is shared by every region
  of a deployment, so ids stay comparable and copies send only missing blobs
  even when regions encrypt with different data keys.

With ``encryption: {mode: none}`` nothing is encrypted, but every sealed
object still carries a BLAKE3 checksum so corruption is detected.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zfsbackd.errors import IntegrityError, KeyFileError

KEY_BYTES = 32
NONCE_BYTES = 12
CHECKSUM_BYTES = 16
MIN_KEY_FILE_BYTES = 32


def load_key_file(path: Path) -> bytes:
    """Read the key file, refusing one that others could read (it unlocks every backup)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(
            f"encryption.key_file: {path} does not exist; create one with "
            f"`zfsbackd key generate --key-file {path}` (and keep a copy somewhere safe)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"encryption.key_file: cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"encryption.key_file: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"encryption.key_file: {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                f"group or others; refusing to use it. Run `chmod 600 {path}`"
            )
        material = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(material) < MIN_KEY_FILE_BYTES:
        raise KeyFileError(
            f"encryption.key_file: {path} holds {len(material)} bytes; at least {MIN_KEY_FILE_BYTES} are "
            f"needed. Create a new one with `zfsbackd key generate --key-file {path}`"
        )
    return material


def generate_key_file(path: Path) -> None:
    """Write 32 random bytes (base64) with mode 0600; never overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    try:
        os.write(fd, base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def derive_wrapping_key(material: bytes, store_id: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=store_id.encode(),
        info=b"zfsbackd key-encryption key v1",
    ).derive(material)


@dataclass(frozen=True)
class StoreKeys:
    """The two keys of one store; ``data_key`` is None for unencrypted stores."""

    id_key: bytes
    data_key: bytes | None

    @classmethod
    def generate(cls, *, encrypted: bool, id_key: bytes | None = None) -> StoreKeys:
        return cls(
            id_key=id_key or secrets.token_bytes(KEY_BYTES),
            data_key=secrets.token_bytes(KEY_BYTES) if encrypted else None,
        )

    def wrap(self, wrapping_key: bytes | None) -> dict[str, str]:
        """The keys as stored in the store's ``config`` object."""
        if self.data_key is None:
            return {"mode": "none", "id_key": self.id_key.hex()}
        nonce = secrets.token_bytes(NONCE_BYTES)
        assert wrapping_key is not None
        sealed = AESGCM(wrapping_key).encrypt(nonce, self.data_key + self.id_key, b"zfsbackd store keys v1")
        return {"mode": "aes-256-gcm", "wrapped": base64.b64encode(nonce + sealed).decode()}

    @classmethod
    def unwrap(cls, wrapped: dict[str, str], wrapping_key: bytes | None, *, where: str) -> StoreKeys:
        if wrapped.get("mode") == "none":
            return cls(id_key=bytes.fromhex(wrapped["id_key"]), data_key=None)
        if wrapping_key is None:
            raise KeyFileError(
                f"{where} is encrypted but the configuration has `encryption: {{mode: none}}`; "
                "set encryption.key_file to the key file the store was created with"
            )
        raw = base64.b64decode(wrapped["wrapped"])
        try:
            keys = AESGCM(wrapping_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], b"zfsbackd store keys v1")
        except InvalidTag:
            raise KeyFileError(
                f"the key file does not open {where}: the store was created with another key. "
                "Use the key file the store was created with (encryption.key_file)"
            ) from None
        return cls(data_key=keys[:KEY_BYTES], id_key=keys[KEY_BYTES:])


class Sealer:
    """Seal and open objects: AES-256-GCM with the object's identity as associated data.

    Binding the identity (blob id, record key, …) into the authentication tag
    means a blob moved to another id, or a record swapped for another, fails to
    open instead of returning the wrong plaintext.
    """

    def __init__(self, data_key: bytes | None) -> None:
        self._aead = AESGCM(data_key) if data_key is not None else None

    @property
    def overhead(self) -> int:
        return NONCE_BYTES + 16 if self._aead is not None else CHECKSUM_BYTES

    def seal(self, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        if self._aead is None:
            return blake3.blake3(aad + bytes(plaintext)).digest(CHECKSUM_BYTES) + bytes(plaintext)
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes | memoryview, aad: bytes, *, what: str) -> bytes:
        """Authenticate and decrypt; ``what`` names the object in the error."""
        sealed = bytes(sealed)
        if self._aead is None:
            body = sealed[CHECKSUM_BYTES:]
            if blake3.blake3(aad + body).digest(CHECKSUM_BYTES) != sealed[:CHECKSUM_BYTES]:
                raise IntegrityError(f"{what} is corrupt: checksum mismatch")
            return body
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except InvalidTag:
            raise IntegrityError(f"{what} is corrupt or was tampered with: authentication failed") from None


class BlobHasher:
    """Keyed BLAKE3 blob ids (32 bytes)."""

    def __init__(self, id_key: bytes) -> None:
        self._key = id_key

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._key).digest()
