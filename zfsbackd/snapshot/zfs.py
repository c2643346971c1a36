"""ZFS snapshots through libzfs_core, and `zfs diff` to know what changed.

A backup of dataset ``pool/fs`` takes ``pool/fs@zfsbackd-<backup id>`` (one
atomic ``lzc_snapshot``; with ``recursive: true`` the children too, in the same
call), marked ours with the user property ``zfsbackd:backup-id``, and holds it
(tag ``zfsbackd``) while it is read through ``<mountpoint>/.zfs/snapshot/<name>``
(which works with ``snapdir=hidden`` too).

When the backup is AVAILABLE its snapshot becomes the base of the next
incremental: the hold is released, a bookmark ``#zfsbackd-<backup id>`` is
made, and older snapshots of ours are destroyed — never anyone else's, and
never one that someone holds. The next backup asks ``zfs diff`` between the
base and its own snapshot and reads only what changed. A missing base costs a
full walk (metadata comparison against the parent backup), never a wrong backup.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot.base import (
    ChangeSet,
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
    snapshot_name,
)
from zfsbackd.zfs import command
from zfsbackd.zfs import libzfs_core as lzc
from zfsbackd.zfs.exceptions import (
    HoldExists,
    HoldFailure,
    HoldNotFound,
    HoldReleaseFailure,
    SnapshotDestructionFailure,
    ZFSError,
)

log = structlog.get_logger(__name__)

HOLD_TAG = b"zfsbackd"
#: dataset properties a restore to a new dataset sets again (recorded with each backup)
RESTORE_PROPERTIES = (
    "recordsize",
    "compression",
    "atime",
    "relatime",
    "xattr",
    "acltype",
    "aclinherit",
    "aclmode",
    "dnodesize",
    "casesensitivity",
    "normalization",
    "utf8only",
    "checksum",
    "copies",
    "sync",
    "logbias",
    "primarycache",
    "secondarycache",
    "special_small_blocks",
    "exec",
    "setuid",
    "devices",
    "readonly",
    "snapdir",
    "quota",
    "refquota",
    "reservation",
    "refreservation",
)


def _b(name: str) -> bytes:
    return name.encode()


class ZfsSnapshot(Snapshot):
    provider = "zfs"
    atomic = True

    def __init__(self, fs_id: str, dataset: str, name: str, root: Path, datasets: list[str]) -> None:
        super().__init__(name, root)
        self.fs_id = fs_id
        self.dataset = dataset
        self.datasets = datasets  # the snapshotted datasets (children too when recursive)
        self.mountpoint = root.parent.parent.parent

    def snapshots(self) -> list[bytes]:
        return [_b(f"{d}@{self.name}") for d in self.datasets]

    def open_file(self, relpath: bytes) -> FrozenFile:
        fd, st = self._open_regular(relpath)
        return FrozenFile(fd, st, live=False)

    def describe(self) -> dict[str, str | bool]:
        return {**super().describe(), "Dataset": self.dataset}

    def source_properties(self) -> dict[str, str]:
        """The dataset's own properties a restore to a new dataset should set again."""
        props = command.get_properties(self.dataset, RESTORE_PROPERTIES)
        user = {
            k: v for k, v in command.get_properties(self.dataset).items() if ":" in k and not k.startswith("zfsbackd:")
        }
        return {**props, **user}

    # --------------------------------------------------------- change lists
    def changes_since(self, parent_snapshot: dict[str, object]) -> ChangeSet | None:
        base = parent_snapshot.get("Name")
        if parent_snapshot.get("Provider") != "zfs" or not isinstance(base, str):
            return None
        base_full = f"{self.dataset}@{base}"
        if not lzc.lzc_exists(_b(base_full)):
            log.warning("zfs_base_snapshot_missing", fs_id=self.fs_id, snapshot=base_full)
            return None  # the metadata comparison with the parent backup still avoids reading unchanged files
        if len(self.datasets) > 1:
            return None  # children are other file systems: their changes are not in this diff
        prefix = os.fsencode(self.mountpoint).rstrip(b"/") + b"/"
        paths: set[bytes] = set()
        for entry in command.diff(base_full, f"{self.dataset}@{self.name}"):
            if entry.link_delta is not None and entry.file_type != "/":
                # A hard link came or went: the other names of that inode are not listed, so walk everything.
                log.info("zfs_diff_hardlinks_full_walk", fs_id=self.fs_id)
                return None
            for path in (entry.path, entry.new_path):
                if path is None:
                    continue
                if entry.in_xattr_dir:
                    path = path.split(b"/<xattrdir>", 1)[0]
                if path == prefix.rstrip(b"/"):
                    continue  # the root itself is always examined
                if not path.startswith(prefix):
                    log.warning("zfs_diff_outside_dataset", fs_id=self.fs_id, path=os.fsdecode(path))
                    return None
                paths.add(path[len(prefix) :])
        for rel in list(paths):  # a changed file with other hard links: its other names are unknown
            try:
                st = os.lstat(os.path.join(os.fsencode(self.root), rel))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(os.fsencode(self.root), rel)):
                log.info("zfs_diff_hardlinks_full_walk", fs_id=self.fs_id)
                return None
        return ChangeSet.from_paths(paths)

    # ------------------------------------------------------------ lifecycle
    def hold(self) -> None:
        try:
            lzc.lzc_hold({snap: HOLD_TAG for snap in self.snapshots()})
        except HoldFailure as exc:
            if not all(isinstance(e, HoldExists) for e in exc.errors):
                raise SnapshotError(f"file_systems[{self.fs_id}]: cannot hold {self.name}: {exc}") from exc

    def _release_hold(self) -> None:
        try:
            lzc.lzc_release({snap: [HOLD_TAG] for snap in self.snapshots()})
        except HoldReleaseFailure as exc:
            if not all(isinstance(e, HoldNotFound) for e in exc.errors):
                raise

    def release(self) -> None:
        """The backup failed: drop the hold and destroy this snapshot."""
        super().release()
        self._release_hold()
        try:
            lzc.lzc_destroy_snaps(self.snapshots(), defer=False)
        except SnapshotDestructionFailure as exc:
            log.warning("zfs_snapshot_not_destroyed", fs_id=self.fs_id, snapshot=self.name, error=str(exc))

    def commit(self) -> None:
        """The backup is AVAILABLE: keep this snapshot (unheld) and a bookmark as the next base; prune older ones."""
        super().close()
        self._release_hold()
        try:
            lzc.lzc_bookmark({_b(f"{self.dataset}#{self.name}"): _b(f"{self.dataset}@{self.name}")})
        except ZFSError as exc:  # bookmarks are a convenience; the snapshot is what incrementals use
            log.warning("zfs_bookmark_failed", fs_id=self.fs_id, snapshot=self.name, error=str(exc))
        self._prune()

    def _prune(self) -> None:
        for dataset in self.datasets:
            for snap in command.list_snapshots(dataset):
                if snap.backup_id is None or snap.snapname == self.name:
                    continue  # not ours, or the new base
                name = _b(snap.name)
                if lzc.lzc_get_holds(name):
                    log.info("zfs_snapshot_kept_held", fs_id=self.fs_id, snapshot=snap.name)
                    continue
                try:
                    lzc.lzc_destroy_snaps([name], defer=False)
                except SnapshotDestructionFailure as exc:
                    log.warning("zfs_snapshot_not_destroyed", fs_id=self.fs_id, snapshot=snap.name, error=str(exc))
        bookmarks = lzc.lzc_get_bookmarks(_b(self.dataset))
        stale = [
            _b(f"{self.dataset}#") + name
            for name in bookmarks
            if name.startswith(b"zfsbackd-") and name != _b(self.name)
        ]
        if stale:
            lzc.lzc_destroy_bookmarks(stale)


class ZfsProvider(SnapshotProvider):
    name = "zfs"

    def __init__(self) -> None:
        # find() then take() for one backup would run the same zfs/zpool commands twice.
        self._checked: dict[str, tuple[str, Path, list[str]]] = {}

    def _datasets(self, fs: FileSystemSource) -> tuple[str, Path, list[str]]:
        if fs.id not in self._checked:
            self._checked[fs.id] = self._check_datasets(fs)
        return self._checked[fs.id]

    def _check_datasets(self, fs: FileSystemSource) -> tuple[str, Path, list[str]]:
        dataset = fs.source_zfs
        assert dataset is not None
        pool = dataset.split("/", 1)[0]
        if not command.pool_imported(pool):
            raise SnapshotError(
                f"file_systems[{fs.id}].source.zfs: pool {pool} is not imported; run `zpool import {pool}`"
            )
        if not lzc.lzc_exists(_b(dataset)):
            raise SnapshotError(
                f"file_systems[{fs.id}].source.zfs: dataset {dataset} does not exist; create it or fix the name"
            )
        mnt = command.mountpoint(dataset)
        if mnt is None or not command.is_mounted(dataset):
            raise SnapshotError(
                f"file_systems[{fs.id}].source.zfs: dataset {dataset} is not mounted, so its snapshots cannot be "
                f"read; mount it (`zfs mount {dataset}`)"
            )
        if not getattr(fs, "recursive", False):
            return dataset, mnt, [dataset]
        return dataset, mnt, [d.name for d in command.list_datasets(dataset, recursive=True) if d.type == "filesystem"]

    def _snapshot(self, fs: FileSystemSource, dataset: str, mnt: Path, datasets: list[str], name: str) -> ZfsSnapshot:
        root = mnt / ".zfs" / "snapshot" / name
        return ZfsSnapshot(fs.id, dataset, name, root, datasets)

    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        dataset, mnt, datasets = self._datasets(fs)
        name = snapshot_name(backup_id)
        try:
            lzc.lzc_snapshot([_b(f"{d}@{name}") for d in datasets], {_b(command.BACKUP_ID_PROPERTY): _b(backup_id)})
        except ZFSError as exc:
            raise SnapshotError(f"file_systems[{fs.id}]: cannot snapshot {dataset}: {exc}") from exc
        snap = self._snapshot(fs, dataset, mnt, datasets, name)
        snap.hold()
        return snap

    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        dataset, mnt, datasets = self._datasets(fs)
        name = snapshot_name(backup_id)
        if not lzc.lzc_exists(_b(f"{dataset}@{name}")):
            return None
        snap = self._snapshot(fs, dataset, mnt, datasets, name)
        snap.hold()
        return snap
