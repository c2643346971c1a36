"""Keys and authenticated encryption for everything a store holds.

A store has two random 256-bit keys, wrapped in its ``config`` object with a
key-encryption key derived (HKDF-SHA256) from the deployment's key file:

* the *data key* seals blobs, pack headers, indexes and records (AES-256-GCM);
* the *id key* makes blob ids keyed BLAKE3 hashes. It is shared by every region
  of a deployment, so ids stay comparable and copies send only missing blobs
  even when regions encrypt with different data keys.

The chunker's gear seed is wrapped with them. The wrapping AEAD also
authenticates every other field of ``config`` (associated data), so the
config cannot be downgraded to unencrypted or changed without the key file
noticing (zfsbackd/store/FORMAT.md). A whole config swapped in from another
store of the same key file is caught by the store id each host remembers per
region, and in any case by every object failing to open with its data key.

With ``encryption: {mode: none}`` nothing is encrypted, but every sealed
object still carries a BLAKE3 checksum so corruption is detected.
"""

from __future__ import annotations

import base64
import errno
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping
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


def read_private_file(path: Path, where: str, missing: str, limit: int = 4096) -> tuple[bytes, int]:
    """The first ``limit`` bytes of a file that holds a key, and its size.

    Refuses (KeyFileError, each message starting with ``where``, the option or
    config key) a file that is missing (``missing`` says how to make one), a
    symlink, not a regular file, or readable by group or others: whoever can
    read a key can read what it protects. Messages never quote the content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(f"{where}: {path} does not exist; {missing}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"{where}: {path} is a symbolic link; give the file it points to") from None
        raise KeyFileError(f"{where}: cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{where}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{where}: {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                f"group or others; refusing to use it. Run `chmod 600 {path}`"
            )
        return os.read(fd, limit), st.st_size
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_key_file(path: Path) -> bytes:
    """Read the key file, refusing one that others could read (it unlocks every backup)."""
    missing = f"create one with `zfsbackd key generate --key-file {path}` (and keep a copy somewhere safe)"
    material = read_private_file(path, "encryption.key_file", missing)[0].strip()
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


#: HKDF ``info`` of the key that wraps a format-2 store's secrets (salt: the store id).
WRAPPING_KEY_INFO = b"zfsbackd store config v2: key-encryption key"
#: HKDF ``info`` of the key check published in the config, so a wrong key file is told apart from tampering.
KEY_CHECK_INFO = b"zfsbackd store config v2: key check"
KEY_CHECK_BYTES = 16
#: Prefix of the associated data that binds the config's public fields to its wrapped secrets.
CONFIG_AAD_CONTEXT = b"zfsbackd store config v2\n"
#: Secret gear-table seeds are drawn from 63 bits (pyfastcdc takes a C long; 0 would mean "no seed").
CHUNKER_SEED_BITS = 63
ENCRYPTED_MODE = "aes-256-gcm"
UNENCRYPTED_MODE = "none"


def canonical_json(value: object) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces, ASCII), so a MAC over it is well defined."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def config_aad(public: Mapping[str, object]) -> bytes:
    """The associated data of a store config: every field except the wrapped secrets themselves.

    Binding *all* public fields (format, store id, creation time, mode,
    chunker sizes, and any field a later minor version adds) means none can
    be changed, added or removed without the key file noticing.
    """
    return CONFIG_AAD_CONTEXT + canonical_json(dict(public))


def derive_wrapping_key(material: bytes, store_id: str) -> bytes:
    """The key that seals a store's secrets: HKDF-SHA256 of the key file, salted with the store id."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=store_id.encode(), info=WRAPPING_KEY_INFO).derive(
        material
    )


def key_check(material: bytes) -> str:
    """A public fingerprint of the key file: an HKDF output independent of every key, so it reveals none.

    It does not depend on the store id, so that a changed store id is reported
    as tampering (the AEAD fails) rather than as a wrong key file.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_CHECK_BYTES, salt=None, info=KEY_CHECK_INFO)
    return hkdf.derive(material).hex()


def new_chunker_seed() -> int:
    seed = 0
    while seed == 0:
        seed = secrets.randbits(CHUNKER_SEED_BITS)
    return seed


def _hex_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise IntegrityError(f"{what} is not a hex string")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise IntegrityError(f"{what} is not a hex string") from None
    if len(key) != KEY_BYTES:
        raise IntegrityError(f"{what} has {len(key)} bytes instead of {KEY_BYTES}")
    return key


def _seed(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**CHUNKER_SEED_BITS:
        raise IntegrityError(f"{what} is not a number from 1 to 2^{CHUNKER_SEED_BITS}-1")
    return value


@dataclass(frozen=True)
class StoreKeys:
    """The secrets of one store; ``data_key`` is None for unencrypted stores.

    ``chunker_seed`` seeds the chunker's gear table. It is secret for the same
    reason as restic's chunker polynomial: with a public seed, the sizes of
    stored chunks would let anyone who can list the store test guesses about
    the content. In an unencrypted store nothing is secret, so it is stored in
    plain text there.
    """

    id_key: bytes
    data_key: bytes | None
    chunker_seed: int

    @classmethod
    def generate(cls, *, encrypted: bool, like: StoreKeys | None = None) -> StoreKeys:
        """New keys; ``like`` (the home region's) gives the id key and chunker seed of the deployment, so
        that the same data makes the same blobs in every region (copies and hosts homed elsewhere dedupe)."""
        return cls(
            id_key=like.id_key if like else secrets.token_bytes(KEY_BYTES),
            data_key=secrets.token_bytes(KEY_BYTES) if encrypted else None,
            chunker_seed=like.chunker_seed if like else new_chunker_seed(),
        )

    @property
    def mode(self) -> str:
        return UNENCRYPTED_MODE if self.data_key is None else ENCRYPTED_MODE

    def wrap(self, material: bytes | None, *, store_id: str, public: Mapping[str, object]) -> dict[str, str | int]:
        """The ``keys`` field of a store config whose other fields are ``public``.

        Encrypted: the secrets (data key, id key, chunker seed) sealed with
        AES-256-GCM under :func:`derive_wrapping_key`, with :func:`config_aad`
        of ``public`` as associated data, plus :func:`key_check`.
        Unencrypted: the id key and chunker seed in plain text (nothing is secret
        without a key file, and nothing can be authenticated either).
        """
        if self.data_key is None:
            return {"id_key": self.id_key.hex(), "chunker_seed": self.chunker_seed}
        assert material is not None, "an encrypted store needs the key file"
        secret = canonical_json(
            {"data_key": self.data_key.hex(), "id_key": self.id_key.hex(), "chunker_seed": self.chunker_seed}
        )
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(derive_wrapping_key(material, store_id)).encrypt(nonce, secret, config_aad(public))
        return {"check": key_check(material), "wrapped": base64.b64encode(nonce + sealed).decode()}

    @classmethod
    def unwrap(
        cls,
        wrapped: object,
        material: bytes | None,
        *,
        store_id: str,
        public: Mapping[str, object],
        where: str,
    ) -> StoreKeys:
        """Authenticate a store config and return its secrets; never trust a config the key cannot open.

        * ``public["encryption"]`` is ``none`` while a key file is configured:
          refused (IntegrityError). Otherwise anyone who can write the bucket
          could replace ``config`` with an unencrypted one and read every later
          backup.
        * encrypted, but no key file configured: KeyFileError.
        * the key check differs: the key file is not the one the store was
          created with (KeyFileError, exit 2).
        * the key check matches but the AEAD tag does not: a field was changed,
          added or removed after the store was created (IntegrityError, exit 6).
        """
        mode = public.get("encryption")
        fix_tampered = (
            "Someone who can write to the store may have replaced it: restore the `config` object from a copy "
            "of the store, and do not back up to it until then"
        )
        if mode == UNENCRYPTED_MODE:
            if material is not None:
                raise IntegrityError(
                    f"{where} is unencrypted (its `config` says encryption: none) but encryption.key_file is "
                    "configured, and a configured key never writes backups in plain text. If the store was "
                    "created unencrypted on purpose, set `encryption: {mode: none}` in the configuration. "
                    f"Otherwise its `config` object was replaced to downgrade it. {fix_tampered}"
                )
            if not isinstance(wrapped, Mapping) or set(wrapped) != {"id_key", "chunker_seed"}:
                raise IntegrityError(
                    f"{where}: its `config` object is corrupt: `keys` must hold exactly id_key and chunker_seed"
                )
            return cls(
                id_key=_hex_key(wrapped["id_key"], f"{where}: keys.id_key"),
                data_key=None,
                chunker_seed=_seed(wrapped["chunker_seed"], f"{where}: keys.chunker_seed"),
            )
        if mode != ENCRYPTED_MODE:
            raise IntegrityError(
                f"{where}: its `config` object is corrupt: unknown encryption mode {mode!r}. {fix_tampered}"
            )
        if material is None:
            raise KeyFileError(
                f"{where} is encrypted but the configuration has `encryption: {{mode: none}}`; "
                "set encryption.key_file to the key file the store was created with"
            )
        if (
            not isinstance(wrapped, Mapping)
            or set(wrapped) != {"check", "wrapped"}
            or not all(isinstance(v, str) for v in wrapped.values())
        ):
            raise IntegrityError(
                f"{where}: its `config` object is corrupt: `keys` must hold exactly check and wrapped. {fix_tampered}"
            )
        if not hmac.compare_digest(str(wrapped["check"]), key_check(material)):
            raise KeyFileError(
                f"the key file (encryption.key_file) does not open {where}: the store (id {store_id}) was created "
                "with another key. Use the key file the store was created with"
            )
        try:
            raw = base64.b64decode(str(wrapped["wrapped"]), validate=True)
            secret = AESGCM(derive_wrapping_key(material, store_id)).decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], config_aad(public)
            )
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"{where}: its `config` object failed authentication with the key file: a field (format, store "
                f"id, encryption, chunker, created, or one added) was changed after the store was created. "
                f"{fix_tampered}"
            ) from None
        try:
            fields = json.loads(secret)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise IntegrityError(f"{where}: the sealed keys in its `config` object are not a JSON object")
        return cls(
            data_key=_hex_key(fields.get("data_key"), f"{where}: sealed data_key"),
            id_key=_hex_key(fields.get("id_key"), f"{where}: sealed id_key"),
            chunker_seed=_seed(fields.get("chunker_seed"), f"{where}: sealed chunker_seed"),
        )


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
