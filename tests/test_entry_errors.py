"""One unreadable entry costs that entry, not the backup (``on_entry_error``).

Fault points are deterministic, never timing: we run as root, so ``chmod 000`` does
not make anything unreadable; instead :class:`Faults` wraps the few system calls the
archiver and the snapshot providers read the source with (``os.scandir``,
``os.readlink``, ``os.listxattr``, ``os.pread``, and ``open_beneath``, which every
provider's ``open_file`` goes through) so that they fail — or do something real, like
deleting the file — at exactly one path. A real EIO would need a device-mapper
``error`` target, which this test VM's kernel lacks; real unreadable entries are the
paths beyond PATH_MAX of tests/test_deep_tree.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from enginekit import make_config
from fsfixtures import assert_trees_identical, tree_manifest

from zfsbackd.config import load_config
from zfsbackd.engine import archiver
from zfsbackd.engine.archiver import SourceReadError
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import ConfigError, SnapshotError
from zfsbackd.snapshot import base as snapshot_base
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.records import BackupRecord, BackupStats, Lifecycle
from zfsbackd.store.writer import PackWriter


class Faults:
    """Deterministic fault points on the source reads of a backup, by real path (bytes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    @staticmethod
    def _raise(err: int, path: bytes | str) -> None:
        raise OSError(err, os.strerror(err), os.fsdecode(path))

    def fail_listing(self, path: Path, err: int) -> None:
        real = os.scandir
        target = os.fsencode(path)

        def scandir(p: Any = ".") -> Any:
            if isinstance(p, (bytes, str)) and os.fsencode(p) == target:
                self._raise(err, p)
            return real(p)

        self.mp.setattr(os, "scandir", scandir)

    def after_listing(self, path: Path, action: Callable[[], None]) -> None:
        """The first time *path* is listed, stat every entry, then run *action*: the tree changes under the walk."""
        real = os.scandir
        target = os.fsencode(path)
        done = False

        class Listed(list):  # type: ignore[type-arg]
            def __enter__(self) -> Listed:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

        def scandir(p: Any = ".") -> Any:
            nonlocal done
            if not done and isinstance(p, (bytes, str)) and os.fsencode(p) == target:
                done = True
                with real(p) as it:
                    entries = Listed(it)
                for entry in entries:
                    entry.stat(follow_symlinks=False)
                action()
                return entries
            return real(p)

        self.mp.setattr(os, "scandir", scandir)

    def _path_call(self, name: str, path: Path, err: int) -> None:
        """Calls of ``os.<name>`` on *path*, or on an fd of its inode (the archiver reads a live
        file's attributes through the fd it read the file with), fail with *err*."""
        real = getattr(os, name)
        target = os.fsencode(path)
        inode = path.lstat().st_ino

        def call(p: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(p, (bytes, str)) and os.fsencode(p) == target:
                self._raise(err, p)
            if isinstance(p, int) and os.fstat(p).st_ino == inode:
                self._raise(err, target)
            return real(p, *args, **kwargs)

        self.mp.setattr(os, name, call)

    def fail_readlink(self, path: Path, err: int) -> None:
        self._path_call("readlink", path, err)

    def fail_xattrs(self, path: Path, err: int) -> None:
        self._path_call("listxattr", path, err)

    def fail_read(self, path: Path, err: int) -> None:
        """Reads of *path*'s content fail. Matched by size (unique in the test trees): a big file is
        read from its reflink clone, another inode with no name."""
        real = os.pread
        size = path.stat().st_size

        def pread(fd: int, n: int, offset: int) -> bytes:
            if os.fstat(fd).st_size == size:
                self._raise(err, path)
            return real(fd, n, offset)

        self.mp.setattr(os, "pread", pread)

    def on_open(self, rel: bytes, action: Callable[[], None] | None = None, err: int | None = None) -> None:
        """Opening *rel* (relative to the snapshot root) runs *action* first, or fails with *err*."""
        real = snapshot_base.open_beneath

        def open_beneath(dir_fd: int, relpath: bytes) -> int:
            if relpath == rel:
                if err is not None:
                    self._raise(err, relpath)
                if action is not None:
                    action()
            return real(dir_fd, relpath)

        self.mp.setattr(snapshot_base, "open_beneath", open_beneath)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


def _tree(root: Path) -> None:
    """A small tree with one of each kind of entry the tests break."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a.txt").write_text("a" * 1000)
    (root / "dir" / "secret.txt").write_text("secret" * 100)
    (root / "dir" / "sub" / "deep.txt").write_text("deep")
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (root / "small.bin").write_bytes(os.urandom(5000))
    (root / "link").symlink_to("dir/a.txt")
    (root / "top.txt").write_text("top")


def _engine(tmp_path: Path, source: Path, on_entry_error: str | None = None) -> Engine:
    extra = {"on_entry_error": on_entry_error} if on_entry_error else None
    return Engine(make_config(tmp_path, {"src": source}, extra_fs=extra))


def _restore(engine: Engine, record: BackupRecord, tmp_path: Path) -> Path:
    target = tmp_path / f"restore-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    return engine.restore_backup(record.backup_id, target).path


def _assert_same_but_dir_mtime(source: Path, restored: Path) -> None:
    """The trees are identical, except the mtime of ``dir``, which changed after the walk had stat'ed it."""
    expected, got = tree_manifest(source), tree_manifest(restored)
    for manifest in (expected, got):
        manifest[b"dir"].pop("mtime_ns")
    assert got == expected


def _assert_skipped(record: BackupRecord, path: str, code: str, reason: str) -> None:
    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.entries_skipped_with_errors == 1
    assert record.stats.skipped_entries == [{"path": path, "errno": code, "reason": reason}]
    stats = record.to_api()["Stats"]
    assert stats["EntriesSkippedWithErrors"] == 1
    assert stats["SkippedEntries"] == [{"Path": path, "Errno": code, "Reason": reason}]


@pytest.mark.parametrize("fixture", ["xfs_dir", "btrfs_subvol"])
def test_unopenable_file_is_skipped_listed_and_logged(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path, faults: Faults
) -> None:
    source: Path = request.getfixturevalue(fixture)
    _tree(source)
    faults.on_open(b"dir/secret.txt", err=errno.EACCES)
    engine = _engine(tmp_path, source)

    with structlog.testing.capture_logs() as logs:
        record = engine.create_backup(BackupRequest("fs-src"))

    _assert_skipped(record, "dir/secret.txt", "EACCES", "open: Permission denied")
    (event,) = [e for e in logs if e["event"] == "entry_skipped"]
    assert event["log_level"] == "warning"
    assert (event["fs_id"], event["backup_id"]) == ("fs-src", record.backup_id)
    assert (event["path"], event["errno"]) == ("dir/secret.txt", "EACCES")
    # Everything else comes back identical.
    assert_trees_identical(source, _restore(engine, record, tmp_path), ignore={b"dir/secret.txt"})
    assert engine.check(read_data=True).errors == []


@pytest.mark.parametrize("name", ["small.bin", "big.bin"])
def test_read_error_in_a_file_skips_that_file(name: str, xfs_dir: Path, tmp_path: Path, faults: Faults) -> None:
    _tree(xfs_dir)
    faults.fail_read(xfs_dir / name, errno.EIO)
    engine = _engine(tmp_path, xfs_dir)

    record = engine.create_backup(BackupRequest("fs-src"))

    _assert_skipped(record, name, "EIO", "read: Input/output error")
    assert_trees_identical(xfs_dir, _restore(engine, record, tmp_path), ignore={name.encode()})


def test_unlistable_directory_is_skipped_with_its_subtree(xfs_dir: Path, tmp_path: Path, faults: Faults) -> None:
    _tree(xfs_dir)
    faults.fail_listing(xfs_dir / "dir", errno.EACCES)
    engine = _engine(tmp_path, xfs_dir)

    record = engine.create_backup(BackupRequest("fs-src"))

    _assert_skipped(record, "dir", "EACCES", "list the directory: Permission denied")
    restored = _restore(engine, record, tmp_path)
    assert not (restored / "dir").exists()
    assert_trees_identical(xfs_dir, restored, ignore={b"dir"})
    assert (record.stats.files, record.stats.symlinks) == (3, 1)


@pytest.mark.parametrize(
    ("rel", "break_it", "reason"),
    [
        ("link", "fail_readlink", "read the symlink: Input/output error"),
        ("top.txt", "fail_xattrs", "read the extended attributes: Input/output error"),
        ("dir", "fail_xattrs", "read the attributes: Input/output error"),
    ],
)
def test_unreadable_metadata_skips_the_entry(
    rel: str, break_it: str, reason: str, xfs_dir: Path, tmp_path: Path, faults: Faults
) -> None:
    _tree(xfs_dir)
    getattr(faults, break_it)(xfs_dir / rel, errno.EIO)
    engine = _engine(tmp_path, xfs_dir)

    record = engine.create_backup(BackupRequest("fs-src"))

    _assert_skipped(record, rel, "EIO", reason)
    assert_trees_identical(xfs_dir, _restore(engine, record, tmp_path), ignore={rel.encode()})


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_entries_that_vanish_mid_walk_are_counted_not_errors(
    policy: str, xfs_dir: Path, tmp_path: Path, faults: Faults
) -> None:
    """Real deletions between listing and reading: a file before its open, a directory before its
    listing, a symlink before its readlink. Even ``on_entry_error: fail`` backs the rest up."""
    _tree(xfs_dir)

    def remove_dir_and_link() -> None:
        shutil.rmtree(xfs_dir / "dir" / "sub")
        (xfs_dir / "link").unlink()

    # The root's entries are stat'ed as it is listed, so the link is gone by its readlink, not its stat.
    faults.after_listing(xfs_dir, lambda: None)
    faults.after_listing(xfs_dir / "dir", remove_dir_and_link)
    faults.on_open(b"dir/secret.txt", action=(xfs_dir / "dir" / "secret.txt").unlink)
    engine = _engine(tmp_path, xfs_dir, policy)

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.files_vanished == 3
    assert record.stats.entries_skipped_with_errors == 0 and record.stats.skipped_entries == []
    assert record.to_api()["Stats"]["FilesVanished"] == 3
    assert "SkippedEntries" not in record.to_api()["Stats"]
    _assert_same_but_dir_mtime(xfs_dir, _restore(engine, record, tmp_path))  # the source as it is now


def test_file_replaced_by_a_fifo_before_its_open_neither_hangs_nor_fails(
    xfs_dir: Path, tmp_path: Path, faults: Faults
) -> None:
    _tree(xfs_dir)
    victim = xfs_dir / "dir" / "a.txt"

    def swap() -> None:
        victim.unlink()
        os.mkfifo(victim)

    faults.on_open(b"dir/a.txt", action=swap)
    engine = _engine(tmp_path, xfs_dir, "fail")

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.files_vanished == 1
    restored = _restore(engine, record, tmp_path)
    assert not (restored / "dir" / "a.txt").exists()
    _assert_same_but_dir_mtime(xfs_dir, restored)  # FIFOs are never part of a backup


def test_on_entry_error_fail_fails_the_backup_naming_the_path(xfs_dir: Path, tmp_path: Path, faults: Faults) -> None:
    _tree(xfs_dir)
    faults.on_open(b"dir/secret.txt", err=errno.EACCES)
    engine = _engine(tmp_path, xfs_dir, "fail")

    with pytest.raises(SourceReadError) as raised:
        engine.create_backup(BackupRequest("fs-src"))

    error = raised.value
    assert isinstance(error, SnapshotError) and error.code == "SnapshotFailed" and error.exit_code == 2
    assert f"{xfs_dir}/dir/secret.txt: cannot open (EACCES: Permission denied)" in error.message
    assert "on_entry_error: skip" in error.message
    (record,) = engine.describe_backups(filters={"lifecycle": ["FAILED"]})[0]
    assert record.failure_message == error.message


def test_unreadable_root_fails_even_when_skipping(xfs_dir: Path, tmp_path: Path, faults: Faults) -> None:
    _tree(xfs_dir)
    faults.fail_listing(xfs_dir, errno.EIO)
    engine = _engine(tmp_path, xfs_dir, "skip")

    with pytest.raises(SourceReadError) as raised:
        engine.create_backup(BackupRequest("fs-src"))

    assert f"cannot read {xfs_dir}, the root of the snapshot (EIO" in raised.value.message
    (record,) = engine.describe_backups(filters={"lifecycle": ["FAILED"]})[0]
    assert record.lifecycle == Lifecycle.FAILED


def test_store_errors_are_never_mistaken_for_unreadable_entries(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file job meets an OSError from the store side (a full local disk): the backup fails."""
    _tree(xfs_dir)
    real_add = PackWriter.add

    def full_disk(self: PackWriter, blob_type: BlobType, plaintext: bytes | memoryview) -> tuple[bytes, bool]:
        if blob_type == BlobType.DATA:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/lib/zfsbackd/store")
        return real_add(self, blob_type, plaintext)

    monkeypatch.setattr(PackWriter, "add", full_disk)
    engine = _engine(tmp_path, xfs_dir)

    with pytest.raises(OSError, match="No space left"):
        engine.create_backup(BackupRequest("fs-src"))
    (record,) = engine.describe_backups(filters={"lifecycle": ["FAILED"]})[0]
    assert record.stats.entries_skipped_with_errors == 0


def test_skipped_list_keeps_the_first_hundred_and_counts_all(xfs_dir: Path, tmp_path: Path, faults: Faults) -> None:
    bad = [f"bad-{i:03d}" for i in range(archiver.SKIPPED_ENTRIES_KEPT + 5)]
    for name in bad:
        (xfs_dir / name).write_text(name)
    (xfs_dir / "good").write_text("good")
    real = snapshot_base.open_beneath

    def open_beneath(dir_fd: int, relpath: bytes) -> int:
        if relpath.startswith(b"bad-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fsdecode(relpath))
        return real(dir_fd, relpath)

    faults.mp.setattr(snapshot_base, "open_beneath", open_beneath)
    engine = _engine(tmp_path, xfs_dir)

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.entries_skipped_with_errors == len(bad)
    assert len(record.stats.skipped_entries) == archiver.SKIPPED_ENTRIES_KEPT
    assert {e["path"] for e in record.stats.skipped_entries} <= set(bad)
    assert record.stats.files == 1
    # The record, list included, survives the store: describe-backups shows it.
    assert engine.get_backup(record.backup_id).stats == record.stats


def test_records_without_the_new_fields_still_load() -> None:
    record = BackupRecord.from_json(
        b'{"backup_id":"backup-0123456789abcdef0","file_system_id":"fs-a","region":"local",'
        b'"backup_type":"AUTOMATIC","lifecycle":"AVAILABLE","creation_time":"2024-01-01T00:00:00.000000Z",'
        b'"stats":{"files":3,"bytes_read":10},"format":1}'
    )
    assert record.stats == BackupStats(files=3, bytes_read=10)
    assert record.stats.skipped_entries == [] and record.stats.files_vanished == 0
    assert record.to_api()["Stats"]["EntriesSkippedWithErrors"] == 0


# --------------------------------------------------------------------------- config


def _config_text(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "zfsbackd.yaml"
    path.write_text(
        "encryption: {mode: none}\n"
        "file_systems:\n"
        f"  - {{id: fs-a, source: {{path: /srv/a}}{value}}}\n"
    )
    return path


@pytest.mark.parametrize(("value", "expected"), [("", "skip"), (", on_entry_error: skip", "skip"),
                                                 (", on_entry_error: fail", "fail")])
def test_on_entry_error_parses_with_skip_as_default(value: str, expected: str, tmp_path: Path) -> None:
    assert load_config(_config_text(tmp_path, value)).file_system("fs-a").on_entry_error == expected


@pytest.mark.parametrize("bad", ["ignore", "true", "1"])
def test_bad_on_entry_error_is_named_with_its_key_path_and_fix(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_config_text(tmp_path, f", on_entry_error: {bad}"))
    (problem,) = raised.value.errors
    assert problem.startswith("file_systems[0].on_entry_error: got ")
    assert "use one of: skip, fail" in problem
