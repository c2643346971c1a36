"""Pick the strongest snapshot a source directory supports, or say clearly why there is none."""

from __future__ import annotations

import os
from pathlib import Path

from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot.base import (
    BTRFS_MAGIC,
    BTRFS_SUBVOLUME_INO,
    FileSystemSource,
    SnapshotProvider,
    fs_type,
    source_dir,
)
from zfsbackd.snapshot.btrfs import BtrfsProvider
from zfsbackd.snapshot.copy import CopyProvider
from zfsbackd.snapshot.reflink import ReflinkProvider, reflink_problem
from zfsbackd.snapshot.zfs import ZfsProvider


def choose_provider(fs: FileSystemSource, state_dir: Path | None = None) -> SnapshotProvider:
    """ZFS dataset → ZFS snapshot; btrfs subvolume → atomic snapshot; XFS/btrfs with reflink → per-file clones;
    anything else → plain copy, but only if the configuration allows it explicitly,
    because such a backup is not point-in-time. ``state_dir`` holds what a provider keeps
    between backups (ZFS: the object maps of its send-stream change lists).
    """
    if fs.source_zfs is not None:
        return ZfsProvider(state_dir)
    src = source_dir(fs)
    if fs_type(src) == BTRFS_MAGIC and os.stat(src).st_ino == BTRFS_SUBVOLUME_INO:
        return BtrfsProvider()
    problem = reflink_problem(src, fs_id=fs.id)
    if problem is None:
        return ReflinkProvider()
    if fs.allow_copy_snapshots:
        return CopyProvider()
    raise SnapshotError(
        f"file_systems[{fs.id}]: cannot snapshot {src}: it is on {problem}, which has no snapshots "
        "zfsbackd can use. Put it on btrfs (a subvolume) or XFS with reflink=1, use a ZFS dataset, "
        "or set allow_copy_snapshots: true on this file system to back it up without a snapshot"
    )
