"""The archiver: walks a snapshot, stores what changed since the parent backup, returns the root tree.

Threading follows the machine's measured limits (DESIGN.md, "Performance
facts"): the walk and metadata comparison run on one thread (per-entry Python
work gets slower with more threads), while reading, chunking, hashing,
compressing, encrypting and uploading — native calls that release the GIL —
run on a small pool. A bounded number of file jobs is in flight, each reading
in bounded blocks, so memory stays bounded whatever the file sizes.

The walk is depth first with an explicit stack of directory frames, so no tree
is too deep for it. It reads the source by path (``Snapshot.path``; file
contents through ``Snapshot.open_file``, resolved beneath the snapshot root),
so an entry whose path is longer than PATH_MAX cannot be read: it is one more
unreadable entry. An unreadable entry (EACCES, EIO, ENAMETOOLONG, …) is skipped
with its subtree, counted and listed in the statistics, or fails the backup,
as the file system's ``on_entry_error`` says; one that vanished since it was
listed only counts as vanished. Only the snapshot's root must be readable.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import pyfastcdc
import structlog

from zfsbackd import faults, pools
from zfsbackd.engine.progress import Progress
from zfsbackd.engine.shards import ShardContext, ShardJob, ShardOutcome
from zfsbackd.engine.workers import CANCEL_POLL_SECONDS, WorkerPool, start_workers
from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot.base import ArchivedDirectory, ChangeSet, FileChangedError, PendingChanges, Snapshot
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.listingcache import ListingSummary, listing_digest
from zfsbackd.store.records import BackupStats
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import (
    READ_AHEAD_ENTRIES,
    ROOT_NAME,
    Node,
    TreeReadAhead,
    encode_name,
    encode_target,
    encode_xattrs,
    expected_entries,
    node_name,
    nodes_by_name,
    parse_tree,
    serialize_tree,
)
from zfsbackd.store.treebytes import TreeBytes
from zfsbackd.store.writer import PackWriter

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

READ_BLOCK = 8 * 1024 * 1024
READ_ATTEMPTS = 3
CHUNKS_AHEAD = 6  # chunks of one file in flight on the chunk pool (bounds memory: ~6 MiB average)
#: small files of one directory read by one read-pool job: a job per file cost more in futures,
#: semaphores and thread hand-offs (GIL and futex traffic) than reading a 4 KiB file does
FILES_PER_JOB = 64
#: ... or fewer, once their sizes add up to this: what a job holds in memory stays small, and a directory
#: of medium-sized files is still spread over the read threads
BYTES_PER_JOB = 1024 * 1024
#: Directories whose listing is done but whose files are still being read, at most (see ``Archiver._walk``),
#: and the entries they hold together.
UNFINISHED_DIRS = 64
UNFINISHED_ENTRIES = 50_000
# XFS shows POSIX ACLs twice: as system.posix_acl_* and as these trusted.* mirrors. Restoring
# the system.* names recreates them, and the mirrors would not apply on another file system.
XFS_ACL_MIRRORS = frozenset({"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"})
#: skipped entries whose path and reason the backup record keeps (all of them are counted and logged)
SKIPPED_ENTRIES_KEPT = 100
#: what an unreadable entry does to the backup (the file system's ``on_entry_error``)
EntryErrorPolicy = Literal["skip", "fail"]
ENTRY_ERROR_POLICIES: tuple[EntryErrorPolicy, ...] = ("skip", "fail")
# An entry that went away between being listed and being read: gone (ENOENT), a directory
# on its path replaced by a file (ENOTDIR) or by a symlink (ELOOP: files are opened
# following no symlinks). A live tree changing, not an error.
VANISHED_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


@dataclass
class _Totals:
    """Regular files, their bytes and directories below a directory; kept in its node as tree_*."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0

    def add_node(self, node: Node, sign: int = 1) -> None:
        kind = node.get("type")
        if kind == "file":
            self.files += sign
            self.bytes += sign * int(node.get("size", 0))
        elif kind == "dir":
            self.dirs += sign * (1 + int(node.get("tree_dirs", 0)))
            self.files += sign * int(node.get("tree_files", 0))
            self.bytes += sign * int(node.get("tree_bytes", 0))

    @classmethod
    def of_directory(cls, node: Node | None) -> _Totals | None:
        """What a directory node says is below it (None when it does not say: then count the entries)."""
        if node is None:
            return None
        values = (node.get("tree_files"), node.get("tree_bytes"), node.get("tree_dirs"))
        if not all(type(v) is int and v >= 0 for v in values):
            return None
        return cls(*values)  # type: ignore[arg-type]


class BackupCancelled(Exception):
    """The backup was asked to stop (SIGTERM, Ctrl-C); it will resume from its uploaded packs."""


class SourceReadError(SnapshotError):
    """Part of the snapshot could not be read: its root, or any entry under ``on_entry_error: fail``.

    A :class:`SnapshotError` (``SnapshotFailed``, exit 2): the source needs attention, not zfsbackd.
    """


class _EntryError(Exception):
    """An ``OSError`` while reading one entry of the source, with what was being done.

    Deliberately not an ``OSError``: only source reads are wrapped in it, so an error of the
    store met in between (a full local disk) can never pass for an unreadable file and be
    skipped — it still fails the backup.
    """

    def __init__(self, what: str, error: OSError) -> None:
        super().__init__(what, error)
        self.what = what
        self.error = error


@dataclass
class _FileOutcome:
    node: Node | None  # None: the file vanished, or could not be read (then ``problem`` says why)
    bytes_read: int = 0
    changed_while_read: bool = False
    problem: _EntryError | None = None
    small_data: bytes = b""  # a small file's content, stored by its job with the others (node has no chunks yet)


_FileJob = tuple[bytes, bytes]  # (path below the root, name) of a file to read


class _NamedEntry:
    """An entry of a directory the walk did not list, known by its name: stat'ed when asked, as a ``DirEntry``.

    The entries the walk looks at in a directory that a change list says holds the same names
    for the same objects as before (see :meth:`Archiver._frame_spliced`), and those of a directory
    whose listing came with the change list (``ChangeSet.listings``: with their inode numbers).
    """

    __slots__ = ("_inode", "_stat", "name", "path")

    def __init__(self, name: bytes, path: bytes, inode: int | None = None) -> None:
        self.name = name
        self.path = path
        self._inode = inode
        self._stat: os.stat_result | None = None

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        """The entry's own ``lstat`` (never followed: like the walk's ``DirEntry.stat(follow_symlinks=False)``)."""
        if self._stat is None:
            self._stat = os.lstat(self.path)
        return self._stat

    def inode(self) -> int:
        return self.stat().st_ino if self._inode is None else self._inode


#: an entry of a directory as the walk gets it: listed, or named by the change list
_Entry = os.DirEntry[bytes] | _NamedEntry


@dataclass(eq=False)
class _DirFrame:
    """A directory of the walk in progress: its entries, how far it got, and its node in its parent.

    The walk keeps these on an explicit stack instead of recursing, so a tree of any depth
    fits (recursion stopped at about 490 levels, two Python frames per level).
    """

    rel: bytes
    dev: int  # entries on another device are mount points
    previous: dict[bytes, Node]  # the parent backup's entries of this directory
    entries: list[_Entry]
    node: Node | None  # this directory's node, finished when its tree is written; None for the root
    position: int = 0  # entries[:position] are done or on the read pool
    nodes: list[Node] = field(default_factory=list)  # entries made now (new, changed, or with no parent node)
    kept: list[Node] = field(default_factory=list)  # entries taken as they were from ``previous``
    pending: list[tuple[Future[list[_FileOutcome]], list[_FileJob]]] = field(default_factory=list)  # read jobs
    tree_before: str | None = None  # the parent backup's tree of this directory, when it could be read
    node_before: Node | None = None  # the parent backup's node of this directory, if its metadata is unchanged
    batch: list[_FileJob] = field(default_factory=list)  # small files not yet given to the read pool
    batch_bytes: int = 0  # their sizes, as listed
    parent: _DirFrame | None = None  # the frame whose entry this directory is; None for the root
    same_object: bool = True  # the directory is the object the parent backup had under this name
    kept_totals: _Totals = field(default_factory=_Totals)  # what kept[:kept_counted] stand for
    kept_counted: int = 0
    #: subdirectories archived by worker processes: (result, the node sent, the parent backup's node)
    shards: list[tuple[Future[ShardOutcome], Node, Node | None]] = field(default_factory=list)
    open_children: int = 0  # subdirectories walked here and not finished yet
    listing: bytes | None = None  # the digest of the directory's listing (None: not made, see ``_listing_digest``)
    listed: int = 0  # entries it listed
    #: the parent backup's tree was made from this very listing: the entries that are not directories are
    #: this summary's (counted in ``kept_totals``, not in ``kept``), ``previous`` and ``entries`` its directories
    as_listed: ListingSummary | None = None
    #: with a change list (:meth:`Archiver._frame_spliced`): the parent backup's tree, whose nodes not named
    #: in ``previous`` (those of the changed names, parsed) are kept as they are, unparsed (counted in
    #: ``kept_totals``, not in ``kept``); the new tree is spliced from its bytes
    spliced: TreeBytes | None = None
    #: the directory's path in the parent backup when it is there under another one (it, or a directory above
    #: it, was renamed since: see :meth:`Archiver._moved_node`); None when it is ``rel``
    moved_from: bytes | None = None
    #: the parent backup's subdirectories of ``previous`` by inode, made when a new name needs them
    dirs_by_inode: dict[int, Node] | None = None

    @property
    def change_rel(self) -> bytes:
        """The path the change list knows this directory by: a send stream's object map names what
        changed by the paths of the parent backup's snapshot."""
        return self.rel if self.moved_from is None else self.moved_from

    def child_change_rel(self, name: bytes) -> bytes:
        """:attr:`change_rel` of the entry *name* (the parent backup's name of the object, when it was renamed)."""
        base = self.change_rel
        return base + b"/" + name if base else name


def _results_ready(frame: _DirFrame) -> bool:
    """Every file job and worker-process subdirectory of the directory has its result."""
    return all(future.done() for future, _jobs in frame.pending) and all(
        future.done() for future, _node, _before in frame.shards
    )


def _entries_as_before(frame: _DirFrame) -> bool:
    """Every entry of the directory is the parent backup's node, taken as it was."""
    return frame.tree_before is not None and not frame.nodes and len(frame.kept) == len(frame.previous)


@dataclass
class _Counters:
    stats: BackupStats = field(default_factory=BackupStats)

    def add_outcome(self, outcome: _FileOutcome) -> None:
        s = self.stats
        s.files_read += int(outcome.node is not None)
        s.bytes_read += outcome.bytes_read
        s.files_changed_while_read += int(outcome.changed_while_read)


def read_xattrs(path: bytes | int) -> list[tuple[str, bytes]]:
    """All extended attributes (POSIX ACLs included) of a path (not followed) or an open fd; empty
    where the file system has none."""
    follow = isinstance(path, int)  # an fd is the file itself; Python refuses follow_symlinks=False with one
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
            return []
        raise
    pairs = []
    for name in names:
        if name in XFS_ACL_MIRRORS:
            continue
        try:
            pairs.append((name, os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                raise
    return pairs


def data_segments(fd: int, size: int, blocks: int) -> list[tuple[int, int]]:
    """Byte ranges that hold data; holes of a sparse file are skipped (and restored as holes)."""
    if blocks * 512 >= size:
        return [(0, size)]
    segments = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end))
        offset = end
    return segments


def _meta_node(name: bytes, st: os.stat_result) -> Node:
    node: Node = encode_name(name)
    node.update(
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        inode=st.st_ino,
    )
    return node


#: what :func:`_meta_node` takes from a stat
_META_KEYS = ("mode", "uid", "gid", "mtime_ns", "ctime_ns", "inode")


def _node_as_before(name: bytes, before: Node) -> Node:
    """A directory's node made from its parent backup's node *before* (see :meth:`Archiver._as_before`):
    what :meth:`Archiver._dir_entry` makes from its stat when nothing of it changed."""
    node: Node = encode_name(name)
    node.update({key: before[key] for key in _META_KEYS})
    node.update(type="dir", xattrs=before.get("xattrs", []))
    return node


def _node_inode(node: Node) -> int | None:
    inode = node.get("inode")
    return inode if type(inode) is int else None


def _unchanged(previous: Node | None, node_type: str, st: os.stat_result) -> bool:
    """Whether the parent backup's node still describes the entry (runs once per entry: kept lean)."""
    return (
        previous is not None
        and previous.get("type") == node_type
        and previous.get("ctime_ns") == st.st_ctime_ns
        and previous.get("mtime_ns") == st.st_mtime_ns
        and previous.get("inode") == st.st_ino
        and (node_type != "file" or previous.get("size") == st.st_size)
    )


#: node types of entries whose content cannot change while their ctime and inode stay the same
_ENTRY_NAME = operator.attrgetter("name")
_ENTRY_INODE = operator.methodcaller("inode")
_NO_INODE = -1  # what a name that is not listed any more "has": never a node's inode
_SPECIAL_TYPES = {stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev"}


#: a directory of the parent backup as the walk gets it: the summary of its listing (when the listing
#: cache has one), else its tree's nodes by name, or None (no parent tree, or an unreadable one)
_ParentDir = ListingSummary | dict[bytes, Node] | None


def _subtrees(parent: _ParentDir, _arg: None) -> list[tuple[str, None, int]]:
    """A parent directory's subdirectories' trees, in the walk's order (by name, as trees store them)."""
    nodes = parent.dirs if isinstance(parent, ListingSummary) else (parent or {}).values()
    return [(n["subtree"], None, expected_entries(n)) for n in nodes if n.get("type") == "dir" and "subtree" in n]


def _tree_size(parent: _ParentDir) -> int:
    return len(parent.dirs) if isinstance(parent, ListingSummary) else len(parent or ())


def _raw_tree_size(raw: bytes) -> int:
    return TreeBytes(raw).count()


class Archiver:
    def __init__(
        self,
        store: Store,
        writer: PackWriter,
        snapshot: Snapshot,
        parent_root_tree: str | None,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        read_workers: int = pools.READ_WORKERS,
        max_jobs: int = 256,
        changes: ChangeSet | PendingChanges | None = None,
        on_entry_error: EntryErrorPolicy = "skip",
        fs_id: str = "",
        backup_id: str = "",
        read_ahead_entries: int = READ_AHEAD_ENTRIES,
        shards: ShardContext | None = None,
        processes: int | None = None,
        parallel_after_entries: int | None = None,
    ) -> None:
        """*on_entry_error*, *fs_id* and *backup_id* say what an unreadable entry does and where to report it.

        *read_ahead_entries* bounds the parent backup's tree entries read ahead of the walk
        and not yet used (:class:`~zfsbackd.store.tree.TreeReadAhead`).

        With *shards* (what worker processes need to open the store and the snapshot), *processes*
        processes (this one and workers) archive subdirectories once the walk has listed
        *parallel_after_entries* entries (both from zfsbackd.pools by default; see
        zfsbackd.engine.shards); without it, for a snapshot other processes cannot read, or with a
        change list, everything is archived here.
        """
        self.store = store
        self.writer = writer
        self.snapshot = snapshot
        self.root = os.fsencode(snapshot.root)
        self.excluded = snapshot.excluded
        self.grafts: dict[bytes, Path] = snapshot.grafts
        self.parent_root_tree = parent_root_tree
        self.changes = changes if isinstance(changes, ChangeSet) else None
        self._pending = changes if isinstance(changes, PendingChanges) else None
        self._give_up_after = 0  # files walked after which a pending change list is not waited for
        self.progress = progress or Progress()
        self.cancel = cancel or threading.Event()
        self.counters = _Counters()
        if on_entry_error not in ENTRY_ERROR_POLICIES:
            raise ValueError(f"on_entry_error must be one of {ENTRY_ERROR_POLICIES}, not {on_entry_error!r}")
        self.on_entry_error = on_entry_error
        self.fs_id, self.backup_id = fs_id, backup_id
        self._log = log.bind(fs_id=fs_id, backup_id=backup_id)
        p = store.chunker
        self.cdc = pyfastcdc.FastCDC(avg_size=p.avg_size, min_size=p.min_size, max_size=p.max_size, seed=p.seed)
        self.small_file = p.min_size
        self._pool = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="zfsbackd-read")
        self._chunk_pool = ThreadPoolExecutor(max_workers=pools.CHUNK_WORKERS, thread_name_prefix="zfsbackd-chunk")
        self._jobs = threading.BoundedSemaphore(max_jobs)
        self.read_ahead_entries = read_ahead_entries
        self._read_ahead: TreeReadAhead[None, _ParentDir] | None = None
        #: with a change list: the trees of the directories it names, as bytes, by their paths in the change list
        self._changed_trees: TreeReadAhead[bytes, bytes] | None = None
        # Unchanged directories taken whole by their listing: not for a provider that needs every directory's
        # entries, nor across grafted datasets; nor while a change list is used or awaited (``_listing_digest``).
        self._listings = store.listing_cache if snapshot.reuses_listings and not self.grafts else None
        self.read_ahead_peak_entries = 0
        """The most parent tree entries held by the read-ahead at once (tests check the bound with it)."""
        self.directories_not_listed = 0
        """Directories a change list spared the listing of (:meth:`_frame_spliced`)."""
        self.directories_listed_by_changes = 0
        """Directories whose listing came with the change list (:meth:`_listing_from_change_list`)."""
        self.unfinished_peak_dirs = 0
        """The most directories left unfinished at once while their files were read (see ``_walk``)."""
        self._processes = pools.ARCHIVE_PROCESSES if processes is None else processes
        usable = shards is not None and self._processes > 1 and snapshot.parallel_walk
        self._shard_context = shards if usable else None
        self._parallel_after = parallel_after_entries
        if parallel_after_entries is None:
            self._parallel_after = pools.PARALLEL_AFTER_ENTRIES
        self._entries_listed = 0
        self._largest_shard = 0  # files of the biggest subdirectory sent whole to a worker (0: any)
        self._shards: WorkerPool | None = None

    # ------------------------------------------------------------------ public
    def run(self) -> tuple[str, BackupStats]:
        """Archive the whole snapshot; returns (root tree id hex, statistics)."""
        try:
            root_st = self._read_root(os.lstat, self.root)
            parent_root = self._parent_root_node()
            if parent_root is None:
                self.changes = self._pending = None  # nothing to reuse: every entry is examined
            else:
                self._give_up_after = int(parent_root.get("tree_files", 0)) // 2
                if self._pending is not None:
                    # A quick answer (few changes) spares the walk, and the tree read-ahead, almost entirely.
                    self._pending.wait(self.snapshot.change_list_head_start)
                    self._change_set()
            if parent_root is not None and self.changes is None:
                # The walk will visit every directory: read the parent's trees ahead, in its order.
                self._read_ahead_below(parent_root["subtree"])
            elif parent_root is not None:
                self._read_ahead_changed(parent_root["subtree"])
            if parent_root is not None and self.changes is None:
                self._plan_shards(parent_root)
            parent_subtree = parent_root.get("subtree") if parent_root else None
            root_frame = self._read_root(self._enter_dir, b"", parent_subtree, root_st.st_dev, None, parent_root)
            subtree, totals = self._walk(root_frame)
            root_xattrs = self._read_root(read_xattrs, self.root)
            root_node = _meta_node(ROOT_NAME.encode(), root_st)
            root_node.update(type="dir", subtree=subtree, xattrs=encode_xattrs(root_xattrs))
            root_node.update(tree_files=totals.files, tree_bytes=totals.bytes, tree_dirs=totals.dirs)
            root_id = self.writer.add_tree(serialize_tree([root_node]))
            stats = self.counters.stats
            if self._shards is not None:  # their data is durable before anything names the root
                for worker_stats, writer_stats in self._shards.finish(self.cancel):  # type: ignore[misc]
                    stats.add(worker_stats, entries_kept=SKIPPED_ENTRIES_KEPT)
                    self.writer.stats.add(writer_stats)
            stats.files, stats.bytes_total, stats.directories = totals.files, totals.bytes, totals.dirs + 1
            return root_id.hex(), stats
        finally:
            self._stop_read_ahead()
            if self._shards is not None:
                self._shards.close()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._chunk_pool.shutdown(wait=True, cancel_futures=True)

    def _read_root(self, read: Callable[..., _T], *args: object) -> _T:
        """``read(*args)`` on the snapshot's root, whose OSError fails the backup (there is nothing to skip to)."""
        try:
            return read(*args)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise SourceReadError(
                f"file_systems[{self.fs_id}]: backup {self.backup_id}: cannot read {os.fsdecode(self.root)}, the "
                f"root of the snapshot ({code}: {exc.strerror or exc}); check that the source is mounted and "
                "readable, then run the backup again"
            ) from exc

    def archive_job(self, job: ShardJob) -> ShardOutcome:
        """In a worker process: archive one subdirectory the backup's own archiver sent (see ``_dir_entry``)."""
        parent_tree = job.before.get("subtree") if job.before else None
        if parent_tree:
            self._read_ahead_below(parent_tree)
        try:
            frame = self._enter_subdir(job.rel, job.dev, job.node, job.before, job.unchanged)
            if frame is None:
                return ShardOutcome(None)
            subtree, totals = self._walk(frame)
        finally:
            self._stop_read_ahead()
        faults.point("shard-archived")
        reused = frame.node_before is not None and subtree == frame.tree_before
        return ShardOutcome(subtree, totals.files, totals.bytes, totals.dirs, reused)

    # ----------------------------------------------------------------- shards
    def _plan_shards(self, parent_root: Node) -> None:
        """Size what a worker gets whole by the parent backup; start the workers now if the tree is big."""
        if self._shard_context is None:
            return
        files = int(parent_root.get("tree_files", 0))
        self._largest_shard = files // (2 * self._processes)  # a fair share, split again if bigger
        if files >= self._parallel_after:
            self._start_shards()

    def _start_shards(self) -> None:
        """From now on, subdirectories go to worker processes (the walk's read-ahead is theirs to do)."""
        assert self._shard_context is not None
        context, self._shard_context = self._shard_context, None  # tried once, whatever happens
        self._shards = start_workers(context, self._processes - 1, self.progress, backup_id=context.backup_id)
        if self._shards is None:
            return
        self._stop_read_ahead()

    def _sends(self, before: Node | None) -> bool:
        """Whether the subdirectory whose parent backup's node is *before* goes to a worker whole (when
        one is free and the directory is not bigger than a fair share)."""
        if self._shards is None or not self._shards.has_room():
            return False
        files = before.get("tree_files") if before else None
        return not (self._largest_shard and type(files) is int and files > self._largest_shard)

    def _shard_result(self, future: Future[ShardOutcome]) -> ShardOutcome:
        """A worker's result, waited for as long as the backup is not cancelled."""
        while True:
            try:
                return future.result(timeout=CANCEL_POLL_SECONDS)
            except TimeoutError:
                if self.cancel.is_set():
                    raise BackupCancelled() from None

    # ----------------------------------------------------------------- parent
    def _parent_root_node(self) -> Node | None:
        if not self.parent_root_tree:
            return None
        nodes = self._read_parent_tree(self.parent_root_tree)
        return nodes.get(ROOT_NAME.encode()) if nodes else None

    def _read_ahead_below(self, tree_id: str) -> None:
        """Read the parent backup's trees from *tree_id* down ahead of the walk, in its order."""
        self._read_ahead = TreeReadAhead(
            self._read_ahead_tree, _subtrees, _tree_size, [(tree_id, None)], max_entries=self.read_ahead_entries
        )

    def _read_ahead_changed(self, tree_id: str) -> None:
        """With a change list known before the walk starts: read the parent backup's trees of the directories
        it names, from *tree_id* (the root's) down, ahead of the walk and in its order.

        Those are the directories the walk goes into, and it needs each one's tree (as bytes: see
        :meth:`_frame_spliced`) before it can look at the directory's changed entries; with scattered
        churn that is nearly every directory, and reading them one after the other on the walk's
        thread (a file, zstd, BLAKE3: calls that release the GIL) was a tenth of its time.
        """
        self._changed_trees = TreeReadAhead(
            self._read_tree_bytes,
            self._changed_subtrees,
            _raw_tree_size,
            [(tree_id, b"")],
            max_entries=self.read_ahead_entries,
        )

    def _read_tree_bytes(self, tree_id: str, _rel: bytes) -> bytes:
        return self.store.read_tree(bytes.fromhex(tree_id), what=f"parent tree {tree_id[:16]}")

    def _changed_subtrees(self, raw: bytes, rel: bytes) -> list[tuple[str, bytes, int]]:
        """The trees of the subdirectories of the parent backup's directory *rel* (its tree's bytes *raw*) that
        the change list names, in the walk's order (by name), with their paths in the change list."""
        changes = self.changes
        names = sorted(changes.names_not_clean(rel)) if changes is not None else []
        tree = TreeBytes(raw)
        nodes = tree.nodes_named(names) if names and tree.canonical_frame else None
        if nodes is None:  # (none named, or not in the canonical form: the walk reads those trees itself)
            return []
        prefix = rel + b"/" if rel else b""
        return [
            (node["subtree"], prefix + name, expected_entries(node))
            for name, node in nodes.items()
            if node.get("type") == "dir" and isinstance(node.get("subtree"), str) and node["subtree"]
        ]

    def _stop_read_ahead(self) -> None:
        """No more parent trees are read ahead (the walk is over, or a change list spares most of it)."""
        if self._read_ahead is not None:
            self._read_ahead.close()
            self.read_ahead_peak_entries = max(self.read_ahead_peak_entries, self._read_ahead.peak_entries)
            self._read_ahead = None
        if self._changed_trees is not None:
            self._changed_trees.close()
            self.read_ahead_peak_entries = max(self.read_ahead_peak_entries, self._changed_trees.peak_entries)
            self._changed_trees = None

    def _read_ahead_tree(self, tree_id: str, _arg: None) -> _ParentDir:
        return self._read_parent(tree_id)

    def _parent_dir(self, tree_id: str | None) -> _ParentDir:
        """The parent backup's directory whose tree is *tree_id*: read ahead, or read now."""
        if not tree_id:
            return None
        if self._read_ahead is not None:
            parent = self._read_ahead.take(tree_id)
            if parent is not None:
                return parent
        return self._read_parent(tree_id)

    def _read_parent(self, tree_id: str) -> _ParentDir:
        """The summary of the listing the tree was made from, if the listing cache knows it; else the tree.

        Not while a change list is used or awaited: no listing is compared with a summary then (see
        :meth:`_listing_digest`), so it would only be read in vain before the tree.
        """
        if self._listings is not None and self.changes is None and self._pending is None:
            summary = self._listings.get(bytes.fromhex(tree_id))
            if summary is not None:
                return summary
        return self._read_parent_tree(tree_id)

    def _read_parent_tree(self, tree_id: str) -> dict[bytes, Node] | None:
        raw = self._read_parent_bytes(tree_id)
        return None if raw is None else self._parse_parent(raw, tree_id)

    def _read_parent_bytes(self, tree_id: str, walking: bool = False) -> bytes | None:
        """The parent backup's tree *tree_id*, authenticated; None (logged) if it cannot be read.

        *walking*: the walk's next directory with a change list, which may have been read ahead (a take
        out of the walk's order would drop the trees read ahead before it).
        """
        try:
            raw = self._changed_trees.take(tree_id) if walking and self._changed_trees is not None else None
            return raw if raw is not None else self._read_tree_bytes(tree_id, b"")
        except Exception as exc:  # a damaged parent only costs a full read, never a wrong backup
            log.warning("parent_tree_unreadable", tree_id=tree_id, error=str(exc))
            return None

    @staticmethod
    def _parse_parent(raw: bytes, tree_id: str) -> dict[bytes, Node]:
        return nodes_by_name(parse_tree(raw, what=f"parent tree {tree_id[:16]}"))

    # ------------------------------------------------------------------- walk
    def _path(self, rel: bytes) -> bytes:
        return self.snapshot.path(rel)

    def _walk(self, root_frame: _DirFrame) -> tuple[str, _Totals]:
        """Archive the tree below *root_frame*, depth first, with an explicit stack (no recursion).

        Each directory's tree is written once all of its entries are known, exactly as a
        recursive walk would: the same trees, the same ids, so an unchanged directory
        still reuses its parent backup's tree id.

        A directory whose files are still on the read pool when its listing is done is
        not waited for: it joins the queue of unfinished directories (in the order the
        walk left them, children before their parent, which is the order they can be
        finished in) and the walk goes on, so reading overlaps walking also when each
        directory has only a few changed files (scattered churn with a change list).
        The queue is bounded (``UNFINISHED_DIRS``, ``UNFINISHED_ENTRIES``): past it
        the oldest directory is waited for. With worker processes a directory may wait
        for a worker's whole subdirectory; then those behind it that are ready are
        finished first (:meth:`_next_to_finish`), so that it does not hold them all.
        """
        stack = [root_frame]
        unfinished: deque[tuple[_DirFrame, int]] = deque()  # (directory, entries it held when it joined)
        held = 0
        while True:
            frame = stack[-1]
            child = self._scan(frame)
            if child is not None:
                child.parent = frame
                frame.open_children += 1
                stack.append(child)
                continue
            stack.pop()
            frame.entries = []  # what the finishing does not need any more
            entries = len(frame.nodes) + len(frame.kept) + len(frame.shards)
            entries += sum(len(jobs) for _future, jobs in frame.pending)
            unfinished.append((frame, entries))
            held += entries
            self.unfinished_peak_dirs = max(self.unfinished_peak_dirs, len(unfinished))
            while unfinished:
                forced = not stack or len(unfinished) > UNFINISHED_DIRS or held > UNFINISHED_ENTRIES
                index = self._next_to_finish(unfinished, forced)
                if index is None:
                    break
                ready, entries = unfinished[index]
                del unfinished[index]
                held -= entries
                result = self._finish_dir(ready)
                if ready.parent is None:
                    return result
                self._attach(ready, *result)

    def _next_to_finish(self, unfinished: deque[tuple[_DirFrame, int]], forced: bool) -> int | None:
        """Which unfinished directory to finish now (its index), or None to walk on.

        The oldest, when its results are in or it must be waited for (*forced*). With worker
        processes, else any other whose results are in and whose subdirectories are all finished
        (the oldest's are: they came before it). Without them, directories finish in the order
        they were left, as a recursive walk would finish them.
        """
        if forced or _results_ready(unfinished[0][0]):
            return 0
        if self._shards is None:
            return None
        for index, (frame, _entries) in enumerate(unfinished):
            if frame.open_children == 0 and _results_ready(frame):
                return index
        return None

    @staticmethod
    def _attach(frame: _DirFrame, subtree: str, totals: _Totals) -> None:
        """Give a finished directory's node to its parent's entries."""
        parent = frame.parent
        assert parent is not None and frame.node is not None  # only the root has neither, and it is last
        parent.open_children -= 1
        if frame.node_before is not None and subtree == frame.tree_before:
            parent.kept.append(frame.node_before)  # nothing in or below it changed
            return
        frame.node.update(subtree=subtree, tree_files=totals.files, tree_bytes=totals.bytes, tree_dirs=totals.dirs)
        parent.nodes.append(frame.node)

    def _enter_dir(
        self,
        rel: bytes,
        parent_tree: str | None,
        dev: int,
        node: Node | None,
        before: Node | None = None,
        moved_from: bytes | None = None,
    ) -> _DirFrame:
        """List the directory *rel* (on device *dev*) for the walk; OSError if it cannot be listed.

        ``before`` is the directory's node in the parent backup (whose tree is ``parent_tree``), where
        its path was ``moved_from`` if not *rel* (see :meth:`_moved_node`).
        """
        frame = self._list_dir(rel, parent_tree, dev, node, before, moved_from)
        frame.moved_from = moved_from
        if frame.tree_before is not None and frame.spliced is None and frame.as_listed is None:
            self._take_clean_entries(frame, _Totals.of_directory(before))
        return frame

    def _list_dir(
        self,
        rel: bytes,
        parent_tree: str | None,
        dev: int,
        node: Node | None,
        before: Node | None,
        moved_from: bytes | None,
    ) -> _DirFrame:
        """:meth:`_enter_dir`'s frame, before the clean entries of a parsed parent tree are taken."""
        if self.cancel.is_set():
            raise BackupCancelled()
        raw = None  # with a change list, the parent tree's bytes: spliced where they can be (see _frame_spliced)
        known_as = rel if moved_from is None else moved_from  # (what the change list calls it)
        if parent_tree and self.changes is not None:
            raw = self._read_parent_bytes(parent_tree, walking=True)
        # The change list says which names of a directory changed, not that a name is the directory it was:
        # another one under the name (its own renamed there, the old one removed or moved) is compared entry
        # by entry with the old one's tree, as the full walk compares it.
        splice = raw is not None and (node is None or before is None or before.get("inode") == node["inode"])
        if splice and self._may_skip_listing(known_as):
            frame = self._frame_spliced(rel, known_as, dev, node, parent_tree, raw, before, None)  # type: ignore[arg-type]
            if frame is not None:
                return frame
        pairs = self._listing_from_change_list(node)  # (name, inode), in name order
        entries: list[_Entry] | None = None
        if pairs is None:
            with os.scandir(self._path(rel)) as it:
                entries = sorted(it, key=_ENTRY_NAME)  # looked at in name order, the order trees keep
        self._entries_listed += len(entries if pairs is None else pairs)  # type: ignore[arg-type]
        if self._shard_context is not None and self._entries_listed >= self._parallel_after and self.changes is None:
            self._start_shards()
        if splice:
            if pairs is None:
                pairs = [(entry.name, entry.inode()) for entry in entries]  # type: ignore[union-attr]
            frame = self._frame_spliced(rel, known_as, dev, node, parent_tree, raw, before, pairs)  # type: ignore[arg-type]
            if frame is not None:
                return frame
        if entries is None:
            entries = self._named_entries(rel, pairs)  # type: ignore[arg-type]
        if raw is not None:
            parent: _ParentDir = self._parse_parent(raw, parent_tree)  # type: ignore[arg-type]
        elif self.changes is not None:
            parent = None  # (the parent tree could not be read)
        else:
            parent = self._parent_dir(parent_tree)
        listing = self._listing_digest(entries)
        if isinstance(parent, ListingSummary):
            if listing == parent.digest and parent_tree:
                frame = self._frame_as_listed(rel, dev, entries, node, parent_tree, parent)
                if frame is not None:
                    return frame
            parent = self._read_parent_tree(parent_tree)  # type: ignore[arg-type]  # a summary is of a tree
        frame = _DirFrame(rel, dev, parent or {}, entries, node, listing=listing, listed=len(entries))
        if parent is not None:
            frame.tree_before = parent_tree
        return frame

    def _listing_from_change_list(self, node: Node | None) -> list[tuple[bytes, int]] | None:
        """The (name, inode) of each entry of the directory whose node is *node*, in name order, from the
        listing the change list carries of it (``ChangeSet.listings``); None when it carries none (the
        root: no node). Pairs, not entries: a directory spliced looks at a few of them only."""
        listings = None if self.changes is None else self.changes.listings
        found = None if listings is None or node is None else listings.entries(node["inode"])
        if found is None:
            return None
        self.directories_listed_by_changes += 1
        return sorted(found)

    def _named_entries(self, rel: bytes, pairs: list[tuple[bytes, int]]) -> list[_Entry]:
        """The entries of directory *rel* that *pairs* (name, inode) name, in their order."""
        prefix = self._path(rel) + b"/"
        return [_NamedEntry(name, prefix + name, inode) for name, inode in pairs]

    def _may_skip_listing(self, rel: bytes) -> bool:
        """Whether the change list names *rel* only as the ancestor of changes (see :meth:`_frame_spliced`)."""
        return self.changes is not None and bool(rel) and rel not in self.changes.touched

    def _frame_spliced(
        self,
        rel: bytes,
        known_as: bytes,
        dev: int,
        node: Node | None,
        tree_id: str,
        raw: bytes,
        before: Node | None,
        listing: list[tuple[bytes, int]] | None,
    ) -> _DirFrame | None:
        """The frame of a directory whose unchanged entries are the nodes of its parent backup's tree *tree_id*
        (bytes *raw*), known as such without parsing them: the new tree is spliced from those bytes
        (:class:`~zfsbackd.store.treebytes.TreeBytes`), only the changed entries are looked at, and what
        the others stand for is the directory's totals in the parent backup (its node's) minus theirs.

        Not *listing* it: the change list names the directory only as the ancestor of changed entries.
        A change list names a directory itself (``ChangeSet.touched``) whenever a name in it was added,
        removed or renamed — that changes the directory's mtime and ctime: ``zfs diff`` reports it
        modified, the send stream sends its dnode — except the backup's root, which is always listed. So it
        holds the parent tree's names for the same objects, and the changed ones are looked at by name.

        Listed (*listing*, (name, inode) pairs): with the change list's objects (``ChangeSet.objects``), an
        entry is looked at when the change list names it or its inode is among the objects that changed; each
        other one is the parent tree's node of its name (an object's names change only with its ctime). The
        names the tree has and the listing has not are cut (a deleted object is in no change list); the tree's
        names (read from its name keys alone, :meth:`TreeBytes.names`) other than the changed ones must be
        exactly the entries not looked at.

        None (parse the parent tree, and list the directory) when a changed name of a directory not
        listed is not in the parent tree (then the directory did change), the tree and the listing
        disagree (an entry no tree holds: a FIFO, an excluded one), the change list has no objects for a
        listed one, the bytes are not in the canonical form (or its names need escapes), or the node
        gives no valid totals. *known_as*: the path the change list knows the directory by (``_DirFrame.change_rel``).
        """
        changes = self.changes
        totals = _Totals.of_directory(before)
        tree = TreeBytes(raw)
        if changes is None or totals is None or not tree.canonical_frame:
            return None
        not_clean = changes.names_not_clean(known_as)
        entries: list[_Entry]
        if listing is None:
            previous = tree.nodes_named(not_clean)
            if previous is None or len(previous) != len(not_clean):
                return None
            # (same names, same objects: the inode numbers are the parent tree's)
            entries = [
                _NamedEntry(name, self._path(rel + b"/" + name), _node_inode(previous[name]))
                for name in sorted(not_clean)  # name order
            ]
        else:
            held = tree.names() if changes.objects is not None else None
            if held is None:
                return None
            objects = changes.objects
            chosen = [(name, inode) for name, inode in listing if name in not_clean or inode in objects]
            names = [name for name, _inode in chosen]
            listed = {name for name, _inode in listing}
            gone = held - listed  # (deleted since: a send stream names no deleted object)
            previous = tree.nodes_named(not_clean.union(names, gone))
            if previous is None or held - previous.keys() != listed.difference(names):
                log.info("change_list_listing_not_as_tree", path=rel.decode("utf-8", "backslashreplace"))
                return None
            entries = self._named_entries(rel, chosen)
        for changed in previous.values():
            totals.add_node(changed, -1)
        if min(totals.files, totals.bytes, totals.dirs) < 0:  # the node's totals are wrong: count the entries
            return None
        frame = _DirFrame(rel, dev, previous, entries, node, tree_before=tree_id, spliced=tree)
        frame.kept_totals = totals
        frame.listed = tree.count() if listing is None else len(listing)
        stats = self.counters.stats
        stats.entries_not_examined += tree.count() - len(previous)
        stats.files_unchanged += totals.files
        self.progress.advance(files=totals.files, nbytes=totals.bytes)
        if listing is None:
            self.directories_not_listed += 1
        return frame

    def _listing_digest(self, entries: list[_Entry]) -> bytes | None:
        """The digest of the directory's listing (``listing_digest``), when the listing cache is used.

        The ``lstat`` of every entry is made here, in one list comprehension; each ``DirEntry`` keeps
        its result, so :meth:`_scan` does not make it again. None when an entry cannot be stat'ed
        (:meth:`_scan` reports it), or the cache is not used.
        """
        if self._listings is None or self.changes is not None or self._pending is not None:
            return None  # (a change list spares the stat itself)
        try:
            stats = [entry.stat(follow_symlinks=False) for entry in entries]
        except OSError:
            return None
        return listing_digest(list(map(_ENTRY_NAME, entries)), stats)

    def _frame_as_listed(
        self,
        rel: bytes,
        dev: int,
        entries: list[_Entry],
        node: Node | None,
        tree_id: str,
        summary: ListingSummary,
    ) -> _DirFrame | None:
        """The frame of a directory listed exactly as when its parent backup's tree *tree_id* was made.

        Every entry that is not a directory is as the tree has it (the per-entry test of
        :meth:`_scan`, passed by the listing as a whole), so only the subdirectories are left to
        walk, with the parent backup's nodes of the summary; the other entries count as unchanged
        in the summary's totals and are not even looked at. None if the summary's directories are
        not the listing's (a summary that does not fit its digest: then the tree is read).
        """
        dirs = nodes_by_name(summary.dirs)
        subdirs = [entry for entry in entries if entry.name in dirs]
        if len(subdirs) != len(dirs) or summary.entries != len(entries):
            log.warning("listing_summary_mismatch", tree_id=tree_id, path=os.fsdecode(rel))
            return None
        frame = _DirFrame(rel, dev, dirs, subdirs, node, listing=summary.digest, listed=len(entries))
        frame.tree_before, frame.as_listed = tree_id, summary
        frame.kept_totals = _Totals(summary.files, summary.bytes)
        stats = self.counters.stats
        stats.directories_listed_as_before += 1
        stats.files_unchanged += summary.files
        stats.symlinks += summary.symlinks
        stats.other += summary.others
        self.progress.advance(files=summary.files, nbytes=summary.bytes)
        return frame

    def _take_clean_entries(self, frame: _DirFrame, totals_before: _Totals | None) -> None:
        """Take the parent backup's nodes of the entries the change list says are clean, all at once.

        The test is :meth:`_scan`'s first one (a clean path whose name still has the node's
        inode), made with set and dict operations over the directory instead of a pass of
        :meth:`_scan` per entry; the nodes are taken in the parent tree's (sorted) order, and
        what they stand for is the directory's totals in the parent backup minus those of the
        entries not taken. In a directory with a few changed files among thousands (scattered
        churn), the walk then goes through the changed entries only.
        """
        changes = self._change_set()
        if changes is None:
            return
        not_clean = changes.names_not_clean(frame.change_rel)
        inode_of = dict(zip(map(_ENTRY_NAME, frame.entries), map(_ENTRY_INODE, frame.entries), strict=True))
        taken = {
            name: node
            for name, node in frame.previous.items()
            if name not in not_clean and inode_of.get(name, _NO_INODE) == node.get("inode")
        }
        if not taken:
            return
        frame.kept.extend(taken.values())
        frame.entries = [entry for entry in frame.entries if entry.name not in taken]  # still in name order
        totals = totals_before
        if totals is not None:
            for name in frame.previous.keys() - taken.keys():
                totals.add_node(frame.previous[name], -1)
        if totals is None or min(totals.files, totals.bytes, totals.dirs) < 0:  # totals not given, or wrong
            totals = _Totals()
            for node in frame.kept:
                totals.add_node(node)
        frame.kept_totals = totals
        frame.kept_counted = len(frame.kept)
        stats = self.counters.stats
        stats.entries_not_examined += len(taken)
        stats.files_unchanged += totals.files
        self.progress.advance(files=totals.files, nbytes=totals.bytes)

    def _scan(self, frame: _DirFrame) -> _DirFrame | None:
        """Go on through *frame*'s entries; returns the next subdirectory to walk, or None when done.

        Regular files go to the read pool; everything else is recorded here. Runs once per
        entry, so it is kept lean: the per-entry error handling costs nothing until an error.
        """
        rel, previous, entries, nodes, kept = frame.rel, frame.previous, frame.entries, frame.nodes, frame.kept
        moved = frame.moved_from is not None  # (then the change list names its entries by other paths)
        changes = self._change_set()
        stats = self.counters.stats
        unchanged_files = unchanged_bytes = 0  # reported to the progress once per call
        descend: _DirFrame | None = None
        index = frame.position
        while index < len(entries):
            entry = entries[index]
            index += 1
            name = entry.name
            child = rel + b"/" + name if rel else name
            before = previous.get(name)
            if changes is None and self._pending is not None:
                changes = self._change_set()  # ready now? then the rest of this directory is skipped too
            if (
                before is not None
                and changes is not None
                and changes.is_clean(frame.child_change_rel(name) if moved else child)
                and entry.inode() == before.get("inode")  # a name now of another object is not clean
            ):
                kept.append(before)  # unchanged since the parent's snapshot: not even stat'ed
                files, nbytes = self._count_reused(before)
                unchanged_files += files
                unchanged_bytes += nbytes
                continue
            if changes is not None and changes.files:
                size = changes.files.get(entry.inode())
                if size is not None and (frame.dev, entry.inode()) not in self.excluded:
                    self._queue_read(frame, child, name, size)  # its content changed: read, not stat'ed first
                    continue
            if before is not None and changes is not None and self._as_before(changes, entry, before):
                self._submit_reads(frame)  # read this directory's files while the walk goes down
                node = _node_as_before(name, before)
                descend = self._walk_into(frame, child, name, frame.dev, node, before, True, None)
                if descend is not None:
                    break
                continue
            known = changes.directories.get(entry.inode()) if changes is not None and changes.directories else None
            try:
                st = entry.stat(follow_symlinks=False) if known is None else known.as_stat(entry.inode(), frame.dev)
            except OSError as exc:
                self._entry_problem(child, "stat", exc)
                continue
            if (st.st_dev, st.st_ino) in self.excluded:
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                if _unchanged(before, "file", st):
                    stats.files_unchanged += 1
                    kept.append(before)  # type: ignore[arg-type]
                    unchanged_files += 1
                    unchanged_bytes += st.st_size
                else:
                    self._queue_read(frame, child, name, st.st_size)
            elif stat.S_ISDIR(mode):
                self._submit_reads(frame)  # read this directory's files while the walk goes down
                descend = self._dir_entry(frame, child, name, st, before)
                if descend is not None:
                    break
            elif (stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and _unchanged(
                before, _SPECIAL_TYPES.get(stat.S_IFMT(mode), ""), st
            ):
                kept.append(before)  # type: ignore[arg-type]  # a link's target, a device's number: as they were
                if stat.S_ISLNK(mode):
                    stats.symlinks += 1
                else:
                    stats.other += 1
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(self._path(child))
                except OSError as exc:
                    self._entry_problem(child, "read the symlink", exc)
                    continue
                stats.symlinks += 1
                node = _meta_node(name, st)
                node.update(type="symlink", **encode_target(target))
                nodes.append(node)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                try:
                    xattrs = read_xattrs(self._path(child))
                except OSError as exc:
                    self._entry_problem(child, "read the extended attributes", exc)
                    continue
                stats.other += 1
                node = _meta_node(name, st)
                node.update(
                    type="chardev" if stat.S_ISCHR(mode) else "blockdev", rdev=st.st_rdev, xattrs=encode_xattrs(xattrs)
                )
                nodes.append(node)
            else:  # sockets and FIFOs cannot be backed up meaningfully
                stats.specials_skipped += 1
        frame.position = index
        self._submit_reads(frame)
        if unchanged_files:
            self.progress.advance(files=unchanged_files, nbytes=unchanged_bytes)
        return descend

    def _queue_read(self, frame: _DirFrame, child: bytes, name: bytes, size: int) -> None:
        """Read the file *child* of *frame* (of *size* bytes as listed): batched with other small files, a
        larger one alone (its chunks keep the chunk pool busy while other jobs read on)."""
        if size <= self.small_file:
            frame.batch.append((child, name))
            frame.batch_bytes += size
            if len(frame.batch) >= FILES_PER_JOB or frame.batch_bytes >= BYTES_PER_JOB:
                self._submit_reads(frame)
        else:
            self._submit_reads(frame, [(child, name)])

    def _submit_reads(self, frame: _DirFrame, jobs: list[_FileJob] | None = None) -> None:
        """Give *jobs* (by default the frame's batch of small files) to the read pool as one job."""
        if jobs is None:
            jobs, frame.batch, frame.batch_bytes = frame.batch, [], 0
        if not jobs:
            return
        self._jobs.acquire()
        future = self._pool.submit(self._read_files, jobs)
        future.add_done_callback(lambda _f: self._jobs.release())
        frame.pending.append((future, jobs))

    def _dir_entry(
        self, frame: _DirFrame, child: bytes, name: bytes, st: os.stat_result, before: Node | None
    ) -> _DirFrame | None:
        """The subdirectory *child* of *frame*: its frame to walk next, or None when it needs no walk.

        A mount point of another file system is kept as an empty directory; a directory
        that cannot be read is an entry problem (skipped with its subtree, or the end of
        the backup, by ``on_entry_error``).
        """
        graft = self.grafts.get(child)
        known_as = None  # the path the change list knows the directory by, when it was moved
        if graft is None:
            moved = self._moved_node(frame, before, st.st_ino)
            if moved is not None:
                before, known_as = moved
        try:
            if graft is not None:  # a child dataset's snapshot takes the place of its (empty) mount point
                st = os.lstat(graft)
            if _unchanged(before, "dir", st):
                xattrs = before.get("xattrs", [])  # type: ignore[union-attr]
            else:
                xattrs = encode_xattrs(read_xattrs(self._path(child)))
        except OSError as exc:
            self._entry_problem(child, "read the attributes", exc)
            return None
        node = _meta_node(name, st)
        node.update(type="dir", xattrs=xattrs)
        if graft is None and st.st_dev != frame.dev:
            # Another file system mounted here: keep the mount point, not its contents.
            subtree = self.writer.add_tree(serialize_tree([])).hex()
            node.update(subtree=subtree, tree_files=0, tree_bytes=0, tree_dirs=0)
            frame.nodes.append(node)
            return None
        unchanged = known_as is None and _unchanged(before, "dir", st)  # (a moved one's node has the old name)
        return self._walk_into(frame, child, name, st.st_dev, node, before, unchanged, known_as)

    def _walk_into(
        self,
        frame: _DirFrame,
        child: bytes,
        name: bytes,
        dev: int,
        node: Node,
        before: Node | None,
        unchanged: bool,
        known_as: bytes | None,
    ) -> _DirFrame | None:
        """The subdirectory *child* (its node *node*, on device *dev*) of *frame*, sent to a worker process or
        entered here; *known_as*: the path the change list knows it by when it was moved (see :meth:`_dir_entry`)."""
        if self._shards is not None and self._sends(before):
            job = ShardJob(child, dev, node, before, unchanged)
            frame.shards.append((self._shards.submit(job), node, before))
            return None
        if known_as is None:
            known_as = frame.child_change_rel(name)
        return self._enter_subdir(child, dev, node, before, unchanged, None if known_as == child else known_as)

    def _as_before(self, changes: ChangeSet, entry: _Entry, before: Node) -> bool:
        """Whether the subdirectory *entry*, dirty below, is itself as its parent backup's node *before* says
        (that node's object, and no change of the object: not among ``ChangeSet.objects``). Its node is then
        the parent backup's, without a stat: its ctime would have changed with any of its attributes, its
        names or its extended attributes. A send stream's change list of one dataset only (no grafts)."""
        objects = changes.objects
        inode = before.get("inode")
        return (
            objects is not None
            and not self.grafts
            and before.get("type") == "dir"
            and inode not in objects
            and entry.inode() == inode
            and all(key in before for key in _META_KEYS)
        )

    def _moved_node(self, frame: _DirFrame, before: Node | None, inode: int) -> tuple[Node, bytes] | None:
        """The parent backup's node of the subdirectory *inode* of *frame* when it had another path then
        (renamed, ``mv a b``, or moved, ``mv a x/b``), with the path the change list knows it by; so that the
        directory is compared with its old tree instead of read again as new. None when *before*, the node
        of its name, is its own, or its old node is not known.

        Only where what changed below a moved directory is known: in a full walk, where every entry is
        compared with its node anyway (a directory renamed in its parent: found among the parent tree's
        nodes by inode), and with a send stream's change list (``ChangeSet.objects``), whose object map
        names what changed by the paths of the parent backup's snapshot — the directory's walk then asks
        it by those (``_DirFrame.moved_from``), and the map gives the old path of a changed directory
        moved to another parent (``ChangeSet.directory_paths``). ``zfs diff``'s paths are not said to be
        either, so with them a moved directory stays new. (An object number used again for a new
        directory only means its entries are compared with the old ones, each by its metadata.)
        """
        if before is not None and before.get("inode") == inode:
            return None
        changes = self.changes
        if (changes is None and self._pending is not None) or (changes is not None and changes.objects is None):
            return None
        if frame.dirs_by_inode is None:
            frame.dirs_by_inode = {
                node["inode"]: node
                for node in frame.previous.values()
                if node.get("type") == "dir" and isinstance(node.get("inode"), int)
            }
        node = frame.dirs_by_inode.get(inode)
        if node is not None:
            return node, frame.child_change_rel(node_name(node))
        path = None if changes is None else changes.directory_paths.get(inode)
        node = None if path is None else self._parent_node_at(path)
        if node is None or node.get("type") != "dir" or node.get("inode") != inode:
            return None
        return node, path  # type: ignore[return-value]

    def _parent_node_at(self, path: bytes) -> Node | None:
        """The parent backup's node at *path* (below the root), read down its trees; None if it has none."""
        node = self._parent_root_node()
        for name in path.split(b"/"):
            subtree = None if node is None else node.get("subtree")
            nodes = self._read_parent_tree(subtree) if isinstance(subtree, str) and subtree else None
            node = None if nodes is None else nodes.get(name)
        return node

    def _enter_subdir(
        self,
        child: bytes,
        dev: int,
        node: Node,
        before: Node | None,
        unchanged: bool,
        moved_from: bytes | None = None,
    ) -> _DirFrame | None:
        """The frame of the subdirectory *child* (None when it cannot be listed: an entry problem).

        *unchanged*: the parent backup's node *before* still describes the directory itself; *moved_from*:
        its path in the parent backup, when it (or a directory above it) was renamed since.
        """
        try:
            parent_tree = before.get("subtree") if before else None
            child_frame = self._enter_dir(child, parent_tree, dev, node, before, moved_from)  # type: ignore[arg-type]
        except OSError as exc:
            self.snapshot.directory_archived(child, node, None, False)
            self._entry_problem(child, "list the directory", exc)
            return None
        if unchanged:
            child_frame.node_before = before
        child_frame.same_object = before is not None and before.get("inode") == node["inode"]
        return child_frame

    def _finish_dir(self, frame: _DirFrame) -> tuple[str, _Totals]:
        """Collect the directory's file jobs and write its tree; returns (tree id hex, totals below it)."""
        nodes = frame.nodes
        self._collect_reads(frame)
        for future, node, before in frame.shards:
            outcome = self._shard_result(future)
            if outcome.reused:
                frame.kept.append(before)  # type: ignore[arg-type]  # nothing in or below it changed
            elif outcome.subtree is not None:
                node.update(subtree=outcome.subtree, tree_files=outcome.files, tree_bytes=outcome.bytes)
                node["tree_dirs"] = outcome.dirs
                nodes.append(node)
        frame.shards.clear()
        totals = frame.kept_totals
        for node in frame.kept[frame.kept_counted :]:
            totals.add_node(node)
        for node in nodes:
            totals.add_node(node)
        if frame.as_listed is None:  # (a provider that needs every directory's entries has no listing cache)
            as_before = _entries_as_before(frame) and (frame.node is None or frame.node_before is not None)
            diffable = frame.tree_before is not None and frame.same_object
            previous = frame.previous if diffable else None
            archived = ArchivedDirectory(frame.kept, nodes, previous, complete=frame.spliced is None)
            self.snapshot.directory_archived(frame.rel, frame.node, archived, as_before)
        if self._same_tree_as_before(frame):
            if frame.as_listed is None:  # (else the listing cache told us)
                self._remember_listing(frame, frame.tree_before, frame.kept)  # type: ignore[arg-type]
            return frame.tree_before, totals  # type: ignore[return-value]
        entries = frame.kept + nodes
        if frame.as_listed is not None:
            entries += self._entries_not_walked(frame)
        tree_id = self.writer.add_tree(self._tree_bytes(frame, entries)).hex()
        self._remember_listing(frame, tree_id, entries)
        return tree_id, totals

    @staticmethod
    def _tree_bytes(frame: _DirFrame, entries: list[Node]) -> bytes:
        """The directory's new tree: *entries* serialized, or, for a spliced directory, the parent tree's
        bytes with the changed names' nodes replaced by *entries* (parsed whole if they cannot be spliced)."""
        tree = frame.spliced
        if tree is None:
            return serialize_tree(entries)
        spliced = tree.splice(frame.previous.keys(), entries)
        if spliced is not None:
            return spliced
        log.warning("tree_not_spliced", path=frame.rel.decode("utf-8", "backslashreplace"))
        unchanged = [n for n in parse_tree(tree.raw, what="parent tree") if node_name(n) not in frame.previous]
        return serialize_tree(unchanged + entries)

    def _collect_reads(self, frame: _DirFrame) -> None:
        """Wait for the directory's file jobs: their nodes join ``frame.nodes``, their problems are reported."""
        for future, jobs in frame.pending:
            for outcome, (child, _name) in zip(future.result(), jobs, strict=True):
                self.counters.add_outcome(outcome)
                if outcome.problem is not None:
                    self._entry_problem(child, outcome.problem.what, outcome.problem.error)
                elif outcome.node is not None:
                    frame.nodes.append(outcome.node)
        frame.pending.clear()

    def _entries_not_walked(self, frame: _DirFrame) -> list[Node]:
        """The nodes of a directory taken as listed (:meth:`_frame_as_listed`) that are not directories, now
        that a subdirectory changed and its tree is written anew: its parent backup's tree's, read now.

        If that tree cannot be read any more, they are archived again from the snapshot (the same
        listing), as a directory with no parent tree would be.
        """
        summary = frame.as_listed
        assert summary is not None and frame.tree_before is not None
        nodes = self._read_parent_tree(frame.tree_before)
        if nodes is not None:
            return [node for node in nodes.values() if node.get("type") != "dir"]
        stats = self.counters.stats  # counted again as they are archived again
        stats.files_unchanged -= summary.files
        stats.symlinks -= summary.symlinks
        stats.other -= summary.others
        again = _DirFrame(frame.rel, frame.dev, {}, [], None)
        try:
            with os.scandir(self._path(frame.rel)) as it:
                again.entries = sorted((e for e in it if not e.is_dir(follow_symlinks=False)), key=_ENTRY_NAME)
        except OSError as exc:
            self._entry_problem(frame.rel, "list the directory", exc)
            return []
        self._scan(again)
        self._collect_reads(again)
        return again.nodes

    def _remember_listing(self, frame: _DirFrame, tree_id: str, entries: list[Node]) -> None:
        """Tell the listing cache that the tree *tree_id* was made from the directory's listing, if it holds
        every entry listed (none skipped: else the same listing would not make the same tree)."""
        if self._listings is None or frame.listing is None or len(entries) != frame.listed:
            return
        self._listings.put(bytes.fromhex(tree_id), ListingSummary.of_tree(frame.listing, entries))

    def _same_tree_as_before(self, frame: _DirFrame) -> bool:
        """Whether the directory's tree is its parent backup's, node for node: then that tree id is
        used as it is (no serializing, hashing or storing again), as long as a writer may still
        deduplicate against it (garbage collection is not about to delete its pack)."""
        return _entries_as_before(frame) and self.store.can_deduplicate(bytes.fromhex(frame.tree_before or ""))

    def _entry_problem(self, rel: bytes, what: str, error: OSError) -> None:
        """One entry could not be read: count it as vanished, skip it and say so, or fail the backup.

        Runs on the walk thread only (file jobs hand their problems back), so the
        statistics need no lock. An entry that went away since it was listed (a live
        tree: reflink and copy snapshots are not atomic) is counted as vanished, which is
        no error; anything else — EACCES, EIO, a path beyond PATH_MAX — is skipped with
        its subtree under ``on_entry_error: skip``, like restic's and kopia's error
        callbacks, or fails the backup under ``fail``.
        """
        path = rel.decode("utf-8", "backslashreplace")
        code = errno.errorcode.get(error.errno or 0, str(error.errno))
        stats = self.counters.stats
        if error.errno in VANISHED_ERRNOS or (isinstance(error, FileChangedError) and error.errno == errno.EINVAL):
            stats.files_vanished += 1
            self._log.debug("entry_vanished", path=path, errno=code)
            return
        reason = f"{what}: {error.strerror or error}"
        if self.on_entry_error == "fail":
            raise SourceReadError(
                f"file_systems[{self.fs_id}]: backup {self.backup_id}: {os.fsdecode(self._path(rel))}: cannot "
                f"{what} ({code}: {error.strerror or error}); make it readable or remove it, or set "
                f"on_entry_error: skip on file_systems[{self.fs_id}] to back up everything else and list what "
                "was skipped in the backup's Stats"
            )
        stats.entries_skipped_with_errors += 1
        if len(stats.skipped_entries) < SKIPPED_ENTRIES_KEPT:
            stats.skipped_entries.append({"path": path, "errno": code, "reason": reason})
        self._log.warning("entry_skipped", path=path, errno=code, reason=reason)

    def _change_set(self) -> ChangeSet | None:
        """The change list, once it is known (a pending one is picked up between entries).

        When the walk has passed half of the parent backup's files and the change
        list is still not ready, it would save less than it costs: both compete
        for the CPU. It is given up, and the walk finishes alone.
        """
        if self.changes is None and self._pending is not None:
            self.changes = self._pending.ready()
            if self.changes is not None:
                self._pending = None
                self._stop_read_ahead()  # the walk now skips clean directories: their trees are not needed
                log.info("backup_using_change_list", changed_paths=len(self.changes.touched))
            elif self._pending.answered_none():  # the provider has none (or it failed): nothing to wait for
                self._pending = None
            elif self.progress.files > self._give_up_after:
                self._pending.abandon()
                self._pending = None
                log.info("change_list_abandoned", files_walked=self.progress.files)
        return self.changes

    def _count_reused(self, node: Node) -> tuple[int, int]:
        """Count a node reused without a look; returns the (files, bytes) it stands for, for the progress."""
        stats = self.counters.stats
        stats.entries_not_examined += 1
        kind = node.get("type")
        if kind == "file":
            stats.files_unchanged += 1
            return 1, int(node.get("size", 0))
        if kind == "dir":
            files = int(node.get("tree_files", 0))
            stats.files_unchanged += files
            return files, int(node.get("tree_bytes", 0))
        return 0, 0

    # ------------------------------------------------------------- file data
    def _read_files(self, jobs: list[_FileJob]) -> list[_FileOutcome]:
        """Runs on the read pool: one outcome per file, in order.

        The small files' contents are stored together at the end (one index lookup for all
        of them), and only what was finally read: not the reads of a file that moved meanwhile.
        """
        with self.snapshot.prefetched(child for child, _name in jobs) if len(jobs) > 1 else contextlib.nullcontext():
            outcomes = [self._read_file(child, name) for child, name in jobs]
        small = [outcome for outcome in outcomes if outcome.small_data]
        if small:
            added = self.writer.add_many(BlobType.DATA, [outcome.small_data for outcome in small])
            nbytes = 0
            for outcome, (blob_id, _new) in zip(small, added, strict=True):
                assert outcome.node is not None
                outcome.node["chunks"] = [[0, len(outcome.small_data), blob_id.hex()]]
                nbytes += len(outcome.small_data)
                outcome.small_data = b""
            self.progress.advance(files=len(small), nbytes=nbytes)
        return outcomes

    def _read_file(self, rel: bytes, name: bytes) -> _FileOutcome:
        """Runs on the read pool: read the frozen content, chunk it, store new chunks.

        A source read that fails comes back as the outcome's ``problem``, for the walk
        thread to judge (:meth:`_entry_problem`); anything else (the store) is raised.
        """
        if self.cancel.is_set():
            raise BackupCancelled()
        try:
            return self._read_file_content(rel, name)
        except _EntryError as exc:
            # A file that kept changing through every clone attempt (FileChangedError) is one too.
            return _FileOutcome(node=None, changed_while_read=isinstance(exc.error, FileChangedError), problem=exc)

    def _read_file_content(self, rel: bytes, name: bytes) -> _FileOutcome:
        nread = 0
        for attempt in range(READ_ATTEMPTS):
            try:
                frozen = self.snapshot.open_file(rel)
            except OSError as exc:
                raise _EntryError("open", exc) from exc
            try:
                st = frozen.stat
                if 0 < st.st_size <= self.small_file:
                    chunks, small_data = [], self._read_small(frozen.fd, st.st_size)
                    done = len(small_data)
                else:
                    chunks, done = self._store_content(frozen.fd, st)
                    small_data = b""
                nread += done
                try:
                    changed = frozen.changed()
                except OSError as exc:
                    raise _EntryError("stat", exc) from exc
                if not changed or attempt == READ_ATTEMPTS - 1:
                    # Through the fd (no second path lookup), but a clone has none of its own.
                    try:
                        xattrs = read_xattrs(self._path(rel) if frozen.clone else frozen.fd)
                    except OSError as exc:
                        raise _EntryError("read the extended attributes", exc) from exc
                    break  # a live file that moved while read is read again (non-atomic providers only)
            finally:
                frozen.close()
        node = _meta_node(name, st)
        node.update(type="file", size=st.st_size, chunks=chunks, xattrs=encode_xattrs(xattrs))
        if st.st_nlink > 1:
            node["hardlink"] = st.st_ino
        if changed:
            self._log.warning("file_changed_while_read", path=rel.decode("utf-8", "backslashreplace"))
        return _FileOutcome(node=node, bytes_read=nread, changed_while_read=changed, small_data=small_data)

    @staticmethod
    def _read_small(fd: int, size: int) -> bytes:
        try:
            return os.pread(fd, size, 0)
        except OSError as exc:
            raise _EntryError("read", exc) from exc

    def _store_content(self, fd: int, st: os.stat_result) -> tuple[list[list[int | str]], int]:
        """A file bigger than the smallest chunk: chunked, and its new chunks stored as it is read."""
        size = st.st_size
        if size == 0:
            return [], 0
        # A big file's chunks are hashed, compressed and sealed on the chunk pool while this
        # thread reads on: one large file then keeps both cores busy.
        window: deque[tuple[int, int, Future[tuple[bytes, bool]]]] = deque()
        chunks = []

        def add(offset: int, data: memoryview) -> None:
            window.append((offset, len(data), self._chunk_pool.submit(self.writer.add, BlobType.DATA, data)))
            while len(window) > CHUNKS_AHEAD:
                drain()

        def drain() -> None:
            offset, length, future = window.popleft()
            chunks.append([offset, length, future.result()[0].hex()])

        nread = 0
        try:
            try:
                segments = data_segments(fd, size, st.st_blocks)
            except OSError as exc:
                raise _EntryError("find the data", exc) from exc
            for start, end in segments:
                nread += self._chunk_segment(fd, start, end, add)
            while window:
                drain()
        finally:
            for _offset, _length, future in window:
                future.cancel()
        self.progress.advance(files=1)
        return chunks, nread

    def _chunk_segment(self, fd: int, start: int, end: int, add: Callable[[int, memoryview], None]) -> int:
        """Content-defined chunking of [start, end), streamed in READ_BLOCK pieces."""
        carry = b""
        carry_offset = start
        pos = start
        nread = 0
        while True:
            try:
                block = os.pread(fd, min(READ_BLOCK, end - pos), pos) if pos < end else b""
            except OSError as exc:
                raise _EntryError("read", exc) from exc
            pos += len(block)
            nread += len(block)
            eof = not block or pos >= end
            buf = carry + block if carry else block
            if not buf:
                break
            view = memoryview(buf)
            cuts = list(self.cdc.cut_buf(view))
            if not eof and len(cuts) > 1:
                last = cuts.pop()
                carry, next_offset = bytes(view[last.offset :]), carry_offset + last.offset
            elif not eof:
                carry, next_offset = buf, carry_offset
                cuts = []
            else:
                carry, next_offset = b"", carry_offset + len(buf)
            for cut in cuts:
                add(carry_offset + cut.offset, view[cut.offset : cut.offset + cut.length])
            self.progress.advance(nbytes=len(block))
            carry_offset = next_offset
            if eof:
                break
        return nread
