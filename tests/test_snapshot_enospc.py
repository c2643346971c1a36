"""A source file system that is full: the snapshot fails with a SnapshotError that says so and how to fix it.

Real small loopback file systems, filled up. A btrfs snapshot itself still succeeds
on a full btrfs (it may dip into the global reserve), but creating the snapshot
directory does not; an XFS reflink snapshot fails its test clone. The message
``btrfs subvolume snapshot`` prints when it does fail is checked with a stand-in
for the command, since no fill level makes it fail reliably.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import LoopFs, btrfs_subvolume, make_loop_fs

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot import BtrfsProvider, reflink
from zfsbackd.snapshot.btrfs import SNAPSHOT_DIR
from zfsbackd.store.records import Lifecycle


def _loop_fs(kind: str, size_mib: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    if os.geteuid() != 0:
        pytest.skip("loop-mounted file systems need root")
    fs = make_loop_fs(kind, size_mib, tmp_path_factory.mktemp(f"full-{kind}") / "mnt")  # type: ignore[arg-type]
    try:
        yield fs
    finally:
        fs.cleanup()


@pytest.fixture
def small_xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    yield from _loop_fs("xfs", 300, tmp_path_factory)  # XFS's minimum size


@pytest.fixture
def small_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    yield from _loop_fs("btrfs", 128, tmp_path_factory)


def _fill(directory: Path) -> None:
    """Fill the file system holding *directory*: data first, then metadata (inodes with xattrs)."""
    meta = directory / "meta"
    meta.mkdir()
    subprocess.run(["dd", "if=/dev/zero", f"of={directory}/fill", "bs=1M"], capture_output=True, check=False)
    dir_fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY)
    value = b"v" * 3900
    try:
        for n in range(1_000_000):
            fd = os.open(str(n), os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
            try:
                for k in range(3):
                    os.setxattr(fd, f"user.fill{k}", value)
            finally:
                os.close(fd)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(dir_fd)
    os.sync()


def _assert_full_source_error(message: str, path: Path) -> None:
    assert "file_systems[fs-src]" in message
    assert str(path) in message
    assert "is full" in message and "free some space" in message


def _assert_backup_fails_clearly(engine: Engine, src: Path) -> None:
    """The backup fails with SnapshotFailed naming the full source, and its record says the same."""
    with pytest.raises(SnapshotError) as raised:
        engine.create_backup(BackupRequest("fs-src"))
    # Not a raw OSError (InternalError), and not a quiet fallback to a copy "snapshot" either.
    assert raised.value.code == "SnapshotFailed"
    _assert_full_source_error(raised.value.message, src)
    (record,) = engine.describe_backups().records
    assert record.lifecycle == Lifecycle.FAILED
    assert record.failure_message == raised.value.message


def test_full_xfs_fails_the_reflink_snapshot_clearly(small_xfs: LoopFs, tmp_path: Path) -> None:
    src = small_xfs.mountpoint / "src"
    src.mkdir()
    (src / "file").write_text("data")
    _fill(src)
    engine = Engine(make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True}))
    _assert_backup_fails_clearly(engine, src)


def test_full_btrfs_fails_the_btrfs_snapshot_clearly(small_btrfs: LoopFs, tmp_path: Path) -> None:
    src = btrfs_subvolume(small_btrfs.mountpoint / "src")
    (src / "file").write_text("data")
    _fill(src)
    engine = Engine(make_config(tmp_path, {"src": src}))
    _assert_backup_fails_clearly(engine, src)
    assert not (small_btrfs.mountpoint / SNAPSHOT_DIR / "fs-src").exists()


def test_btrfs_snapshot_command_out_of_space_is_explained(
    btrfs_subvol: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = subprocess.run

    def full(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if argv[:3] == ["btrfs", "subvolume", "snapshot"]:
            stderr = f"ERROR: cannot snapshot '{argv[-2]}': No space left on device\n"
            return subprocess.CompletedProcess(argv, 1, "", stderr)
        return real_run(argv, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr("zfsbackd.snapshot.btrfs.subprocess.run", full)
    engine = Engine(make_config(tmp_path, {"src": btrfs_subvol}))

    with pytest.raises(SnapshotError) as raised:
        engine.create_backup(BackupRequest("fs-src"))

    _assert_full_source_error(raised.value.message, btrfs_subvol)
    assert "No space left on device" in raised.value.message  # btrfs-progs' own words are kept
    assert BtrfsProvider().find(engine.config.file_system("fs-src"), "backup-x") is None  # type: ignore[arg-type]


def test_clone_that_finds_the_source_full_reads_the_file_live(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source filled up after the snapshot's test clone: the backup goes on, reading live."""
    big = xfs_dir / "big.bin"
    big.write_bytes(os.urandom(reflink.DIRECT_READ_MAX + 4096))
    real_ioctl = fcntl.ioctl

    def no_space(fd: int, request: int, arg: int = 0, *rest: object) -> object:
        if request == reflink.FICLONE and os.fstat(arg).st_ino == big.stat().st_ino:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_ioctl(fd, request, arg, *rest)  # type: ignore[call-overload]

    monkeypatch.setattr(reflink.fcntl, "ioctl", no_space)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.files_read == 1
    assert record.stats.entries_skipped_with_errors == 0
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(record.backup_id, target).path
    assert (restored / "big.bin").read_bytes() == big.read_bytes()


def test_read_only_source_names_the_unit_setting(small_xfs: LoopFs, tmp_path: Path) -> None:
    """EROFS on a reflink source (the systemd sandbox, or a read-only mount) says which setting to change."""
    src = small_xfs.mountpoint / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    subprocess.run(["mount", "-o", "remount,ro", str(small_xfs.mountpoint)], check=True)
    try:
        engine = Engine(make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True}))
        with pytest.raises(SnapshotError) as raised:
            engine.create_backup(BackupRequest("fs-src"))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_xfs.mountpoint)], check=True)
    message = raised.value.message
    assert raised.value.code == "SnapshotFailed"
    assert f"ReadWritePaths={src}" in message and "systemctl edit zfsbackd" in message, message
    (record,) = engine.describe_backups().records
    assert record.lifecycle == Lifecycle.FAILED
