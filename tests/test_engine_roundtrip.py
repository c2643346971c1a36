"""Backup → restore round trips on real XFS and btrfs, incrementals, partial restores."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import assert_trees_identical, manifest_specials, populate_sample_tree, tree_manifest

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.snapshot import reflink
from zfsbackd.store.records import Lifecycle


def _only_restore_dir(target: Path) -> Path:
    (restored,) = [p for p in target.iterdir() if p.name.startswith("zfsbackd-restore_")]
    return restored


@pytest.mark.parametrize("fs_kind", ["xfs", "xfs-every-file-cloned", "btrfs"])
def test_round_trip_is_byte_and_metadata_identical(
    fs_kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of the sample tree comes back as it was; on XFS also when even the small ones are read
    from reflink clones (their extended attributes are the file's, read by path: a clone has none)."""
    if fs_kind == "xfs-every-file-cloned":
        monkeypatch.setattr(reflink, "DIRECT_READ_MAX", -1)
        fs_kind = "xfs"
    source: Path = request.getfixturevalue("xfs_dir" if fs_kind == "xfs" else "btrfs_subvol")
    populate_sample_tree(source)
    engine = Engine(make_config(tmp_path, {"src": source}))

    record = engine.create_backup(BackupRequest("fs-src", name="first"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.snapshot["Provider"] == ("reflink" if fs_kind == "xfs" else "btrfs")
    assert record.snapshot["Atomic"] is (fs_kind == "btrfs")
    assert record.stats.specials_skipped == len(manifest_specials(source)) > 0
    target = tmp_path / "restore"
    target.mkdir()
    result = engine.restore_backup(record.backup_id, target)
    restored = _only_restore_dir(target)
    assert result.path == restored
    assert_trees_identical(source, restored)
    # Sparse files come back sparse.
    sparse = [rel for rel, info in tree_manifest(restored).items() if info.get("allocated_blocks_lt_size")]
    assert sparse, "the sample tree has a sparse file; the restore must keep it sparse"
    assert engine.check(read_data=True).errors == []
    if fs_kind == "btrfs":  # the read-only snapshot is released after the backup
        assert not any((source.parent / ".zfsbackd-snapshots").rglob(f"zfsbackd-{record.backup_id}"))


def test_incremental_reads_and_uploads_only_what_changed(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    edited = xfs_dir / "edited.bin"
    edited.write_bytes(random.Random(5).randbytes(2_000_000))
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    first = engine.create_backup(BackupRequest("fs-src"))
    before = tree_manifest(xfs_dir)

    unchanged = engine.create_backup(BackupRequest("fs-src"))
    assert unchanged.stats.files_read == 0
    assert unchanged.stats.bytes_read == 0
    assert unchanged.stats.blobs_new == 0, "an unchanged tree must reuse every tree blob of its parent"
    assert unchanged.root_tree == first.root_tree

    new_file = xfs_dir / "new-dir" / "fresh.bin"
    new_file.parent.mkdir()
    new_file.write_bytes(random.Random(7).randbytes(300_000))
    with edited.open("r+b") as f:
        f.seek(10)
        f.write(b"CHANGED")
    changed = engine.create_backup(BackupRequest("fs-src"))

    assert changed.parent_backup_id == unchanged.backup_id
    assert changed.stats.files_read == 2
    assert changed.stats.bytes_read == new_file.stat().st_size + edited.stat().st_size
    # Only the new file, the edited chunk(s) and the changed directories travel.
    assert changed.stats.bytes_uploaded < 300_000 + 4 * 1024 * 1024 + 200_000
    assert changed.stats.files_unchanged == changed.stats.files - 2

    target = tmp_path / "restore"
    target.mkdir()
    old = engine.restore_backup(first.backup_id, target).path
    assert tree_manifest(old) == before
    shutil.rmtree(old)
    assert_trees_identical(xfs_dir, engine.restore_backup(changed.backup_id, target).path)


def test_partial_restore_of_files_and_directories(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    record = engine.create_backup(BackupRequest("fs-src"))
    dirs = sorted(p for p in xfs_dir.iterdir() if p.is_dir() and not p.is_symlink())
    files = sorted(p for p in xfs_dir.rglob("*") if p.is_file() and not p.is_symlink() and p.parent != xfs_dir)
    wanted_dir, wanted_file = dirs[0], files[-1]
    target = tmp_path / "restore"
    target.mkdir()

    rel_file = wanted_file.relative_to(xfs_dir)
    result = engine.restore_backup(
        record.backup_id, target, paths=[str(wanted_dir.relative_to(xfs_dir)), "/" + str(rel_file)]
    )

    assert_trees_identical(wanted_dir, result.path / wanted_dir.name)
    restored_file = result.path / rel_file
    assert restored_file.read_bytes() == wanted_file.read_bytes()
    assert restored_file.stat().st_mtime_ns == wanted_file.stat().st_mtime_ns
    top_level = {p.name for p in result.path.iterdir()}
    assert top_level == {wanted_dir.name, rel_file.parts[0]}


def test_unencrypted_store_round_trip(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "a.txt").write_text("plain\n" * 1000)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, encrypted=False))
    record = engine.create_backup(BackupRequest("fs-src"))
    target = tmp_path / "restore"
    target.mkdir()
    assert (engine.restore_backup(record.backup_id, target).path / "a.txt").read_text() == "plain\n" * 1000
    assert engine.check(read_data=True).errors == []


def test_encrypted_store_holds_no_plaintext(xfs_dir: Path, tmp_path: Path) -> None:
    secret = b"TOP-SECRET-MARKER-" * 50
    (xfs_dir / "secret-name-marker.txt").write_bytes(secret)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    engine.create_backup(BackupRequest("fs-src", name="nightly", tags={"owner": "alice-marker"}))
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for marker in (b"TOP-SECRET-MARKER", b"secret-name-marker", b"alice-marker"):
                assert marker not in data, f"{marker!r} readable in {path}"


def test_unchanged_backup_of_btrfs_subvolume_reads_nothing(btrfs_subvol: Path, tmp_path: Path) -> None:
    populate_sample_tree(btrfs_subvol, seed=3)
    engine = Engine(make_config(tmp_path, {"src": btrfs_subvol}))
    engine.create_backup(BackupRequest("fs-src"))
    (btrfs_subvol / "added.txt").write_text("x")
    again = engine.create_backup(BackupRequest("fs-src"))
    assert again.stats.files_read == 1
    assert again.stats.bytes_read == 1
    assert os.path.exists(btrfs_subvol / "added.txt")


def test_owner_and_mode_come_back_whether_or_not_a_file_is_created_with_them(xfs_dir: Path, tmp_path: Path) -> None:
    """Files are created with their permissions where that is safe and chown/chmod'ed only when they differ:
    every mix of owner, group and mode (umask-stripped, group-only, set-id) still comes back exactly."""
    cases = {  # name: (mode, uid, gid)
        "plain": (0o644, 0, 0),
        "group-writable": (0o664, 0, 0),  # the umask strips g+w at creation: chmod'ed after
        "other-group": (0o640, 0, 4242),  # created without group bits, then chown'ed and chmod'ed
        "other-owner": (0o600, 4242, 4242),
        "setuid-root": (0o4755, 0, 0),
        "setgid-other": (0o2750, 0, 4242),
        "no-access": (0o000, 0, 0),
    }
    old_umask = os.umask(0o022)
    try:
        for name, (mode, uid, gid) in cases.items():
            path = xfs_dir / name
            path.write_bytes(name.encode())
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
        record = engine.create_backup(BackupRequest("fs-src"))
        target = tmp_path / "restore"
        target.mkdir()
        restored = engine.restore_backup(record.backup_id, target).path
    finally:
        os.umask(old_umask)
    for name, (mode, uid, gid) in cases.items():
        st = os.lstat(restored / name)
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(mode), uid, gid), name
        assert (restored / name).read_bytes() == name.encode()
    assert_trees_identical(xfs_dir, restored)
