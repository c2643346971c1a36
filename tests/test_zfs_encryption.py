"""Encrypted ZFS datasets without ZFS (issue 11, item 4): the restore's key options and key files, what a
backup refuses when a key is not loaded, and that a key never shows in an error or in the output.

The same behaviour against real OpenZFS is tests/zfsvm/test_zfs_encryption_vm.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from enginekit import run_cli, write_config

from zfsbackd.errors import EXIT_BAD_REQUEST, BadRequest, KeyFileError, RestoreError, SnapshotError
from zfsbackd.snapshot import zfs_encryption
from zfsbackd.snapshot.zfs_encryption import TargetEncryption, check_key_file, check_keys_loaded, target_properties

SECRET = b"correct horse battery staple"
RAW_ENCRYPTION = {
    "encryption": "aes-256-gcm",
    "keyformat": "raw",
    "pbkdf2iters": "0",
    "keylocation": "file:///etc/zfs/keys/tank.key",
    "encryptionroot": "tank/data",
}


def _key(tmp_path: Path, content: bytes, mode: int = 0o600, name: str = "new.key") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(mode)
    return f"file://{path}"


@pytest.mark.parametrize(
    ("options", "target", "message"),
    [
        (TargetEncryption(no_encryption=True), None, "--target-dataset POOL/NAME"),
        (TargetEncryption(key_location="file:///k", no_encryption=True), "p/new", "cannot be combined"),
        (TargetEncryption(key_format="raw"), "p/new", "add --encryption-key-location"),
        (TargetEncryption(key_location="file:///k", key_format="base64"), "p/new", "raw, hex, passphrase"),
        (TargetEncryption(key_location="https://keys.example/k"), "p/new", "file:///PATH"),
        (TargetEncryption(key_location="prompt"), "p/new", "never prompts"),
        (TargetEncryption(key_location="file://k.key"), "p/new", "absolute path"),
    ],
)
def test_option_combinations_that_cannot_work_are_bad_requests(
    options: TargetEncryption, target: str | None, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        options.check(target)


def test_no_options_and_a_plain_key_file_pass_the_check() -> None:
    TargetEncryption().check(None)
    TargetEncryption(key_location="file:///etc/zfs/keys/new.key").check("p/new")
    TargetEncryption(key_location="file:///etc/zfs/keys/new.key", key_format="hex").check("p/new")


@pytest.mark.parametrize(
    ("content", "key_format"),
    [
        (os.urandom(32), "raw"),
        (b"ab" * 32 + b"\n", "hex"),
        (b"AB" * 32, "hex"),
        (SECRET + b"\n", "passphrase"),
        (b"x" * 512 + b"\nonly the first line counts\n", "passphrase"),
    ],
)
def test_key_files_zfs_takes_are_accepted(tmp_path: Path, content: bytes, key_format: str) -> None:
    check_key_file(_key(tmp_path, content), key_format)


@pytest.mark.parametrize(
    ("content", "key_format", "message"),
    [
        (os.urandom(31), "raw", "31 bytes long; a raw key is exactly 32"),
        (os.urandom(32) + b"\n", "raw", "33 bytes long"),
        (b"ab" * 31 + b"\n", "hex", "62 characters"),
        (b"zz" * 32, "hex", "not a hex digit"),
        (b"short\n", "passphrase", "5 bytes long; a passphrase is 8 to 512"),
        (b"x" * 513, "passphrase", "513 bytes long"),
        (b"", "passphrase", "0 bytes long"),
    ],
)
def test_key_files_zfs_would_refuse_are_refused_before_anything_is_created(
    tmp_path: Path, content: bytes, key_format: str, message: str
) -> None:
    location = _key(tmp_path, content)
    with pytest.raises(KeyFileError, match=message) as caught:
        check_key_file(location, key_format)
    assert location in caught.value.message


def test_missing_unreadable_or_exposed_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist; write the new dataset's key there first"):
        check_key_file(f"file://{tmp_path}/absent.key", "raw")
    with pytest.raises(KeyFileError, match="not a regular file"):
        check_key_file(f"file://{tmp_path}", "raw")
    with pytest.raises(KeyFileError, match=r"mode 0644, readable by group or others.*chmod 600"):
        check_key_file(_key(tmp_path, os.urandom(32), mode=0o644), "raw")
    (tmp_path / "link.key").symlink_to(tmp_path / "new.key")
    with pytest.raises(KeyFileError, match="is a symbolic link; give the file it points to"):
        check_key_file(f"file://{tmp_path}/link.key", "raw")


def test_a_key_never_appears_in_an_error(tmp_path: Path) -> None:
    for content, key_format in ((SECRET[:7], "passphrase"), (SECRET * 20, "passphrase"), (SECRET, "hex")):
        with pytest.raises(KeyFileError) as caught:
            check_key_file(_key(tmp_path, content), key_format)
        assert SECRET[:7].decode() not in str(caught.value)


class FakeZfs:
    """The parent dataset's encryption as ``zfs get`` would report it, for target_properties."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, parent: dict[str, str] | None) -> None:
        self.parent = parent
        monkeypatch.setattr(zfs_encryption.lzc, "lzc_exists", lambda name: parent is not None)
        monkeypatch.setattr(zfs_encryption.command, "get_properties", self.get_properties)

    def get_properties(self, dataset: str, names: Any = None, sources: Any = None) -> dict[str, str]:
        assert self.parent is not None
        return self.parent


UNENCRYPTED_PARENT = {"encryption": "off", "encryptionroot": "-", "keystatus": "-"}
ENCRYPTED_PARENT = {"encryption": "aes-256-gcm", "encryptionroot": "tank/secure", "keystatus": "available"}


def test_a_new_key_encrypts_the_new_dataset_like_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeZfs(monkeypatch, UNENCRYPTED_PARENT)
    location = _key(tmp_path, os.urandom(32))
    snapshot = {"Dataset": "tank/data", "Encryption": RAW_ENCRYPTION}
    props, note = target_properties(snapshot, "tank/restored", TargetEncryption(key_location=location))
    assert props == {"encryption": "aes-256-gcm", "keyformat": "raw", "keylocation": location} and note is None

    passphrase = {**RAW_ENCRYPTION, "keyformat": "passphrase", "pbkdf2iters": "500000"}
    location = _key(tmp_path, SECRET, name="pass.key")
    props, _ = target_properties(
        {"Dataset": "tank/data", "Encryption": passphrase}, "tank/restored", TargetEncryption(key_location=location)
    )
    assert props["keyformat"] == "passphrase" and props["pbkdf2iters"] == "500000"

    with pytest.raises(KeyFileError, match="not a raw key"):  # the source's format is the default
        target_properties(snapshot, "tank/restored", TargetEncryption(key_location=location))


def test_an_unencrypted_source_with_a_key_needs_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeZfs(monkeypatch, UNENCRYPTED_PARENT)
    location = _key(tmp_path, b"ab" * 32)
    with pytest.raises(BadRequest, match=re.escape("add --encryption-key-format raw|hex|passphrase")):
        target_properties({"Dataset": "tank/plain"}, "tank/new", TargetEncryption(key_location=location))
    props, _ = target_properties(
        {"Dataset": "tank/plain"}, "tank/new", TargetEncryption(key_location=location, key_format="hex")
    )
    assert props == {"encryption": "on", "keyformat": "hex", "keylocation": location}


def test_without_a_key_an_encrypted_parent_is_inherited_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeZfs(monkeypatch, ENCRYPTED_PARENT)
    snapshot = {"Dataset": "tank/data", "Encryption": RAW_ENCRYPTION}
    props, note = target_properties(snapshot, "tank/secure/new", TargetEncryption())
    assert props == {}
    assert note is not None and "inherits the encryption of its parent tank/secure" in note
    assert "zfs load-key tank/secure" in note

    FakeZfs(monkeypatch, {**ENCRYPTED_PARENT, "keystatus": "unavailable"})
    with pytest.raises(RestoreError, match=r"key is not loaded.*zfs load-key tank/secure"):
        target_properties({"Dataset": "tank/data"}, "tank/secure/new", TargetEncryption())


def test_an_encrypted_source_is_never_restored_unencrypted_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeZfs(monkeypatch, UNENCRYPTED_PARENT)
    for snapshot in (
        {"Dataset": "tank/data", "Encryption": RAW_ENCRYPTION},
        {"Dataset": "tank/data", "Children": [{"Dataset": "secret", "Encryption": RAW_ENCRYPTION}]},
    ):
        with pytest.raises(RestoreError) as caught:
            target_properties(snapshot, "tank/new", TargetEncryption())
        for option in ("--encryption-key-location file:///PATH", "--no-encryption", "below an encrypted dataset"):
            assert option in caught.value.message
    snapshot = {"Dataset": "tank/data", "Encryption": RAW_ENCRYPTION}
    unencrypted = target_properties(snapshot, "tank/new", TargetEncryption(no_encryption=True))
    assert unencrypted == ({"encryption": "off"}, None)
    assert target_properties({"Dataset": "tank/plain"}, "tank/new", TargetEncryption()) == ({}, None)
    FakeZfs(monkeypatch, None)  # no parent: `zfs create` names what is missing
    assert target_properties(snapshot, "nopool/new", TargetEncryption()) == ({}, None)


def _layout_props(keystatus: str, canmount: str = "on", mountpoint: str = "/tank/data/x") -> dict[str, str]:
    return {**RAW_ENCRYPTION, "keystatus": keystatus, "canmount": canmount, "mountpoint": mountpoint}


def test_a_source_whose_key_is_not_loaded_is_refused_naming_the_key() -> None:
    where = "file_systems[fs-data].source.zfs"
    with pytest.raises(SnapshotError, match=r"tank/data is encrypted and its key is not loaded.*load-key tank/data"):
        check_keys_loaded(where, "tank/data", {"tank/data": _layout_props("unavailable")}, set())
    children = {"tank/data": _layout_props("available"), "tank/data/x": _layout_props("unavailable")}
    with pytest.raises(SnapshotError, match=r"child dataset tank/data/x .*zfs load-key tank/data.*canmount=off"):
        check_keys_loaded(where, "tank/data", children, {"tank/data"})
    for skipped in (_layout_props("unavailable", canmount="off"), _layout_props("unavailable", mountpoint="none")):
        check_keys_loaded(where, "tank/data", {**children, "tank/data/x": skipped}, {"tank/data"})
    check_keys_loaded(where, "tank/data", {n: _layout_props("available") for n in children}, set(children))


def test_only_encrypted_file_systems_record_their_encryption() -> None:
    assert zfs_encryption.recorded_encryption({**RAW_ENCRYPTION, "keystatus": "available"}) == RAW_ENCRYPTION
    assert zfs_encryption.recorded_encryption({"encryption": "off", "keyformat": "none"}) is None


def test_cli_key_options_are_checked_before_anything_and_the_key_stays_secret(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f.txt").write_text("data")
    config = write_config(tmp_path, {"src": xfs_dir})
    backup = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.json["Backup"]["BackupId"]
    location = _key(tmp_path, SECRET)

    into_dir = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(tmp_path),
                       "--encryption-key-location", location)
    assert into_dir.returncode == EXIT_BAD_REQUEST and into_dir.error["Code"] == "BadRequest"
    assert "--target-dataset" in into_dir.error["Message"]

    wrong = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target-dataset", "tank/new",
                    "--encryption-key-location", location, "--encryption-key-format", "raw")
    assert wrong.returncode == EXIT_BAD_REQUEST and wrong.error["Code"] == "InvalidKeyFile"
    assert "28 bytes long; a raw key is exactly 32" in wrong.error["Message"]
    assert SECRET.decode() not in wrong.stdout + wrong.stderr

    both = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target-dataset", "tank/new",
                   "--no-encryption", "--encryption-key-format", "raw")
    assert both.returncode == EXIT_BAD_REQUEST and "cannot be combined" in both.error["Message"]
