"""Encrypted datasets on real OpenZFS (issue 11, item 4): backed up with their key loaded and their
encryption recorded, refused clearly when a key is not loaded, and restored to a new dataset encrypted
with a new key, by inheritance from an encrypted parent, or unencrypted only when asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_zfs_provider_vm import _engine, _manifest, _mnt
from zfsvm_util import sh

from zfsbackd.engine.engine import BackupRequest
from zfsbackd.errors import KeyFileError, RestoreError, SnapshotError
from zfsbackd.snapshot.zfs_encryption import TargetEncryption
from zfsbackd.zfs import command
from zfsbackd.zfs.libzfs_core import lzc_exists

SHOWN = ("encryption", "keyformat", "keylocation", "encryptionroot")


def _key_file(tmp_path: Path, name: str, content: bytes) -> str:
    """A key file (mode 0600) as ZFS's ``file://`` key location."""
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    return f"file://{path}"


def _encrypted(dataset: str, location: str, key_format: str, *options: str) -> str:
    sh("zfs", "create", "-o", "encryption=on", "-o", f"keyformat={key_format}", "-o", f"keylocation={location}",
       *options, dataset)
    return dataset


def _fill(root: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "notes.txt").write_text("encrypted at rest\n")
    os.setxattr(root / "notes.txt", "user.color", b"blue")
    os.symlink("dir/data.bin", root / "link")


def _shown(dataset: str) -> dict[str, str]:
    return command.get_properties(dataset, SHOWN, sources=None)


def _reload_key(dataset: str, old_location: str) -> None:
    """Unload the key and load it again from the dataset's own keylocation; the old key does not open it."""
    sh("zfs", "unmount", dataset)
    sh("zfs", "unload-key", dataset)
    assert command.get_properties(dataset, ["keystatus"], sources=None) == {"keystatus": "unavailable"}
    wrong = subprocess.run(["zfs", "load-key", "-n", "-L", old_location, dataset], capture_output=True, check=False)
    assert wrong.returncode != 0, "the source's key opens the restored dataset"
    sh("zfs", "load-key", dataset)
    sh("zfs", "mount", dataset)


def test_raw_key_source_is_recorded_and_restores_with_a_new_key(dataset: str, tmp_path: Path) -> None:
    old = _key_file(tmp_path, "old.key", os.urandom(32))
    src = _encrypted(f"{dataset}/src", old, "raw")
    _fill(_mnt(src))
    engine = _engine(tmp_path, src)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    recorded = {"encryption": "aes-256-gcm", "keyformat": "raw", "pbkdf2iters": "0", "keylocation": old,
                "encryptionroot": src}
    assert record.snapshot["Encryption"] == recorded
    assert record.to_api()["Snapshot"]["Encryption"] == recorded, "describe-backups shows it"
    assert not {"zfs:encryption", "zfs:keyformat", "zfs:keylocation"} & set(record.properties), "not settable"

    new_key = _key_file(tmp_path, "new.key", os.urandom(32))
    new = f"{dataset}/new"
    result = engine.restore_backup(record.backup_id, None, target_dataset=new,
                                   encryption=TargetEncryption(key_location=new_key))
    shown = {"encryption": "aes-256-gcm", "keyformat": "raw", "keylocation": new_key, "encryptionroot": new}
    assert _shown(new) == shown
    assert result.encryption == {"Encryption": "aes-256-gcm", "KeyFormat": "raw", "KeyLocation": new_key,
                                 "EncryptionRoot": new}
    assert _manifest(_mnt(new)) == _manifest(_mnt(src))
    _reload_key(new, old)
    assert _manifest(_mnt(new)) == _manifest(_mnt(src))


def test_passphrase_source_with_children_restores_under_one_new_key(dataset: str, tmp_path: Path) -> None:
    old = _key_file(tmp_path, "old.pass", b"old passphrase of the source\n")
    src = _encrypted(f"{dataset}/src", old, "passphrase", "-o", "pbkdf2iters=100000")
    sh("zfs", "create", f"{src}/child")  # inherits src's encryption
    own_key = _key_file(tmp_path, "own.key", os.urandom(32))
    _encrypted(f"{src}/own", own_key, "raw")  # an encryption root of its own
    for root in (_mnt(src), _mnt(f"{src}/child"), _mnt(f"{src}/own")):
        _fill(root)
    engine = _engine(tmp_path, src, recursive=True)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    assert record.snapshot["Encryption"]["keyformat"] == "passphrase"
    assert record.snapshot["Encryption"]["pbkdf2iters"] == "100000"
    children = {c["Dataset"]: c["Encryption"] for c in record.snapshot["Children"]}
    assert children["child"]["encryptionroot"] == src and children["child"]["keylocation"] == "none"
    assert children["own"]["encryptionroot"] == f"{src}/own" and children["own"]["keyformat"] == "raw"

    new_pass = _key_file(tmp_path, "new.pass", b"a new passphrase for the restore\n")
    new = f"{dataset}/new"
    engine.restore_backup(record.backup_id, None, target_dataset=new, encryption=TargetEncryption(new_pass))
    assert _shown(new) == {"encryption": "aes-256-gcm", "keyformat": "passphrase", "keylocation": new_pass,
                           "encryptionroot": new}
    assert command.get_properties(new, ["pbkdf2iters"], sources=None) == {"pbkdf2iters": "100000"}
    for child in ("child", "own"):
        assert _shown(f"{new}/{child}")["encryptionroot"] == new, "children inherit the new dataset's encryption"
    assert _manifest(_mnt(new)) == _manifest(_mnt(src))


def test_restore_under_an_encrypted_parent_inherits_and_says_so(dataset: str, tmp_path: Path) -> None:
    src = _encrypted(f"{dataset}/src", _key_file(tmp_path, "src.key", os.urandom(32)), "raw")
    _fill(_mnt(src))
    vault = _encrypted(f"{dataset}/vault", _key_file(tmp_path, "vault.key", b"ab" * 32), "hex")
    engine = _engine(tmp_path, src)
    record = engine.create_backup(BackupRequest("fs-zfs"))

    result = engine.restore_backup(record.backup_id, None, target_dataset=f"{vault}/new")
    assert _shown(f"{vault}/new")["encryptionroot"] == vault
    assert result.encryption is not None and result.encryption["EncryptionRoot"] == vault
    assert f"inherits the encryption of its parent {vault}" in result.encryption["Note"]
    assert _manifest(_mnt(f"{vault}/new")) == _manifest(_mnt(src))


def test_an_encrypted_source_is_restored_unencrypted_only_on_purpose(dataset: str, tmp_path: Path) -> None:
    src = _encrypted(f"{dataset}/src", _key_file(tmp_path, "src.key", os.urandom(32)), "raw")
    _fill(_mnt(src))
    engine = _engine(tmp_path, src)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    new = f"{dataset}/new"

    with pytest.raises(RestoreError, match="--no-encryption") as refused:
        engine.restore_backup(record.backup_id, None, target_dataset=new)
    assert "--encryption-key-location file:///PATH" in refused.value.message
    short = _key_file(tmp_path, "short.key", os.urandom(16))
    with pytest.raises(KeyFileError, match="16 bytes long"):
        engine.restore_backup(record.backup_id, None, target_dataset=new, encryption=TargetEncryption(short))
    assert not lzc_exists(new.encode()), "nothing is created before the key is checked"
    assert not [n for n in sh("zfs", "list", "-H", "-o", "name", "-r", dataset).split() if "failed-restore" in n]

    result = engine.restore_backup(record.backup_id, None, target_dataset=new,
                                   encryption=TargetEncryption(no_encryption=True))
    assert _shown(new)["encryption"] == "off" and result.encryption == {"Encryption": "off"}
    assert _manifest(_mnt(new)) == _manifest(_mnt(src))


def test_an_unencrypted_source_restores_encrypted_with_a_key(dataset: str, tmp_path: Path) -> None:
    _fill(_mnt(dataset))
    engine = _engine(tmp_path, dataset)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    assert "Encryption" not in record.snapshot
    key = _key_file(tmp_path, "hex.key", b"0123456789abcdef" * 4 + b"\n")
    new = f"{dataset}-encrypted"
    engine.restore_backup(record.backup_id, None, target_dataset=new,
                          encryption=TargetEncryption(key, key_format="hex"))
    assert _shown(new) == {"encryption": "aes-256-gcm", "keyformat": "hex", "keylocation": key, "encryptionroot": new}
    assert _manifest(_mnt(new)) == _manifest(_mnt(dataset))


def test_a_key_not_loaded_at_backup_time_is_a_clear_error(dataset: str, tmp_path: Path) -> None:
    src = _encrypted(f"{dataset}/src", _key_file(tmp_path, "src.key", os.urandom(32)), "raw")
    own = _encrypted(f"{src}/own", _key_file(tmp_path, "own.key", os.urandom(32)), "raw")
    (_mnt(own) / "in-own.txt").write_text("child data\n")
    (_mnt(src) / "top.txt").write_text("top data\n")
    sh("zfs", "unmount", own)
    sh("zfs", "unload-key", own)
    engine = _engine(tmp_path, src, recursive=True)
    with pytest.raises(SnapshotError, match=rf"child dataset {own} is encrypted.*zfs load-key {own}.*canmount=off"):
        engine.create_backup(BackupRequest("fs-zfs"))

    sh("zfs", "set", "canmount=off", own)  # left out on purpose: the backup goes ahead without it
    record = engine.create_backup(BackupRequest("fs-zfs"))
    assert record.stats.files == 1

    sh("zfs", "unmount", src)
    sh("zfs", "unload-key", src)
    with pytest.raises(SnapshotError, match=rf"dataset {src} is encrypted and its key is not loaded.*load-key {src}"):
        engine.create_backup(BackupRequest("fs-zfs"))
