"""Snapshot providers: a point-in-time view of a file system for the archiver to read.

Use :func:`find_or_take_snapshot` (a backup's snapshot, hooks included when one is taken),
:func:`take_snapshot` (always a new one, between the hooks) or :func:`choose_provider` to pick one.
"""

from zfsbackd.snapshot.base import (
    FileChangedError,
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
)
from zfsbackd.snapshot.btrfs import BtrfsProvider
from zfsbackd.snapshot.copy import CopyProvider
from zfsbackd.snapshot.detect import choose_provider
from zfsbackd.snapshot.hooks import find_or_take_snapshot, run_hook, take_snapshot
from zfsbackd.snapshot.reflink import ReflinkProvider

__all__ = [
    "BtrfsProvider",
    "CopyProvider",
    "FileChangedError",
    "FileSystemSource",
    "FrozenFile",
    "ReflinkProvider",
    "Snapshot",
    "SnapshotProvider",
    "choose_provider",
    "find_or_take_snapshot",
    "run_hook",
    "take_snapshot",
]
