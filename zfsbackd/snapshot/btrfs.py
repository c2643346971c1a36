"""Read-only btrfs subvolume snapshots: the whole tree, atomically.

Snapshots live at ``<mount point>/.zfsbackd-snapshots/<fs id>/zfsbackd-<backup id>``
(mode 0700, because a snapshot keeps copies of every file). When the source *is*
the mount point, that directory is inside the source, so every later snapshot
contains it again; its (st_dev, st_ino) as seen inside the snapshot goes into
``excluded`` so the archiver never backs up older snapshots.

What btrfs shows inside a snapshot (checked on a real file system): an ordinary
directory such as ``.zfsbackd-snapshots`` keeps its inode number and takes the
snapshot's st_dev; a nested subvolume (including our older snapshots) is *not*
part of the snapshot and appears as an empty directory with st_ino 2 and the file
system's superblock st_dev, which differs from the snapshot's own st_dev.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot.base import (
    BTRFS_MAGIC,
    BTRFS_SUBVOLUME_INO,
    NO_SPACE_ERRNOS,
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
    check_name,
    fs_type,
    fs_type_name,
    no_space_error,
    read_only_error,
    snapshot_name,
    source_dir,
)

SNAPSHOT_DIR = ".zfsbackd-snapshots"

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")
# How btrfs-progs reports ENOSPC / EDQUOT (strerror) on stderr.
_NO_SPACE_MESSAGES = ("No space left on device", "Disk quota exceeded")


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding *path* (an absolute, resolved path).

    Read from /proc/self/mountinfo because ``os.path.ismount`` is wrong on btrfs:
    every subvolume has its own st_dev, so it calls each subvolume a mount point.
    """
    target = os.fsencode(path)
    best = b"/"
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[4])
            # >= so that the last of several mounts stacked on one directory (the visible one) wins.
            if (target == mnt or target.startswith(mnt.rstrip(b"/") + b"/")) and len(mnt) >= len(best):
                best = mnt
    return Path(os.fsdecode(best))


def _btrfs(fs_id: str, *args: str | os.PathLike[str], full_path: Path | None = None) -> None:
    """Run ``btrfs ARGS``; a failure is a :class:`SnapshotError` with the command's stderr.

    With *full_path*, a failure because the file system is full or read-only (the unit's sandbox)
    says so and how to fix it (:func:`no_space_error`, :func:`read_only_error`) instead of showing
    only btrfs-progs' message.
    """
    argv = ["btrfs", *map(os.fspath, args)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    except FileNotFoundError:
        raise SnapshotError(f"file_systems[{fs_id}]: the btrfs command is not installed; install btrfs-progs") from None
    if proc.returncode != 0:
        if full_path is not None and any(m in proc.stderr for m in _NO_SPACE_MESSAGES):
            what = f"take the btrfs snapshot ({proc.stderr.strip()})"
            raise no_space_error(fs_id, full_path, what)
        if full_path is not None and os.strerror(errno.EROFS) in proc.stderr:
            # The snapshot directory already existed (so mkdir did not fail), the snapshot itself did.
            raise read_only_error(fs_id, full_path, f"take the btrfs snapshot ({proc.stderr.strip()})")
        raise SnapshotError(
            f"file_systems[{fs_id}]: `{' '.join(argv)}` failed with exit status {proc.returncode}: "
            f"{proc.stderr.strip()}"
        )


class BtrfsSnapshot(Snapshot):
    provider = "btrfs"
    atomic = True

    def __init__(self, fs_id: str, name: str, root: Path, excluded: frozenset[tuple[int, int]]) -> None:
        super().__init__(name, root, excluded)
        self.fs_id = fs_id

    def open_file(self, relpath: bytes) -> FrozenFile:
        fd, st = self._open_regular(relpath)
        return FrozenFile(fd, st, live=False)

    def release(self) -> None:
        super().release()
        if os.path.lexists(self.root):
            _btrfs(self.fs_id, "subvolume", "delete", self.root)


class BtrfsProvider(SnapshotProvider):
    name = "btrfs"

    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        src = _check_source(fs)
        mnt = mount_point(src)
        dst = _snapshot_path(fs, mnt, backup_id)
        if os.path.lexists(dst):
            raise SnapshotError(
                f"file_systems[{fs.id}]: snapshot {dst} already exists; resume that backup, or delete "
                f"the snapshot with `btrfs subvolume delete {dst}`"
            )
        try:
            for d in (dst.parent.parent, dst.parent):
                d.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise no_space_error(fs.id, src, f"create the snapshot directory {d}") from exc
            if exc.errno == errno.EROFS:
                raise read_only_error(fs.id, mnt, f"create the snapshot directory {d}") from exc
            raise SnapshotError(
                f"file_systems[{fs.id}]: cannot create the snapshot directory {d}: {exc.strerror}"
            ) from exc
        _btrfs(fs.id, "subvolume", "snapshot", "-r", src, dst, full_path=src)
        return BtrfsSnapshot(fs.id, dst.name, dst, _excluded(src, mnt, dst))

    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        src = _check_source(fs)
        mnt = mount_point(src)
        dst = _snapshot_path(fs, mnt, backup_id)
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            return None
        if st.st_ino != BTRFS_SUBVOLUME_INO:
            raise SnapshotError(
                f"file_systems[{fs.id}]: {dst} exists but is not a btrfs snapshot; move it out of the way"
            )
        return BtrfsSnapshot(fs.id, dst.name, dst, _excluded(src, mnt, dst))


def _check_source(fs: FileSystemSource) -> Path:
    src = source_dir(fs)
    ftype = fs_type(src)
    if ftype != BTRFS_MAGIC:
        raise SnapshotError(
            f"file_systems[{fs.id}]: {src} is on {fs_type_name(ftype)}, not btrfs, so it cannot have btrfs snapshots"
        )
    if os.stat(src).st_ino != BTRFS_SUBVOLUME_INO:
        raise SnapshotError(
            f"file_systems[{fs.id}]: {src} is a directory on btrfs but not a subvolume; make it one "
            "(`btrfs subvolume create`) to get atomic snapshots, or let zfsbackd use reflink clones"
        )
    return src


def _snapshot_path(fs: FileSystemSource, mnt: Path, backup_id: str) -> Path:
    return mnt / SNAPSHOT_DIR / check_name("file system id", fs.id) / snapshot_name(backup_id)


def _excluded(src: Path, mnt: Path, dst: Path) -> frozenset[tuple[int, int]]:
    """(dev, ino) of our snapshot directory inside the snapshot, if the snapshot contains it."""
    if src != mnt:
        return frozenset()
    try:
        st = os.lstat(dst / SNAPSHOT_DIR)
    except FileNotFoundError:
        return frozenset()
    return frozenset({(st.st_dev, st.st_ino)})
