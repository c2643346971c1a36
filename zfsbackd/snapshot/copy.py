"""No snapshot at all: read the live files, for file systems that cannot snapshot.

Only used when the administrator sets ``allow_copy_snapshots: true``. Files are read
as they are; :meth:`FrozenFile.changed` compares the file's (size, mtime, ctime)
before and after reading, so the archiver can flag files that moved under it.
"""

from __future__ import annotations

from zfsbackd.snapshot.base import (
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
    snapshot_name,
    source_dir,
)


class CopySnapshot(Snapshot):
    provider = "copy"
    atomic = False

    def open_file(self, relpath: bytes) -> FrozenFile:
        fd, st = self._open_regular(relpath)
        return FrozenFile(fd, st, live=True)


class CopyProvider(SnapshotProvider):
    """Works on any file system; whether it *may* be used is decided by ``choose_provider``."""

    name = "copy"

    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        return CopySnapshot(snapshot_name(backup_id), source_dir(fs))

    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        """Nothing to find: the "snapshot" is the live tree, taken anew (with its hooks) on every attempt."""
        return None
