"""Encrypted ZFS datasets: what a backup records of their encryption, the check that their keys are
loaded, and how ``restore-backup --target-dataset`` encrypts the new dataset.

zfsbackd reads files, not raw send streams: an encrypted dataset whose key is loaded is read through
``.zfs/snapshot`` like any other, and its backup is protected by the store's own encryption. What ZFS
encryption asks of zfsbackd is:

- each backup records the encryption of every encrypted file system it covers (``Snapshot.Encryption``,
  ``Snapshot.Children[].Encryption``) apart from the properties a restore sets again: ``encryption`` and
  ``keyformat`` can only be chosen when a dataset is created, and the key is the administrator's, so a
  restore needs them to know *that* the source was encrypted and how, not to copy them;
- a file system whose key is not loaded cannot be read, so the backup refuses it and says which key to
  load, instead of "not mounted" (the top) or silently leaving its files out (a child);
- a restore to a new dataset never quietly turns an encrypted source into an unencrypted dataset: the new
  key is given the way ``zfs create`` takes one (a key file and its format), and checked before anything
  is created, so that a typo costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zfsbackd.errors import BadRequest, KeyFileError, RestoreError, SnapshotError
from zfsbackd.store.crypto import read_private_file
from zfsbackd.zfs import command
from zfsbackd.zfs import libzfs_core as lzc

#: recorded for each encrypted file system of a backup (``zfs get`` names and ``-p`` values)
ENCRYPTION_PROPERTIES = ("encryption", "keyformat", "pbkdf2iters", "keylocation", "encryptionroot")
KEY_FORMATS = ("raw", "hex", "passphrase")
#: the key lengths libzfs accepts (lib/libzfs/libzfs_crypto.c): a raw key is the whole file, a hex key or
#: passphrase the file's first line without its newline
RAW_KEY_BYTES = 32
HEX_KEY_DIGITS = 64
PASSPHRASE_BYTES = (8, 512)
_KEY_FILE_SCHEME = "file://"
#: more than any valid key's first line: a longer one is refused without reading the rest
_KEY_READ_LIMIT = 4096
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def recorded_encryption(props: Mapping[str, str]) -> dict[str, str] | None:
    """The encryption properties a backup records for one file system; None when it is not encrypted."""
    if props.get("encryption", "off") in ("off", "-"):
        return None
    return {name: props[name] for name in ENCRYPTION_PROPERTIES if name in props}


def check_keys_loaded(where: str, dataset: str, props: Mapping[str, Mapping[str, str]], mounted: set[str]) -> None:
    """Refuse a source whose files cannot be read because an encryption key is not loaded.

    ``props`` holds the properties (``zfs get all``; ``keystatus``, ``encryptionroot``, ``canmount`` and
    ``mountpoint`` are looked at) of ``dataset`` and of those children the backup covers, ``mounted``
    the ones mounted now. A child that is not mounted only because its key is not
    loaded (``canmount=on`` with a mount point) would otherwise be skipped like a container dataset,
    and its files would be missing from the backup without an error.
    """
    for name, values in props.items():
        if values.get("keystatus") != "unavailable" or name in mounted:
            continue
        root = values.get("encryptionroot") or name
        load = f"load it with `zfs load-key {root}`, then mount it (`zfs mount {name}`)"
        if name == dataset:
            raise SnapshotError(
                f"{where}: dataset {dataset} is encrypted and its key is not loaded (keystatus=unavailable), "
                f"so its snapshots cannot be read; {load}"
            )
        if values.get("canmount") == "on" and values.get("mountpoint") not in ("none", "legacy"):
            raise SnapshotError(
                f"{where}: child dataset {name} is encrypted and its key is not loaded (keystatus=unavailable), "
                f"so its files would be missing from the backup; {load}, or leave it out of the backups on "
                f"purpose with `zfs set canmount=off {name}` (or back up {dataset} with recursive: false)"
            )


@dataclass(frozen=True)
class TargetEncryption:
    """How ``restore-backup --target-dataset`` encrypts the new dataset: the command line's options.

    With none of them, the new dataset is created the ZFS way: below an encrypted parent it inherits
    the parent's encryption; below an unencrypted one a backup of an encrypted source is refused,
    because creating it unencrypted must be asked for (``no_encryption``).
    """

    key_location: str | None = None
    """``--encryption-key-location``: ``file:///PATH`` of the new key (ZFS ``keylocation``)."""
    key_format: str | None = None
    """``--encryption-key-format``: raw, hex or passphrase; None: the source's recorded ``keyformat``."""
    no_encryption: bool = False
    """``--no-encryption``: create the new dataset unencrypted, whatever its source or parent."""

    @property
    def given(self) -> bool:
        return self.key_location is not None or self.key_format is not None or self.no_encryption

    def check(self, target_dataset: str | None) -> None:
        """Refuse what can never work (BadRequest), before the store is even read."""
        if not self.given:
            return
        if target_dataset is None:
            raise BadRequest(
                "--encryption-key-location, --encryption-key-format and --no-encryption apply to a restore to "
                "a new ZFS dataset (--target-dataset POOL/NAME); a restore into a directory (--target) writes "
                "into whatever file system holds it"
            )
        if self.no_encryption and (self.key_location is not None or self.key_format is not None):
            raise BadRequest(
                "--no-encryption creates the new dataset unencrypted; it cannot be combined with "
                "--encryption-key-location or --encryption-key-format: give one or the other"
            )
        if self.key_format is not None and self.key_format not in KEY_FORMATS:
            raise BadRequest(f"--encryption-key-format {self.key_format!r}: give one of {', '.join(KEY_FORMATS)}")
        if self.key_format is not None and self.key_location is None:
            raise BadRequest(
                "--encryption-key-format needs the key itself: add --encryption-key-location file:///PATH"
            )
        if self.key_location is not None:
            key_file_path(self.key_location)


def key_file_path(location: str) -> Path:
    """The path of a ``file:///PATH`` key location (BadRequest for anything else)."""
    where = f"--encryption-key-location {location}"
    if not location.startswith(_KEY_FILE_SCHEME):
        raise BadRequest(
            f"{where}: give a key file as file:///PATH. zfsbackd checks the key before it creates anything and "
            "never prompts, so `prompt` and https:// locations are not taken: put the key in a file (mode 0600) "
            "and, if ZFS should fetch it from elsewhere later, run `zfs set keylocation=URI DATASET` after the "
            "restore"
        )
    path = location[len(_KEY_FILE_SCHEME) :]
    if not path.startswith("/") or "\0" in path:
        raise BadRequest(f"{where}: file:// is followed by an absolute path, e.g. file:///etc/zfs/keys/restore.key")
    return Path(path)


def check_key_file(location: str, key_format: str) -> None:
    """Refuse (KeyFileError) a key file ZFS would refuse, or one others can read, before anything is created.

    Messages say what is wrong with the key (its length, a character that is not a hex digit), never
    what it holds.
    """
    path = key_file_path(location)
    where = f"--encryption-key-location {location}"
    missing = (
        f"write the new dataset's key there first (a raw key: `(umask 077; head -c {RAW_KEY_BYTES} /dev/urandom "
        f"> {path})`)"
    )
    material, size = read_private_file(path, where, missing, _KEY_READ_LIMIT)
    problem = key_problem(material, key_format, size)
    if problem is not None:
        raise KeyFileError(f"{where}: {path} is not a {key_format} key: {problem}")


def key_problem(material: bytes, key_format: str, size: int) -> str | None:
    """What ZFS would object to in a key file of ``size`` bytes that starts with ``material``; None if fine."""
    if key_format == "raw":
        if size != RAW_KEY_BYTES:
            return f"it is {size} bytes long; a raw key is exactly {RAW_KEY_BYTES} bytes (the whole file)"
        return None
    line = material.split(b"\n", 1)[0]  # ZFS reads one line and drops its newline
    if key_format == "hex":
        if len(line) != HEX_KEY_DIGITS:
            return f"its first line has {len(line)} characters; a hex key is exactly {HEX_KEY_DIGITS} hex digits"
        if not set(line) <= _HEX_DIGITS:
            return "its first line holds a character that is not a hex digit (0-9, a-f)"
        return None
    low, high = PASSPHRASE_BYTES
    if not low <= len(line) <= high:
        return f"its first line is {len(line)} bytes long; a passphrase is {low} to {high} bytes"
    return None


def _encrypted_datasets(snapshot: Mapping[str, Any]) -> list[str]:
    """The file systems of a backup that were encrypted (children by their name below the dataset)."""
    names = [str(snapshot.get("Dataset"))] if snapshot.get("Encryption") else []
    return names + [str(c.get("Dataset")) for c in snapshot.get("Children") or [] if c.get("Encryption")]


def target_properties(
    snapshot: Mapping[str, Any], dataset: str, options: TargetEncryption
) -> tuple[dict[str, str], str | None]:
    """The ``zfs create`` properties that encrypt (or not) the new ``dataset``, and a note for the output.

    ``snapshot`` is the backup's recorded source description. Everything is checked here, the key file
    too, so that the caller creates nothing when this raises. Children of a recursive backup are
    created below the new dataset without encryption properties: they inherit its encryption.
    """
    if options.no_encryption:
        return {"encryption": "off"}, None
    source: Mapping[str, str] = snapshot.get("Encryption") or {}
    if options.key_location is not None:
        key_format = options.key_format or source.get("keyformat")
        if key_format is None:
            raise BadRequest(
                f"--encryption-key-location: the backup's source {snapshot.get('Dataset')} was not encrypted, so "
                f"there is no key format to follow: add --encryption-key-format {'|'.join(KEY_FORMATS)}"
            )
        check_key_file(options.key_location, key_format)
        props = {
            "encryption": source.get("encryption", "on"),
            "keyformat": key_format,
            "keylocation": options.key_location,
        }
        if key_format == "passphrase" and source.get("keyformat") == "passphrase" and "pbkdf2iters" in source:
            props["pbkdf2iters"] = source["pbkdf2iters"]  # the administrator's choice of key stretching
        return props, None
    parent = dataset.rpartition("/")[0]
    if not parent or not lzc.lzc_exists(parent.encode()):
        return {}, None  # `zfs create` says what is missing (the parent, or its pool)
    parent_props = command.get_properties(parent, ("encryption", "encryptionroot", "keystatus"), sources=None)
    if recorded_encryption(parent_props) is not None:
        root = parent_props.get("encryptionroot") or parent
        if parent_props.get("keystatus") == "unavailable":
            raise RestoreError(
                f"--target-dataset {dataset}: its parent {parent} is encrypted and its key is not loaded, so "
                f"nothing can be created below it; load it (`zfs load-key {root}`), or give the new dataset a "
                "key of its own with --encryption-key-location file:///PATH"
            )
        return {}, (
            f"{dataset} inherits the encryption of its parent {parent} (encryption root {root}) and is unlocked "
            f"with that key (`zfs load-key {root}`); --encryption-key-location gives it a key of its own"
        )
    encrypted = _encrypted_datasets(snapshot)
    if encrypted:
        key_format = source.get("keyformat", "raw")
        raise RestoreError(
            f"--target-dataset {dataset}: the backup's source was encrypted ({', '.join(encrypted)}) and {parent} "
            f"is not, so {dataset} would be created unencrypted. Give it a key: --encryption-key-location "
            f"file:///PATH (a {key_format} key like the source's, or say which with --encryption-key-format), or "
            f"restore below an encrypted dataset (the new one inherits its encryption), or add --no-encryption "
            "to restore it unencrypted on purpose"
        )
    return {}, None


def describe_target(dataset: str, note: str | None) -> dict[str, str]:
    """The new dataset's encryption as ZFS reports it, for the restore's output (never the key itself)."""
    props = command.get_properties(dataset, ("encryption", "keyformat", "keylocation", "encryptionroot"), sources=None)
    out = {"Encryption": props.get("encryption", "off")}
    if recorded_encryption(props) is not None:
        out |= {
            "KeyFormat": props.get("keyformat", ""),
            "KeyLocation": props.get("keylocation", ""),
            "EncryptionRoot": props.get("encryptionroot", ""),
        }
    if note is not None:
        out["Note"] = note
    return out
