"""ZFS snapshots through libzfs_core, and the incremental send stream to know what changed.

A backup of dataset ``pool/fs`` takes ``pool/fs@zfsbackd-<backup id>`` (one
atomic ``lzc_snapshot``; with ``recursive: true`` the children too, in the same
call), marked ours with the user property ``zfsbackd:backup-id``, and holds it
(tag ``zfsbackd``) while it is read through ``<mountpoint>/.zfs/snapshot/<name>``
(which works with ``snapdir=hidden`` too).

When the backup is AVAILABLE its snapshot becomes the base of the next
incremental: the hold is released, a bookmark ``#zfsbackd-<backup id>`` is
made, and older snapshots of ours are destroyed — never anyone else's, and
never one that someone holds — with their transaction-group waits overlapping
(a channel program beside two concurrent calls; see ``ZfsSnapshot.commit``).
The next backup reads the incremental send stream from the base to its own
snapshot (:mod:`zfsbackd.zfs.sendstream`: changed object numbers and each
object's ctime) and turns it into paths with the object map
(:mod:`zfsbackd.snapshot.zfs_objmap`, kept from the directories every backup
archives); without a map (no ``state_dir``) it asks ``zfs diff``. It reads only
what changed. A missing base, a map not of the base, or a stream it does not
understand costs a full walk (metadata comparison against the parent backup),
never a wrong backup.

An encrypted dataset is read the same way while its key is loaded;
:mod:`zfsbackd.snapshot.zfs_encryption` records its encryption with the backup
and refuses one whose key is not loaded.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from zfsbackd import pools
from zfsbackd.errors import RestoreError, SnapshotError
from zfsbackd.snapshot import zfs_encryption
from zfsbackd.snapshot.base import (
    ArchivedDirectory,
    ChangeSet,
    FileSystemSource,
    FrozenFile,
    Snapshot,
    SnapshotProvider,
    snapshot_name,
)
from zfsbackd.snapshot.zfs_objmap import ObjectMap
from zfsbackd.store.tree import Node, node_name
from zfsbackd.zfs import command, sendstream, zap
from zfsbackd.zfs import libzfs_core as lzc
from zfsbackd.zfs.exceptions import (
    HoldExists,
    HoldFailure,
    HoldNotFound,
    HoldReleaseFailure,
    SnapshotDestructionFailure,
    ZFSError,
    ZFSInitializationFailed,
)
from zfsbackd.zfs.sendstream import ZplAttributes

log = structlog.get_logger(__name__)

HOLD_TAG = b"zfsbackd"
#: A change list with more paths than this is not worth it: the walk is cheaper than examining that
#: many names one by one (and the list stays bounded in memory).
MAX_CHANGED_PATHS = 500_000
#: regular files of one bonus layout stat'ed (at most) to decide whether the layout is trusted
LAYOUT_SAMPLES = 8
#: How long the walk waits for a send-stream change list before it starts without it. The stream
#: costs what changed (about 1 s for 600 changes among 50,000 files under emulation), so a walk
#: racing it only slows it down; past this, so much changed that walking meanwhile pays.
STREAM_HEAD_START = 30.0
#: A backup's commit as one ZFS channel program (one transaction group): argv.bookmarks maps each new
#: bookmark to its snapshot, argv.destroy names the older snapshots (keys; the values are true: channel
#: programs refuse uint64 arguments). Returns {name: errno} of what failed.
_COMMIT_PROGRAM = b"""
local argv = (...)["argv"]
local failed, held, older = {}, {}, {}
for bookmark, snapshot in pairs(argv["bookmarks"]) do
    local err = zfs.sync.bookmark(snapshot, bookmark)
    if err ~= 0 then failed[bookmark] = err end
end
for dataset, _ in pairs(argv["datasets"]) do
    for snapshot in zfs.list.snapshots(dataset) do
        local id, setpoint = zfs.get_prop(snapshot, argv["property"])
        if id ~= nil and setpoint == snapshot and snapshot ~= dataset .. "@" .. argv["keep"] then
            if zfs.get_prop(snapshot, "userrefs") > 0 then held[snapshot] = true else older[snapshot] = true end
        end
    end
end
for snapshot, _ in pairs(older) do
    local err = zfs.sync.destroy(snapshot)
    if err ~= 0 then failed[snapshot] = err end
end
return {failed = failed, held = held}
"""
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


def _map_rows(nodes: list[Node]) -> list[tuple[bytes, int, int]]:
    """(name, object, ctime) of each node, as the object map keeps them."""
    return [(node_name(n), int(n["inode"]), int(n.get("ctime_ns", -1))) for n in nodes]


def _changed_files(trusted: dict[int, ZplAttributes], batch: sendstream.ObjectBatch) -> dict[int, int]:
    """``ChangeSet.files`` of one batch: the size of each regular file with data records (changed for certain)
    whose attributes are trusted."""
    return {
        obj: attributes.size
        for obj, attributes in trusted.items()
        if obj in batch.data_objects and stat.S_ISREG(attributes.mode)
    }


def _changed_directories(trusted: dict[int, ZplAttributes], changed: Iterable[int]) -> dict[int, ZplAttributes]:
    """``ChangeSet.directories`` of one batch: the attributes of each changed directory whose layout is trusted,
    unless its owner is a FUID with a domain (a stat maps those to other ids)."""
    found = {}
    for obj in changed:
        attributes = trusted.get(obj)
        if attributes is not None and stat.S_ISDIR(attributes.mode) and (attributes.uid | attributes.gid) >> 32 == 0:
            found[obj] = attributes
    return found


def _directory_paths(names: dict[int, list[bytes]], batch: sendstream.ObjectBatch) -> dict[int, bytes]:
    """The map's path of each changed directory in *batch* (by its OBJECT record's mode; a directory has one
    name): where the archiver finds the old node of a directory moved to another parent."""
    attributes = batch.attributes
    return {
        obj: found[0]
        for obj, found in names.items()
        if len(found) == 1 and obj in attributes and stat.S_ISDIR(attributes[obj].mode)
    }


def _b(name: str) -> bytes:
    return name.encode()


def restore_properties(props: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Of a file system's ``(value, source)`` properties, those set on it (:func:`command.set_here`) that a
    restore to a new dataset should set again: :data:`RESTORE_PROPERTIES` and user properties not ours."""
    return {
        k: v
        for k, v in command.set_here(props).items()
        if k in RESTORE_PROPERTIES or (":" in k and not k.startswith("zfsbackd:"))
    }


def create_restore_target(
    dataset: str, props: dict[str, str], children: list[dict[str, Any]]
) -> tuple[Path, list[Path]]:
    """Create ``dataset`` (and a recursive backup's children below it) to restore into.

    Returns the new dataset's mount point and the children's mount points inside
    it. Children are created with their recorded properties, mounted where their
    files sit in the backup's tree; children that were not mounted when the
    backup was taken get ``canmount=off`` so they never cover restored files.
    """
    command.create(dataset, props)
    mnt = _mounted_at(dataset)
    mounts: list[Path] = []
    for child in children:
        name, path = f"{dataset}/{child['Dataset']}", child.get("Path")
        for what, value in (("dataset", child["Dataset"]), ("path", path or ".")):
            parts = value.split("/")
            if value.startswith("/") or ".." in parts or "" in parts:
                raise RestoreError(f"--target-dataset: the backup names a child {what} {value!r} outside {dataset}")
        child_props = {k: v for k, v in child.get("Properties", {}).items() if k != "readonly"}
        if path is None:
            child_props["canmount"] = "off"
        command.create(name, child_props)
        if path is None:
            continue
        want = mnt / path
        if command.mountpoint(name) != want:  # mounted elsewhere in the tree than its name suggests
            command.set_property(name, "mountpoint", str(want))
        mounts.append(_mounted_at(name))
    return mnt, mounts


def _mounted_at(dataset: str) -> Path:
    mnt = command.mountpoint(dataset)
    if mnt is None or not command.is_mounted(dataset):
        raise RestoreError(f"--target-dataset: {dataset} was created but is not mounted; mount it and retry")
    return mnt


def finish_restore_target(dataset: str, props: dict[str, str], children: list[dict[str, Any]]) -> None:
    """Properties that would have got in the restore's way (``readonly``), set once the data is in."""
    if props.get("readonly") == "on":
        command.set_property(dataset, "readonly", "on")
    for child in children:
        if child.get("Properties", {}).get("readonly") == "on":
            command.set_property(f"{dataset}/{child['Dataset']}", "readonly", "on")


@dataclass(frozen=True)
class Member:
    """One file system a backup reads, and where its files sit in the backup's tree."""

    dataset: str
    mountpoint: Path
    rel: bytes
    """Path below the backed-up dataset's root; ``b""`` for that dataset itself."""

    def snapshot_root(self, name: str) -> Path:
        return self.mountpoint / ".zfs" / "snapshot" / name


@dataclass(frozen=True)
class Layout:
    """What one configured ZFS source covers, checked once per backup."""

    dataset: str
    datasets: list[str]
    """Every file system snapshotted (children too when recursive; one atomic ``lzc_snapshot``)."""
    members: list[Member]
    """The mounted ones, read into one tree; the first is ``dataset`` itself."""
    encryption: dict[str, dict[str, str]] = field(default_factory=dict)
    """The recorded encryption properties of the encrypted ones (see :mod:`zfs_encryption`), by name."""
    properties: dict[str, dict[str, str]] = field(default_factory=dict)
    """Each one's :func:`restore_properties`, by name (recorded with the backup)."""

    def having(self, snapshot: str) -> Layout | None:
        """The part of this layout whose file systems have ``@snapshot`` (None without the top one).

        An interrupted backup resumes from its snapshot; children created since
        then are not in it (the next backup has them), and children destroyed
        since then took their snapshots with them.
        """
        present = [d for d in self.datasets if lzc.lzc_exists(_b(f"{d}@{snapshot}"))]
        if self.dataset not in present:
            return None
        members = [m for m in self.members if m.dataset in present]
        encryption = {d: e for d, e in self.encryption.items() if d in present}
        return Layout(self.dataset, present, members, encryption, {d: self.properties[d] for d in present})


class ZfsSnapshot(Snapshot):
    provider = "zfs"
    atomic = True
    parallel_walk = False  # the object map is kept from every directory_archived() of one process
    reuses_listings = False  # ... from every directory's entries (its change lists spare the walk instead)

    def __init__(self, fs_id: str, name: str, layout: Layout, objmap: ObjectMap | None = None) -> None:
        top, children = layout.members[0], layout.members[1:]
        super().__init__(name, top.snapshot_root(name), grafts={m.rel: m.snapshot_root(name) for m in children})
        self.fs_id = fs_id
        self.dataset = layout.dataset
        self.datasets = layout.datasets
        self.members = layout.members
        self.mountpoint = top.mountpoint
        self.encryption = layout.encryption
        self._properties = layout.properties
        self._objmap = objmap
        if objmap is not None:
            self.change_list_head_start = STREAM_HEAD_START
        self._by_rel = {m.rel: m for m in layout.members}
        self._map_complete = True
        """False once a directory could not be listed: its names in the map may then be stale."""
        self._map_of_parent = False
        """True once the map is known to describe the parent backup's snapshot (its rows are that backup's nodes)."""
        self._holding: Future[None] | None = None
        """The hold being placed (:meth:`hold`), until :meth:`held` has waited for it."""
        self._was_held = False
        self._layouts: dict[tuple[str, int], bool] = {}
        """(dataset, SA layout number) -> whether its bonus buffers are read (see :meth:`_layout_trusted`)."""

    def snapshots(self) -> list[bytes]:
        return [_b(f"{d}@{self.name}") for d in self.datasets]

    def open_file(self, relpath: bytes) -> FrozenFile:
        fd, st = self._open_regular(relpath)
        return FrozenFile(fd, st, live=False)

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {**super().describe(), "Dataset": self.dataset}
        if self.dataset in self.encryption:
            description["Encryption"] = self.encryption[self.dataset]
        if len(self.datasets) > 1:
            description["Children"] = self._children()
        return description

    def _children(self) -> list[dict[str, object]]:
        """Each child file system (parents first): its name below the dataset, where its files sit in the
        tree (None: not mounted, nothing read), its own properties — what a restore recreates — and, when
        it is encrypted, its encryption."""
        paths = {m.dataset: os.fsdecode(m.rel) for m in self.members}
        return [
            {
                "Dataset": child[len(self.dataset) + 1 :],
                "Path": paths.get(child),
                "Properties": self._properties[child],
                **({"Encryption": self.encryption[child]} if child in self.encryption else {}),
            }
            for child in self.datasets[1:]
        ]

    def source_properties(self) -> dict[str, str]:
        """The dataset's own properties a restore to a new dataset should set again."""
        return self._properties[self.dataset]

    # --------------------------------------------------------- change lists
    def changes_since(
        self, parent_snapshot: dict[str, object], stop: threading.Event | None = None
    ) -> ChangeSet | None:
        """What changed since the parent backup's snapshot: from the incremental send stream when
        the object map describes that snapshot; from ``zfs diff`` when there is no map at all
        (no ``state_dir``).

        None (the archiver then compares metadata with the parent backup, still reading only
        changed files) when a base snapshot is gone, when there is an object map but not of
        the base (the walk lists every directory, and so makes the map whole again), when too
        much changed, when the stream is not one the parser knows exactly (logged: the walk
        does not wait ``STREAM_HEAD_START`` for a ``zfs diff`` that may take longer than it),
        or when ``zfs diff`` meets a changed hard link (it names one link of an inode, not all
        of them; the map knows them all).
        """
        base = parent_snapshot.get("Name")
        if parent_snapshot.get("Provider") != "zfs" or not isinstance(base, str):
            return None
        if self._objmap is not None:
            if not self._objmap.describes(base):
                log.info("zfs_object_map_not_of_base", fs_id=self.fs_id, base=base, path=str(self._objmap.path))
                return None
            self._map_of_parent = True
            try:
                return self._stream_changes(base, stop)
            except sendstream.TooManyChanges as exc:
                log.info("zfs_change_list_too_long", fs_id=self.fs_id, reason=str(exc))
                return None
            except (sendstream.StreamFormatError, ZFSError, OSError) as exc:
                log.warning("zfs_send_stream_change_list_failed", fs_id=self.fs_id, error=str(exc))
                return None
        return self._diff_changes(base, stop)

    def _stream_changes(self, base: str, stop: threading.Event | None) -> ChangeSet | None:
        """The send stream of every member from its base (snapshot, else bookmark), through the object map."""
        assert self._objmap is not None
        paths: set[bytes] = set()
        # The objects that changed, for the archiver's listed directories (ChangeSet.objects): only for one
        # dataset (inode numbers are per dataset) and while they are not too many to hold.
        objects: set[int] | None = set() if len(self.members) == 1 else None
        directories: dict[int, zap.DirectoryBlock] = {}  # (one dataset's, as objects)
        directory_paths: dict[int, bytes] = {}  # (one dataset's, as objects)
        files: dict[int, int] = {}  # (one dataset's, as objects)
        changed_directories: dict[int, ZplAttributes] = {}  # (one dataset's, as objects)
        for member in self.members:
            origin = _b(f"{member.dataset}@{base}")
            if not lzc.lzc_exists(origin):
                origin = _b(f"{member.dataset}#{base}")
                if not lzc.lzc_exists(origin):
                    log.warning("zfs_base_snapshot_missing", fs_id=self.fs_id, snapshot=f"{member.dataset}@{base}")
                    return None
            graft = member.rel + b"/" if member.rel else b""
            root_object = os.stat(member.mountpoint).st_ino
            with sendstream.incremental_stream(_b(f"{member.dataset}@{self.name}"), origin, stop) as stream:
                for batch in stream.batches():
                    trusted = self._trusted_attributes(member, batch)
                    ctimes = {obj: a.ctime_ns for obj, a in trusted.items() if obj not in batch.data_objects}
                    found = self._objmap.changes(member.dataset, batch.objects, ctimes)
                    paths.update(graft + p for p in found.paths)
                    if objects is not None:
                        objects.update(found.objects)
                        directories.update(batch.directories)
                        directory_paths.update(_directory_paths(found.names, batch))
                        files.update(_changed_files(trusted, batch))
                        changed_directories.update(_changed_directories(trusted, found.objects))
                        if len(objects) > MAX_CHANGED_PATHS:
                            objects = None
                    if member.rel and root_object in batch.objects:
                        paths.add(member.rel)  # a child's root changed: its mount point node changes
                    if len(paths) > MAX_CHANGED_PATHS:
                        raise sendstream.TooManyChanges(f"more than {MAX_CHANGED_PATHS} changed paths")
            summary = stream.summary
            log.info(
                "zfs_change_list_from_send_stream",
                fs_id=self.fs_id,
                dataset=member.dataset,
                objects=summary.objects,
                changed_paths=len(paths),
                stream_bytes=summary.stream_bytes,
                records=summary.records,
                directory_blocks=len(directories),
                seconds=round(summary.seconds, 3),
            )
        listings = zap.StreamDirectories(directories) if objects is not None else None
        if objects is None:
            return ChangeSet.from_paths(paths)
        return ChangeSet.from_paths(paths, objects, listings, directory_paths, files, changed_directories)

    def _trusted_attributes(self, member: Member, batch: sendstream.ObjectBatch) -> dict[int, ZplAttributes]:
        """The attributes of the objects in *batch* whose bonus layout is trusted (:meth:`_layout_trusted`).

        A dnode block is sent whole when any of its 32 dnodes changed: comparing the ctime of each
        object whose dnode alone was sent with the map's tells the changed ones from their neighbours
        without a stat (each layout is judged once per batch, not once per object).
        """
        layouts = {attributes.layout for attributes in batch.attributes.values()}
        trusted = {layout for layout in layouts if self._layout_trusted(member, layout, batch)}
        return {obj: attributes for obj, attributes in batch.attributes.items() if attributes.layout in trusted}

    def _layout_trusted(self, member: Member, layout: int, batch: sendstream.ObjectBatch) -> bool:
        """Whether the bonus buffers of *layout* are in zfs_mknode's order: a regular file of that layout,
        found through the map, must have exactly the mode, size, owner, times and links its bonus says.
        Undecided (no such file in this batch) counts as no, until a later batch decides."""
        key = (member.dataset, layout)
        verdict = self._layouts.get(key)
        if verdict is None:
            verdict = self._check_layout(member, layout, batch)
            if verdict is None:
                return False
            self._layouts[key] = verdict
            if not verdict:
                log.warning("zfs_bonus_layout_not_trusted", fs_id=self.fs_id, dataset=member.dataset, layout=layout)
        return verdict

    def _check_layout(self, member: Member, layout: int, batch: sendstream.ObjectBatch) -> bool | None:
        assert self._objmap is not None
        root = member.snapshot_root(self.name)
        samples = [
            (obj, attributes)
            for obj, attributes in batch.attributes.items()
            if attributes.layout == layout and stat.S_ISREG(attributes.mode)
        ]
        for obj, attributes in samples[:LAYOUT_SAMPLES]:
            for rel in self._objmap.paths(member.dataset, [obj]):
                try:
                    st = os.lstat(root / os.fsdecode(rel))
                except OSError:
                    continue
                if st.st_ino == obj:
                    return attributes.matches(st)
        return None

    def _diff_changes(self, base: str, stop: threading.Event | None) -> ChangeSet | None:
        """``zfs diff`` of every member against the base snapshot, as one change set."""
        for member in self.members:
            if not lzc.lzc_exists(_b(f"{member.dataset}@{base}")):
                log.warning("zfs_base_snapshot_missing", fs_id=self.fs_id, snapshot=f"{member.dataset}@{base}")
                return None
        paths: set[bytes] = set()
        for member in self.members:
            changed = self._member_changes(member, base, stop)
            if changed is None:
                return None
            paths.update(changed)
        for rel in list(paths):  # a changed file with other hard links: its other names are unknown
            try:
                st = os.lstat(self.path(rel))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                log.info("zfs_diff_hardlinks_full_walk", fs_id=self.fs_id)
                return None
        return ChangeSet.from_paths(paths)

    def _member_changes(self, member: Member, base: str, stop: threading.Event | None) -> set[bytes] | None:
        """The paths (relative to the backup's root) ``zfs diff`` reports for one member."""
        mount = os.fsencode(member.mountpoint).rstrip(b"/")
        graft = member.rel + b"/" if member.rel else b""
        paths: set[bytes] = set()
        for entry in command.diff(f"{member.dataset}@{base}", f"{member.dataset}@{self.name}", stop):
            if entry.link_delta is not None and entry.file_type != "/":
                # A hard link came or went: the other names of that inode are not listed, so walk everything.
                log.info("zfs_diff_hardlinks_full_walk", fs_id=self.fs_id)
                return None
            for path in (entry.path, entry.new_path):
                if path is None:
                    continue
                if entry.in_xattr_dir:
                    path = path.split(b"/<xattrdir>", 1)[0]
                if path == mount:
                    if member.rel:
                        paths.add(member.rel)  # a child's root changed: its mount point node changes
                    continue  # the backup's root itself is always examined
                if not path.startswith(mount + b"/"):
                    log.warning("zfs_diff_outside_dataset", fs_id=self.fs_id, path=os.fsdecode(path))
                    return None
                paths.add(graft + path[len(mount) + 1 :])
        return paths

    def directory_archived(
        self, rel: bytes, node: Node | None, entries: ArchivedDirectory | None, as_before: bool
    ) -> None:
        """Keep the directory's names by object number (inode number = object number on ZFS), with their ctime.

        When the map is the parent backup's, it already has a row for every entry the archiver took
        as it was from the parent backup: only the entries made now are written and the names that
        went are removed (a directory archived as it was: nothing at all). Otherwise the directory's
        rows are replaced by all of its entries.
        """
        if self._objmap is None or (as_before and self._map_of_parent):
            return
        if entries is None:
            self._map_complete = False
            return
        prefix, _ = self.split(rel)
        member = self._by_rel[prefix]
        parent = 0 if rel == prefix or node is None else int(node["inode"])
        if self._map_of_parent and entries.previous is not None:
            self._objmap.changed(member.dataset, parent, _map_rows(entries.fresh), entries.removed())
        elif entries.complete:
            self._objmap.archived(member.dataset, parent, _map_rows(entries.nodes))
        else:  # (cannot be: a directory is not listed only with a change list, which needs the parent's map)
            self._map_complete = False

    # ------------------------------------------------------------ lifecycle
    def hold(self) -> None:
        """Hold the snapshots (tag ``zfsbackd``), so that nobody destroys them while they are read: on a thread
        of its own, so that the hold's transaction group (a few tenths of a second under emulation) is waited
        for beside the walk, not before it. :meth:`held` waits for it."""
        one = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zfsbackd-zfs-hold")
        self._holding = one.submit(self._place_hold)
        one.shutdown(wait=False)  # (the hold is still placed; the thread ends with it)

    def _place_hold(self) -> None:
        try:
            lzc.lzc_hold({snap: HOLD_TAG for snap in self.snapshots()})
        except HoldFailure as exc:
            if not all(isinstance(e, HoldExists) for e in exc.errors):
                raise SnapshotError(f"file_systems[{self.fs_id}]: cannot hold {self.name}: {exc}") from exc

    def held(self) -> bool:
        """Wait for :meth:`hold`; whether the hold is in place. One that failed is logged, not raised: the
        snapshot is read all the same (the hold only guards it; a snapshot destroyed meanwhile fails the
        reads, and so the backup, with their own errors)."""
        holding, self._holding = self._holding, None
        if holding is None:
            return self._was_held
        try:
            holding.result()
            self._was_held = True
        except (SnapshotError, ZFSError) as exc:
            log.warning("zfs_snapshot_not_held", fs_id=self.fs_id, snapshot=self.name, error=str(exc))
        return self._was_held

    def _release_hold(self) -> None:
        if not self.held():
            return  # (never placed: nothing to release)
        try:
            lzc.lzc_release({snap: [HOLD_TAG] for snap in self.snapshots()})
        except HoldReleaseFailure as exc:
            if not all(isinstance(e, HoldNotFound) for e in exc.errors):
                raise

    def close(self) -> None:
        """Interrupted: the snapshot stays (held) for the resumed run; what the walk told the object map does not."""
        self.held()
        if self._objmap is not None:
            self._objmap.rollback()
        super().close()

    def release(self) -> None:
        """The backup failed: drop the hold and destroy this snapshot."""
        super().release()
        self._release_hold()
        try:
            lzc.lzc_destroy_snaps(self.snapshots(), defer=False)
        except SnapshotDestructionFailure as exc:
            log.warning("zfs_snapshot_not_destroyed", fs_id=self.fs_id, snapshot=self.name, error=str(exc))

    def commit(self) -> None:
        """The backup is AVAILABLE: keep this snapshot (unheld) and a bookmark as the next base; drop older ones.

        Each of these changes waits for a transaction group to sync (about a second each under load,
        most of a no-change backup's time), and they used to wait one after the other. Now the
        bookmark and the destruction of the older snapshots are one channel program (one txg; ZFS has
        no channel-program call for holds or for destroying bookmarks), and the hold's release, the
        older bookmarks' destruction and the object map's commit (an SQLite transaction and checkpoint:
        a few tenths of a second with scattered churn) run beside it on their own threads: the waits
        overlap. The map names this snapshot, which stays whatever the others do.
        """
        super().close()
        old_bookmarks = [
            _b(f"{dataset}#") + name
            for dataset in self.datasets
            for name in lzc.lzc_get_bookmarks(_b(dataset))
            if name.startswith(b"zfsbackd-") and name != _b(self.name)
        ]
        bookmarks = {_b(f"{d}#{self.name}"): _b(f"{d}@{self.name}") for d in self.datasets}
        with ThreadPoolExecutor(max_workers=pools.ZFS_COMMIT_WORKERS, thread_name_prefix="zfsbackd-zfs-commit") as pool:
            side = [pool.submit(self._release_hold)]
            if self._objmap is not None:
                side.append(pool.submit(self._objmap.commit, self.name if self._map_complete else None))
            if old_bookmarks:
                side.append(pool.submit(lzc.lzc_destroy_bookmarks, old_bookmarks))
            self._bookmark_and_destroy(bookmarks)
            for future in side:
                future.result()

    def _older_snapshots(self) -> list[bytes]:
        """Our snapshots other than this one that nobody holds (a held one is someone's: it stays)."""
        older = []
        for dataset in self.datasets:
            for snap in command.list_snapshots(dataset):
                if snap.backup_id is None or snap.snapname == self.name:
                    continue  # not ours, or the new base
                if lzc.lzc_get_holds(_b(snap.name)):
                    self._kept_held(snap.name)
                    continue
                older.append(_b(snap.name))
        return older

    def _kept_held(self, snapshot: str) -> None:
        log.info("zfs_snapshot_kept_held", fs_id=self.fs_id, snapshot=snapshot)

    def _bookmark_and_destroy(self, bookmarks: dict[bytes, bytes]) -> None:
        """Make ``bookmarks`` (new -> snapshot) and destroy our older snapshots that nobody holds: in one
        channel program when the pool runs them (OpenZFS 2.0+), which finds those snapshots itself (ours:
        the backup-id property set on the snapshot itself, not inherited; not this backup's; ``userrefs``
        0), else one call after the other, with ``zfs get`` finding them. A failure is logged, never raised:
        bookmarks are a convenience (the snapshot is the next base) and a snapshot left over goes next time."""
        pool = _b(self.datasets[0].split("/", 1)[0])
        failed: dict[bytes, int] | None = None
        if lzc.is_supported(lzc.lzc_channel_program):
            params = {
                b"bookmarks": bookmarks,
                b"datasets": dict.fromkeys(map(_b, self.datasets), True),
                b"property": _b(command.BACKUP_ID_PROPERTY),
                b"keep": _b(self.name),
            }
            try:
                answer = lzc.lzc_channel_program(pool, _COMMIT_PROGRAM, params=params) or {}
                failed = {name: int(err) for name, err in (answer.get(b"failed") or {}).items()}
                for name in answer.get(b"held") or {}:
                    self._kept_held(name.decode(errors="replace"))
            except ZFSError as exc:  # e.g. a pool without zfs.sync.bookmark: the calls one by one
                log.info("zfs_commit_program_not_run", fs_id=self.fs_id, error=str(exc))
        if failed is None:
            failed = self._bookmark_and_destroy_one_by_one(bookmarks, self._older_snapshots())
        for name, err in failed.items():
            event = "zfs_bookmark_failed" if b"#" in name else "zfs_snapshot_not_destroyed"
            log.warning(event, fs_id=self.fs_id, name=name.decode(errors="replace"), error=os.strerror(err))

    @staticmethod
    def _bookmark_and_destroy_one_by_one(bookmarks: dict[bytes, bytes], snapshots: list[bytes]) -> dict[bytes, int]:
        failed: dict[bytes, int] = {}
        try:
            lzc.lzc_bookmark(bookmarks)
        except ZFSError as exc:
            failed.update(dict.fromkeys(bookmarks, exc.errno or 0))
        for name in snapshots:
            try:
                lzc.lzc_destroy_snaps([name], defer=False)
            except SnapshotDestructionFailure as exc:
                failed[name] = exc.errno or 0
        return failed


class ZfsProvider(SnapshotProvider):
    name = "zfs"

    def __init__(self, state_dir: Path | None = None) -> None:
        # find() then take() for one backup would run the same zfs/zpool commands twice.
        self._checked: dict[str, Layout] = {}
        self._state_dir = state_dir
        """Where each file system's object map lives (``zfs/<id>.objmap``); None: no map, ``zfs diff`` only."""

    def _objmap(self, fs: FileSystemSource) -> ObjectMap | None:
        return None if self._state_dir is None else ObjectMap(self._state_dir / "zfs" / f"{fs.id}.objmap")

    def _layout(self, fs: FileSystemSource) -> Layout:
        if fs.id not in self._checked:
            self._checked[fs.id] = self._check_layout(fs)
        return self._checked[fs.id]

    def _check_layout(self, fs: FileSystemSource) -> Layout:
        dataset = fs.source_zfs
        assert dataset is not None
        where = f"file_systems[{fs.id}].source.zfs"
        pool = dataset.split("/", 1)[0]
        recursive = bool(getattr(fs, "recursive", False))
        # A missing pool or dataset is reported as such (two ioctls: an imported pool's top dataset exists),
        # then one `zfs` process (its start-up costs a few tenths of a second under emulation) says the rest.
        try:
            pool_imported = lzc.lzc_exists(_b(pool))
        except ZFSInitializationFailed as exc:  # no ZFS on this host, or its module is not loaded
            raise SnapshotError(f"{where}: ZFS is not usable on this host: {exc.message}") from exc
        if not pool_imported:
            raise SnapshotError(f"{where}: pool {pool} is not imported; run `zpool import {pool}`")
        if not lzc.lzc_exists(_b(dataset)):
            raise SnapshotError(f"{where}: dataset {dataset} does not exist; create it or fix the name")
        mounts, every = command.mounts_and_properties(dataset, recursive=recursive)
        props = {name: {k: v for k, (v, _source) in values.items()} for name, values in every.items()}
        not_mounted = SnapshotError(
            f"{where}: dataset {dataset} is not mounted, so its snapshots cannot be read; "
            f"mount it (`zfs mount {dataset}`)"
        )
        zfs_encryption.check_keys_loaded(where, dataset, props, {m.name for m in mounts if m.mountpoint is not None})
        top = mounts[0].mountpoint
        if top is None:
            raise not_mounted
        members = [Member(dataset, top, b"")]
        for child in mounts[1:]:
            if child.mountpoint is None:
                # Its files cannot be read; whatever sits at its mount point belongs to the parent's walk.
                log.warning("zfs_child_not_mounted_skipped", fs_id=fs.id, dataset=child.name)
                continue
            if not child.mountpoint.is_relative_to(top) or child.mountpoint == top:
                raise SnapshotError(
                    f"{where}: child dataset {child.name} is mounted at {child.mountpoint}, outside "
                    f"{dataset}'s mount point {top}, so it has no place in this backup's tree; mount it "
                    f"below {top}, or back it up as a file system of its own (and set recursive: false)"
                )
            members.append(Member(child.name, child.mountpoint, os.fsencode(child.mountpoint.relative_to(top))))
        encryption = {m.name: e for m in mounts if (e := zfs_encryption.recorded_encryption(props.get(m.name, {})))}
        restore = {m.name: restore_properties(every[m.name]) for m in mounts}
        return Layout(dataset, [m.name for m in mounts], members, encryption, restore)

    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        layout = self._layout(fs)
        name = snapshot_name(backup_id)
        try:
            lzc.lzc_snapshot(
                [_b(f"{d}@{name}") for d in layout.datasets], {_b(command.BACKUP_ID_PROPERTY): _b(backup_id)}
            )
        except ZFSError as exc:
            raise SnapshotError(f"file_systems[{fs.id}]: cannot snapshot {layout.dataset}: {exc}") from exc
        snap = ZfsSnapshot(fs.id, name, layout, self._objmap(fs))
        snap.hold()
        return snap

    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        name = snapshot_name(backup_id)
        layout = self._layout(fs).having(name)
        if layout is None:
            return None
        snap = ZfsSnapshot(fs.id, name, layout, self._objmap(fs))
        snap.hold()
        return snap
