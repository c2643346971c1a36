"""Restore a backup (whole or selected paths) into a new directory under a target.

Safety (DESIGN invariant 5) rests on file descriptors, not on paths:

- ``--target`` is opened once, ``O_NOFOLLOW | O_DIRECTORY``: a symlink as the target
  is refused (a link to ``/`` once made a restore land in ``/zfsbackd-restore_*``), and so
  are a missing target, a non-directory and a read-only file system, each with the fix.
  Symlinks *above* the target are resolved by the kernel once; the result states the
  real path.
- The restore directory ``zfsbackd-incomplete-restore_<UTC timestamp>`` is made with
  ``mkdir`` relative to the target's descriptor (it fails if the name exists, whatever it
  is), mode 0700, and opened ``O_NOFOLLOW``; it is renamed ``zfsbackd-restore_<timestamp>``
  only when everything is in, so that name always means a whole restore. From then on every entry is created relative to
  its parent directory's descriptor (``openat``/``mkdirat``/``mknodat``/``linkat``/
  ``symlinkat`` through ``dir_fd=``) and every directory is reopened one ``O_NOFOLLOW``
  step at a time: a directory swapped for a symlink while the restore runs cannot
  redirect a write, and paths longer than PATH_MAX restore.
- Every entry of a tree is checked before use: names (no ``/``, ``..``, ``.``, NUL,
  empty) and the fields that reach system calls, so a tampered tree is refused with its
  path named, never a crash.
- Symlinks are created last and never followed; directory metadata is applied deepest
  first, once everything inside exists, so directory mtimes come out right.
- The walk is iterative (an explicit stack): depth is bounded by the file system, not by
  Python's recursion limit.
- A failed restore is renamed ``zfsbackd-failed-restore_<timestamp>`` and the error says
  so. Errors of the target are classified with the path named: a full file system or
  quota is :class:`~zfsbackd.errors.RestoreTargetFull` (``InsufficientStorage``, with the
  bytes still needed and those available); anything else (read-only, permission, name
  too long, I/O error, …) is :class:`~zfsbackd.errors.RestoreError` with its cause and fix.
- An extended attribute the target cannot hold (too large, namespace unsupported, not
  permitted) is skipped, counted, logged with its path and reported in the result
  (``XattrsNotRestored``, ``Warnings``) — as the backup side skips attributes it cannot
  read: one attribute never costs the whole restore.
- ``--path`` selections are normalised first: identical ones count once, one inside
  another is dropped (the outer one restores it), ``/`` means everything; a path that
  is not in the backup fails before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import stat
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from zfsbackd import pools
from zfsbackd.config import Config
from zfsbackd.engine.progress import Progress
from zfsbackd.engine.restore_files import (
    FIXES,
    MAX_WARNINGS,
    BoundedJobs,
    FileWriter,
    RestoreTarget,
    describe,
)
from zfsbackd.engine.restore_workers import BatchFile, BatchOutcome, RestoreBatch, RestoreContext
from zfsbackd.engine.workers import WorkerPool, start_workers
from zfsbackd.errors import IntegrityError, RestoreError, ZfsbackdError
from zfsbackd.store.packcache import PackCache
from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import (
    READ_AHEAD_ENTRIES,
    ROOT_NAME,
    Node,
    TreeReadAhead,
    expected_entries,
    is_safe_name,
    node_name,
    node_target,
    parse_tree,
)

log = structlog.get_logger(__name__)

RESTORE_PREFIX = "zfsbackd-restore_"
FAILED_PREFIX = "zfsbackd-failed-restore_"
#: the name while the restore runs: a process killed mid-restore (SIGKILL, power cut) leaves a
#: directory whose name says it is not a restore, never a partial tree named like a finished one
INCOMPLETE_PREFIX = "zfsbackd-incomplete-restore_"
CACHED_DIR_FDS = 128  # directory descriptors kept open between uses, besides those in use
#: files whose reads are planned together (one PackCache), and a worker process's job: bounds the nodes and
#: blob ids held for it (the restore's process holds about three batches, a worker two). 300,000 small files
#: restored with one worker: 16,384 files 13.9 s and 285 MiB (both processes), 8,192 12.9 s / 220 MiB,
#: 4,096 12.1-13.1 s / 186 MiB, 2,048 13.3 s / 169 MiB, 1,024 13.3 s / 156 MiB
BATCH_FILES = 4_096
#: blobs whose reads are planned together: a batch spans a few packs of small files, so most packs are read whole
BATCH_BLOBS = 32_768
#: directories the files of one batch are in: a batch given to a worker process carries a descriptor of
#: each (one SCM_RIGHTS message holds at most 253), and the worker holds them open while it writes
BATCH_DIRS = 128
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_INT64 = 1 << 63
_UINT32 = 1 << 32


@dataclass
class RestoreResult:
    path: Path
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    xattrs_not_restored: int = 0
    warnings: list[str] = field(default_factory=list)
    """The first MAX_WARNINGS things not restored exactly, each with its path (all are counted)."""
    encryption: dict[str, str] | None = None
    """For a new ZFS dataset: its encryption as ZFS reports it (and a note when it was inherited)."""

    def to_api(self) -> dict[str, object]:
        out: dict[str, object] = {
            "Path": str(self.path),
            "Files": self.files,
            "Directories": self.directories,
            "Bytes": self.bytes,
            "XattrsNotRestored": self.xattrs_not_restored,
            "Warnings": list(self.warnings),
        }
        if self.encryption is not None:
            out["Encryption"] = self.encryption
        return out


@dataclass(slots=True)
class _Dir:
    """A directory of the restore, by its index in the directory table (0: the restore's root).

    Its metadata (node) waits in :class:`_Deferred`, not here: the table holds what reopening
    a directory needs, ~150 bytes per directory.
    """

    parent: int  # -1 for the root
    name: bytes
    rel: bytes  # path inside the backup, for messages
    depth: int


class _DirFds:
    """Descriptors of the restore's directories, by index in the directory table.

    A directory in use is pinned (the walk creating entries in it, a file job creating
    its file there, the finish linking into it); up to ``cache`` unpinned ones stay open
    for their next use. So a restore of millions of directories, or of thousands
    nested, holds a bounded number of descriptors. A directory that is not open is
    reopened from its nearest open ancestor, one ``O_NOFOLLOW`` step at a time — never
    through a path, which a concurrent rename or symlink could redirect.
    """

    def __init__(self, dirs: list[_Dir], root_fd: int, cache: int = CACHED_DIR_FDS) -> None:
        self._dirs = dirs
        self._fds: dict[int, int] = {0: root_fd}
        self._pins: dict[int, int] = {0: 1}  # the root is the caller's: never closed here
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._cache = cache
        self._lock = threading.Lock()

    def pin(self, index: int) -> int:
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                fd = self._open(index)
            else:
                self._idle.pop(index, None)
            self._pins[index] = self._pins.get(index, 0) + 1
            return fd

    def unpin(self, index: int) -> None:
        with self._lock:
            left = self._pins[index] - 1
            if left:
                self._pins[index] = left
                return
            del self._pins[index]
            self._idle[index] = None
            self._trim()

    def close_all(self) -> None:
        """Close every descriptor but the root's (jobs are over)."""
        with self._lock:
            for index, fd in self._fds.items():
                if index != 0:
                    os.close(fd)
            self._fds = {0: self._fds[0]}
            self._idle.clear()

    def _open(self, index: int) -> int:
        """Open ``index`` (lock held): climb to the nearest open ancestor, then step down."""
        chain = []
        while index not in self._fds:
            chain.append(index)
            index = self._dirs[index].parent
        fd = self._fds[index]
        for step in reversed(chain):
            fd = os.open(self._dirs[step].name, _DIR_FLAGS, dir_fd=fd)
            self._fds[step] = fd
            self._idle[step] = None  # ancestors stay cached; the caller pins the last one
        self._idle.pop(chain[0])
        self._trim()
        return fd

    def _trim(self) -> None:
        while len(self._idle) > self._cache:
            index, _ = self._idle.popitem(last=False)
            os.close(self._fds.pop(index))


#: files of a batch: (directory index, name, node, path)
_Batch = list[tuple[int, bytes, Node, bytes]]


class _Deferred:
    """What a restore does once every regular file exists — hard links, symlinks, directory metadata —
    kept in SQLite in a private temporary directory rather than in memory.

    These grow with the backup (a tree of millions of symlinks or hard links, the first
    link of every hard-linked inode, every directory's node), and memory must not
    (DESIGN invariant 9). The file is written without a journal or syncs: it is scratch,
    deleted with the restore, and only ever read by the process that wrote it. Used from
    the walk's thread only.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="zfsbackd-restore-")
        try:
            self._db = sqlite3.connect(os.path.join(self._dir.name, "deferred.sqlite"), isolation_level=None)
            self._db.executescript(
                """
                PRAGMA journal_mode = OFF;
                PRAGMA synchronous = OFF;
                PRAGMA cache_size = -4096;
                CREATE TABLE first_links (link INTEGER PRIMARY KEY, parent INTEGER, name BLOB);
                CREATE TABLE hardlinks (first_parent INTEGER, first_name BLOB, parent INTEGER, name BLOB, rel BLOB);
                CREATE TABLE symlinks (parent INTEGER, name BLOB, node TEXT, rel BLOB);
                CREATE TABLE dirs (dir INTEGER PRIMARY KEY, depth INTEGER, node TEXT);
                CREATE INDEX dirs_by_depth ON dirs (depth);
                BEGIN;
                """
            )
        except BaseException:
            self._dir.cleanup()
            raise

    def first_link(self, link: int, parent: int, name: bytes) -> tuple[int, bytes] | None:
        """Where the inode ``link`` was restored first, or None: then it is this (parent, name)."""
        row = self._db.execute("SELECT parent, name FROM first_links WHERE link = ?", (link,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO first_links VALUES (?, ?, ?)", (link, parent, name))
            return None
        return row[0], row[1]

    def add_hardlink(self, first: tuple[int, bytes], parent: int, name: bytes, rel: bytes) -> None:
        self._db.execute("INSERT INTO hardlinks VALUES (?, ?, ?, ?, ?)", (*first, parent, name, rel))

    def add_symlink(self, parent: int, name: bytes, node: Node, rel: bytes) -> None:
        self._db.execute("INSERT INTO symlinks VALUES (?, ?, ?, ?)", (parent, name, json.dumps(node), rel))

    def add_dir(self, index: int, depth: int, node: Node) -> None:
        self._db.execute("INSERT INTO dirs VALUES (?, ?, ?)", (index, depth, json.dumps(node)))

    def hardlinks(self) -> Iterator[tuple[int, bytes, int, bytes, bytes]]:
        """(first parent, first name, parent, name, path), in the order they were met."""
        yield from self._db.execute("SELECT * FROM hardlinks ORDER BY rowid")

    def symlinks(self) -> Iterator[tuple[int, bytes, Node, bytes]]:
        for parent, name, node, rel in self._db.execute("SELECT * FROM symlinks ORDER BY rowid"):
            yield parent, name, json.loads(node), rel

    def dirs_deepest_first(self) -> Iterator[tuple[int, Node]]:
        for index, node in self._db.execute("SELECT dir, node FROM dirs ORDER BY depth DESC, dir"):
            yield index, json.loads(node)

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


@dataclass
class _Selection:
    """One ``--path`` resolved: its components and the nodes along it (the last one is restored)."""

    raw: str
    parts: tuple[bytes, ...]
    chain: list[Node]


def split_request_path(raw: str, backup_id: str) -> list[bytes]:
    """``--path`` value → safe name components (a leading ``/`` means the backup root)."""
    parts = [p for p in os.fsencode(raw).split(b"/") if p and p != b"."]
    if not parts:
        return []
    for part in parts:
        if not is_safe_name(part):
            raise RestoreError(
                f"--path {raw!r}: the component {os.fsdecode(part)!r} is not allowed; "
                f"give a path inside backup {backup_id}, e.g. `home/alice/report.txt`"
            )
    return parts


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value < high


def _is_hex(value: object) -> bool:
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def _node_problem(node: Node) -> str | None:
    """What is wrong with a tree entry's fields, or None.

    A tree is authenticated, so only someone with the key can make a bad one; but a
    wrong field must still be an ``IntegrityError`` naming the entry, never a crash
    (exit 1 is for bugs) and never a system call with a surprising argument.
    """
    kind = node.get("type")
    if kind not in ("file", "dir", "symlink", "chardev", "blockdev"):
        return f"has unknown type {kind!r}"
    if not (_is_int(node.get("mode"), 0, _UINT32) and _is_int(node.get("uid"), 0, _UINT32)):
        return "has no valid mode or owner"
    if not (_is_int(node.get("gid"), 0, _UINT32) and _is_int(node.get("mtime_ns"), -_INT64, _INT64)):
        return "has no valid group or modification time"
    xattrs = node.get("xattrs", [])
    if not isinstance(xattrs, list) or not all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) for v in x) for x in xattrs
    ):
        return "has malformed extended attributes"
    if kind == "dir":
        return None if _is_hex(node.get("subtree")) else "is a directory without a valid subtree"
    if kind == "symlink":
        try:
            node_target(node)
        except (KeyError, TypeError, ValueError):
            return "is a symlink without a valid target"
        return None
    if kind != "file":
        return None if _is_int(node.get("rdev"), 0, _INT64) else "is a device without a valid number"
    chunks = node.get("chunks", [])
    if not _is_int(node.get("size"), 0, _INT64) or not isinstance(chunks, list):
        return "is a file without a valid size or chunk list"
    if not _is_int(node.get("hardlink", 0), 0, _INT64):
        return "is a file with a malformed hard link key"
    for chunk in chunks:
        if not (
            isinstance(chunk, list)
            and len(chunk) == 3
            and _is_int(chunk[0], 0, _INT64)
            and _is_int(chunk[1], 0, _INT64)
            and _is_hex(chunk[2])
        ):
            return f"is a file with a malformed chunk {chunk!r:.80}"
    return None


def open_target(target: Path) -> tuple[int, Path]:
    """Open ``--target`` for a restore: ``(descriptor, real path)``, or a RestoreError that says what to do.

    Refused: a symlink as the last component (that is where one points a restore, and
    a link to ``/`` made it land in ``/``), a missing target, a non-directory, a
    read-only file system. Symlinks above the target are resolved by the kernel, once:
    the real path is what the result reports.
    """
    raw = os.fsencode(target).rstrip(b"/") or b"/"  # a trailing slash makes the kernel follow a final symlink
    try:
        fd = os.open(raw, _DIR_FLAGS)
    except OSError as exc:
        raise _target_refused(target, exc) from None
    try:
        if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
            raise RestoreError(
                f"--target {target} is on a read-only file system; remount it read-write or give another --target"
            )
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # no /proc: the same answer, by path
            real = Path(os.path.realpath(target))
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def _target_refused(target: Path, exc: OSError) -> RestoreError:
    try:
        st: os.stat_result | None = os.lstat(target)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):  # ELOOP from O_NOFOLLOW
        return RestoreError(
            f"--target {target} is a symlink (to {os.fsdecode(os.readlink(target))}); a restore never follows "
            f"one, so that it cannot be redirected: give the directory itself, e.g. --target "
            f"{os.path.realpath(target)}"
        )
    if exc.errno == errno.ENOENT:
        return RestoreError(
            f"--target {target} does not exist; create it first (`mkdir -p {target}`) or give an existing "
            "directory (the restore goes into a new subdirectory of it)"
        )
    if exc.errno == errno.ENOTDIR:
        what = "is not a directory" if st is not None else "has a component that is not a directory"
        return RestoreError(
            f"--target {target} {what}; give an existing directory (the restore goes into a new subdirectory of it)"
        )
    fix = FIXES.get(exc.errno or 0, "give another --target")
    return RestoreError(f"--target {target} cannot be opened: {describe(exc)}; {fix}")


def check_target(target: Path | None) -> Path:
    """The real path of a usable ``--target``: the checks :meth:`Restorer.run` makes again on its
    descriptor, made before the store is read, so a bad target fails fast and changes nothing."""
    if target is None:
        raise RestoreError("give --target DIR (an existing directory) or --target-dataset POOL/NAME")
    fd, real = open_target(target)
    os.close(fd)
    return real


def _stray_entry(dest: Path, mount_points: set[Path]) -> Path | None:
    """Something in ``dest`` other than ``mount_points`` and the directories leading to them (all empty)."""
    for entry in dest.iterdir():
        if entry.name == ".zfs":
            continue  # ZFS's control directory (listed with snapdir=visible)
        on_the_way = not entry.is_symlink() and entry.is_dir() and any(m.is_relative_to(entry) for m in mount_points)
        stray = _stray_entry(entry, mount_points) if on_the_way else entry
        if stray is not None:
            return stray
    return None


def _rename_own(parent_fd: int, dir_fd: int, name: str, new_name: str) -> None:
    """Rename ``name`` in ``parent_fd`` to ``new_name`` only if it is still the directory open as
    ``dir_fd`` (another process may have replaced it) and ``new_name`` is free (a rename onto an
    empty directory would silently replace it)."""
    ours, there = os.fstat(dir_fd), os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
        raise FileNotFoundError(errno.ENOENT, f"{name} was replaced by another process")
    try:
        os.stat(new_name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(name, new_name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        return
    raise FileExistsError(errno.EEXIST, f"{new_name} already exists")


def _remove_empty(dir_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _subtrees(nodes: list[Node], rel: bytes) -> list[tuple[str, bytes, int]]:
    """The subdirectories' trees of the directory ``rel``, in tree order (the walk's), each with its path.

    Runs before the entries are checked (the walk checks them): a malformed one is passed over.
    """
    found = []
    for node in nodes:
        try:
            if node.get("type") == "dir" and _is_hex(node.get("subtree")):
                found.append((node["subtree"], _join(rel, node_name(node)), expected_entries(node)))
        except (KeyError, TypeError, ValueError):
            continue
    return found


class Restorer:
    def __init__(
        self,
        store: Store,
        record: BackupRecord,
        target: Path,
        paths: list[str] | None = None,
        *,
        progress: Progress | None = None,
        workers: int = pools.RESTORE_WORKERS,
        config_for_workers: Config | None = None,
        processes: int | None = None,
        read_ahead_entries: int = READ_AHEAD_ENTRIES,
    ) -> None:
        """*read_ahead_entries* bounds the tree entries read ahead of the walk and not yet used. With
        *config_for_workers* (this store's config: a worker opens the store itself), a restore that has batched
        ``pools.PARALLEL_AFTER_ENTRIES`` files starts worker processes (*processes* in all, this one included; default
        ``pools.RESTORE_PROCESSES``) and gives them batches (zfsbackd.engine.restore_workers)."""
        self.store = store
        self.record = record
        self.target = target
        self.paths = paths or []
        self.progress = progress or Progress(total_bytes=record.size_in_bytes)
        self.workers = workers
        self._root: Node | None = None
        self._starts: list[tuple[str, bytes]] = []  # (tree id, path) of the directories restored, in order
        self._read_ahead: TreeReadAhead[bytes, list[Node]] | None = None
        self.read_ahead_entries = read_ahead_entries
        self.read_ahead_peak_entries = 0
        """The most tree entries held by the read-ahead at once (tests check the bound with it)."""
        self._batch: _Batch = []  # files waiting for their reads to be planned
        self._batch_blobs = 0
        self._batch_dirs = 0  # directories the batch's files are in (a directory met twice counts twice)
        self._batch_parent = -1  # the directory of the batch's last file
        self._config_for_workers = config_for_workers  # None: no worker processes (or they were started)
        self._processes = processes
        self._pool: WorkerPool | None = None  # worker processes, once the restore is large
        self._sent: deque[Future[BatchOutcome]] = deque()  # batches given to workers, oldest first
        self._planned: tuple[_Batch, Future[PackCache]] | None = None  # the batch planned, to write next
        self._planner: ThreadPoolExecutor  # plans the next batch's reads (set while a restore runs)
        self._deferred: _Deferred | None = None
        self._dirs: list[_Dir] = []
        self._fds: _DirFds | None = None
        self._on_the_way: dict[bytes, int] = {}  # directories created to reach a --path
        self._existing_dirs: frozenset[bytes] = frozenset()  # run_into: the children's mount points
        self._result = RestoreResult(path=target)
        self._target = RestoreTarget(record.backup_id, target, target)
        self._writer: FileWriter | None = None  # set while the restore runs

    # ----------------------------------------------------------------- entry
    def run(self) -> RestoreResult:
        """Restore into a new ``zfsbackd-restore_<UTC timestamp>`` below the target.

        The restore is written under ``zfsbackd-incomplete-restore_<timestamp>`` and
        renamed to its final name only once everything is in, so a directory named
        ``zfsbackd-restore_*`` is always a whole restore, also after a SIGKILL. Any
        failure leaves the partial restore renamed ``zfsbackd-failed-restore_<timestamp>``
        (also when the backup's trees could not be read: the name says "this is not a
        restore"), except a ``--path`` refused before anything was written: a bad request
        leaves nothing behind.
        """
        target_fd, real_target = open_target(self.target)
        try:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            name, final = f"{INCOMPLETE_PREFIX}{stamp}", f"{RESTORE_PREFIX}{stamp}"
            self._target.dest_path, self._target.target_path = real_target / name, real_target
            self._target.space_fd = target_fd
            with self._target.on_target("create the restore directory", None):
                os.mkdir(name, 0o700, dir_fd=target_fd)
                dest_fd = os.open(name, _DIR_FLAGS, dir_fd=target_fd)
            prepared = False
            try:
                selection = self._prepare()
                prepared = True
                self._restore_into(dest_fd, selection)
                with self._target.on_target("give the restore directory its final name", None):
                    _rename_own(target_fd, dest_fd, name, final)
                self._result.path = self._target.dest_path = real_target / final
            except BaseException as exc:
                if prepared or not isinstance(exc, RestoreError) or not _remove_empty(target_fd, name):
                    self._keep_failed(target_fd, dest_fd, name, f"{FAILED_PREFIX}{stamp}", exc)
                raise
            finally:
                os.close(dest_fd)
        finally:
            os.close(target_fd)
        return self._result

    def run_into(self, dest: Path, mount_points: Sequence[Path] = ()) -> RestoreResult:
        """Restore into ``dest``, an existing empty directory (the root of a new ZFS dataset).

        ``mount_points`` are empty file systems mounted below ``dest`` (a recursive
        backup's children, recreated): the only things ``dest`` may already hold.
        The root's own metadata is applied to ``dest``; the caller deals with a
        failure (for a dataset: renaming it out of the way).
        """
        stray = _stray_entry(dest, set(mount_points))
        if stray is not None:
            raise RestoreError(f"{dest} is not empty ({stray} exists); a restore goes into a new, empty dataset")
        existing = set()
        for mount in mount_points:
            rel = mount.relative_to(dest)
            existing.update(os.fsencode(p) for p in (rel, *rel.parents) if p != Path("."))
        self._existing_dirs = frozenset(existing)
        selection = self._prepare()
        self._target.dest_path = self._target.target_path = dest
        with self._target.on_target("open the restore directory", None):
            fd = os.open(dest, _DIR_FLAGS)
        try:
            self._restore_into(fd, selection)
        finally:
            os.close(fd)
        return self._result

    def _keep_failed(self, target_fd: int, dest_fd: int, name: str, failed: str, exc: BaseException) -> None:
        """Rename the partial restore ``failed`` — only if ``name`` is still the directory this restore made."""
        where = self._target.dest_path.parent / failed
        try:
            _rename_own(target_fd, dest_fd, name, failed)
        except OSError as rename_error:
            where = self._target.dest_path
            log.error("restore_failed_not_renamed", path=str(where), error=str(rename_error))
        log.error("restore_failed", backup_id=self.record.backup_id, path=str(where), error=str(exc))
        if isinstance(exc, ZfsbackdError):
            exc.message = f"{exc.message} (partial restore left in {where})"
            exc.args = (exc.message,)

    # --------------------------------------------------------------- prepare
    def _prepare(self) -> list[_Selection] | None:
        """Resolve the ``--path`` selections (None: everything) and note where the walk starts."""
        what = f"backup {self.record.backup_id}"
        root_nodes = parse_tree(
            self.store.read_tree(bytes.fromhex(self.record.root_tree or ""), what=what), what=f"{what} root"
        )
        root = next((n for n in root_nodes if n.get("name") == ROOT_NAME), None)
        if root is None or root.get("type") != "dir" or _node_problem(root) is not None:
            raise IntegrityError(f"{what}: root tree has no valid root entry")
        unique = {tuple(split_request_path(raw, self.record.backup_id)): raw for raw in self.paths}
        selections = [_Selection(raw, parts, self._resolve(root, parts, raw)) for parts, raw in sorted(unique.items())]
        if not selections or () in unique:
            self._root = root
            self._plan_starts([(root, b"")])
            return None
        kept = []
        for sel in selections:
            outer = next((unique[sel.parts[:i]] for i in range(1, len(sel.parts)) if sel.parts[:i] in unique), None)
            if outer is None:
                kept.append(sel)
            else:
                log.info("restore_path_inside_another", path=sel.raw, inside=outer)
        self._plan_starts([(sel.chain[-1], b"/".join(sel.parts)) for sel in kept])
        return kept

    def _resolve(self, root: Node, parts: tuple[bytes, ...], raw: str) -> list[Node]:
        """The nodes from the root along ``parts`` (the root itself for ``/``)."""
        chain, node, rel = [root], root, b""
        for part in parts:
            child = None
            if node.get("type") == "dir":
                child = next((n for n in self._tree(node["subtree"], rel) if node_name(n) == part), None)
            if child is None:
                raise RestoreError(
                    f"--path {raw!r} is not in backup {self.record.backup_id}; list the backup's files with a full "
                    "restore or check the spelling (paths are relative to the backed-up file system's root)"
                )
            chain.append(child)
            node, rel = child, _join(rel, part)
        return chain[1:] if parts else chain

    def _tree(self, tree_id: str, rel: bytes) -> list[Node]:
        """The checked entries of the directory ``rel`` (from the read-ahead when there is one)."""
        nodes = self._read_ahead.take(tree_id) if self._read_ahead is not None else None
        if nodes is None:
            nodes = self._read_tree(tree_id, rel)
        for node in nodes:
            self._check(node, rel)
        return nodes

    def _read_tree(self, tree_id: str, rel: bytes) -> list[Node]:
        what = f"backup {self.record.backup_id}: directory /{os.fsdecode(rel)}"
        return parse_tree(self.store.read_tree(bytes.fromhex(tree_id), what=what), what=what)

    def _check(self, node: Node, parent: bytes) -> None:
        try:
            name = node_name(node)
        except (KeyError, TypeError, ValueError):
            name = b""
        where = f"backup {self.record.backup_id}: directory /{os.fsdecode(parent)}"
        if not is_safe_name(name):
            raise RestoreError(
                f"{where} holds an unsafe entry name {name!r}; refusing to restore it (the backup may have been "
                "tampered with; run `zfsbackd check --read-data`)"
            )
        problem = _node_problem(node)
        if problem is not None:
            raise IntegrityError(
                f"backup {self.record.backup_id}: /{os.fsdecode(_join(parent, name))} {problem}; the backup "
                "may have been tampered with: run `zfsbackd check --read-data`"
            )

    def _plan_starts(self, starts: Sequence[tuple[Node, bytes]]) -> None:
        """Note the trees the walk starts from and the bytes it will write (for a "target full" message).

        Nothing below is read here: the walk streams the trees through a bounded read-ahead
        (:class:`~zfsbackd.store.tree.TreeReadAhead`), and plans pack reads batch by batch,
        so a restore holds neither a whole backup's trees nor every blob id at once. The
        bytes come from the directories' totals (``tree_bytes``, sizes with holes and hard
        links counted): an estimate, which is all the message needs.
        """
        for node, rel in starts:
            if node.get("type") == "dir":
                if _is_hex(node.get("subtree")):
                    self._starts.append((node["subtree"], rel))
                planned = node.get("tree_bytes", 0)
            else:
                planned = node.get("size", 0)
            if _is_int(planned, 0, _INT64):
                self._target.planned_bytes += planned

    # ----------------------------------------------------------------- walk
    def _restore_into(self, root_fd: int, selection: list[_Selection] | None) -> None:
        result = self._result = RestoreResult(path=self._target.dest_path)
        self._dirs = [_Dir(-1, b"", b"", 0)]
        self._fds = _DirFds(self._dirs, root_fd)
        self._target.space_fd = root_fd
        self._deferred = deferred = _Deferred()
        try:
            if selection is None:  # the root's own metadata; a partial restore's root stays as created
                assert self._root is not None
                deferred.add_dir(0, 0, self._root)
            with (
                ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zfsbackd-restore") as pool,
                ThreadPoolExecutor(
                    max_workers=pools.RESTORE_FETCH_WORKERS, thread_name_prefix="zfsbackd-fetch"
                ) as fetch_pool,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="zfsbackd-plan") as self._planner,
            ):
                self._writer = FileWriter(self.store, self._target, self.progress, fetch_pool)
                jobs = BoundedJobs(pool)
                try:
                    read_ahead = TreeReadAhead(
                        self._read_tree, _subtrees, len, self._starts, max_entries=self.read_ahead_entries
                    )
                    with read_ahead as self._read_ahead:
                        if selection is None:
                            assert self._root is not None
                            self._walk(jobs, 0, self._root)
                        for sel in selection or ():
                            parent = self._dirs_on_the_way(sel)
                            fd = self._pin(parent)
                            try:
                                new_dir = self._create(jobs, parent, fd, sel.chain[-1])
                            finally:
                                self._fds.unpin(parent)
                            if new_dir is not None:
                                self._walk(jobs, new_dir, sel.chain[-1])
                    self._read_ahead = None
                    self.read_ahead_peak_entries = read_ahead.peak_entries
                    self._dispatch(jobs, last=True)
                    result.bytes += jobs.wait()
                    if self._pool is not None:  # every batch written before the links and metadata
                        self._collect_sent(wait=True)
                        self._pool.finish()
                except BaseException:
                    self._read_ahead = None
                    jobs.cancel()  # the pools wait for queued jobs on the way out: let them skip
                    raise
            self._finish()
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._fds.close_all()
            deferred.close()
            self._deferred = None
        result.xattrs_not_restored, result.warnings = self._writer.xattrs_not_restored, self._writer.warnings
        if result.xattrs_not_restored > MAX_WARNINGS:
            log.warning(
                "xattrs_not_restored",
                backup_id=self.record.backup_id,
                count=result.xattrs_not_restored,
                logged=MAX_WARNINGS,
            )

    def _walk(self, jobs: BoundedJobs, start: int, node: Node) -> None:
        """Create everything below directory ``start``: pre-order, in tree order, with a stack instead of
        recursion (depth is bounded by the file system, not by Python).

        Tree order is the order the backup wrote the data in, so the packs are read front to back and
        each one is let go of as soon as its last blob is written; another order would hold many at once.
        A directory's descriptor is pinned only while entries are created in it, not while its
        subdirectories are walked: a deep tree holds a bounded number of descriptors.
        """
        stack = [(start, iter(self._tree(node["subtree"], self._dirs[start].rel)))]
        while stack:
            index, children = stack[-1]
            fd = self._pin(index)
            try:
                for child in children:
                    new_dir = self._create(jobs, index, fd, child)
                    if new_dir is not None:
                        stack.append((new_dir, iter(self._tree(child["subtree"], self._dirs[new_dir].rel))))
                        break
                else:
                    stack.pop()
            finally:
                self._fds.unpin(index)

    def _create(self, jobs: BoundedJobs, parent: int, parent_fd: int, node: Node) -> int | None:
        """Create ``node`` in directory ``parent`` (or plan it); a new directory's index is returned, to walk."""
        assert self._fds is not None
        name = node_name(node)
        rel = _join(self._dirs[parent].rel, name)
        kind = node["type"]
        result = self._result
        if kind == "dir":
            self._mkdir(parent_fd, name, rel)
            result.directories += 1
            return self._add_dir(parent, name, rel, node)
        deferred = self._deferred
        assert deferred is not None
        if kind == "file":
            link = node.get("hardlink")
            first = deferred.first_link(link, parent, name) if link is not None else None
            if first is not None:
                deferred.add_hardlink(first, parent, name, rel)
            else:
                self._batch.append((parent, name, node, rel))
                self._batch_blobs += len(node.get("chunks", ()))
                if parent != self._batch_parent:
                    self._batch_parent = parent
                    self._batch_dirs += 1
                if (
                    len(self._batch) >= BATCH_FILES
                    or self._batch_blobs >= BATCH_BLOBS
                    or self._batch_dirs >= BATCH_DIRS
                ):
                    self._dispatch(jobs)
            result.files += 1
        elif kind == "symlink":
            deferred.add_symlink(parent, name, node, rel)
            result.symlinks += 1
        else:
            self._make_device(parent_fd, name, node, rel)
        return None

    def _dispatch(self, jobs: BoundedJobs, *, last: bool = False) -> None:
        """Plan the pack reads of the files batched so far (one PackCache for them); write the batch before.

        Planning per batch rather than for the whole restore keeps what the plan holds
        (the batch's nodes, its blob ids, the PackCache's counters) bounded; the batches
        follow tree order, which is the order the backup wrote the data in, so each
        batch's blobs sit in a few packs, most of them read whole. A pack split between
        two batches is read for each of them. A batch is planned on the planner thread
        while the one before it is written, so that the writers do not wait for the plan
        (an index lookup per blob): at most two batches are held at once.
        """
        batch, self._batch, self._batch_blobs = self._batch, [], 0
        self._batch_dirs, self._batch_parent = 0, -1
        if not last and self._config_for_workers is not None and self._result.files >= pools.PARALLEL_AFTER_ENTRIES:
            self._start_workers()
        if self._pool is not None:
            self._collect_sent(wait=False)
            if batch and self._send(batch):
                batch = []
        ready, self._planned = self._planned, None
        if batch:
            blobs = (bytes.fromhex(c[2]) for entry in batch for c in entry[2].get("chunks", ()))
            self._planned = (batch, self._planner.submit(PackCache, self.store, blobs))
        to_write = [ready] if ready is not None else []
        if last and self._planned is not None:
            to_write.append(self._planned)
            self._planned = None
        assert self._writer is not None and self._fds is not None
        for files, plan in to_write:
            # each file's directory is pinned until it is written; a submit that raises means the restore
            # is over, and close_all() closes what is still pinned
            pinned = ((parent, self._pin(parent), name, node, rel) for parent, name, node, rel in files)
            self._writer.submit(jobs, plan.result(), pinned, self._fds.unpin)

    # ------------------------------------------------------- worker processes
    def _start_workers(self) -> None:
        """The restore is large: from now on batches go to worker processes that have room."""
        config, self._config_for_workers = self._config_for_workers, None  # tried once, whatever happens
        processes = self._processes if self._processes is not None else pools.RESTORE_PROCESSES
        if config is None or processes < 2:
            return
        target = self._target
        context = RestoreContext(
            config, self.store.region, self.record.backup_id, target.dest_path, target.target_path, target.planned_bytes
        )
        self._pool = start_workers(context, processes - 1, self.progress, backup_id=self.record.backup_id)

    def _send(self, batch: _Batch) -> bool:
        """Give *batch* to a worker process with room, with a descriptor of each of its files' directories;
        False when none has room (this process writes it)."""
        assert self._pool is not None and self._fds is not None
        if not self._pool.has_room():
            return False
        keys: dict[int, int] = {}
        fds: list[int] = []
        files: list[BatchFile] = []
        try:
            for parent, name, node, rel in batch:
                key = keys.get(parent)
                if key is None:
                    fd = self._pin(parent)
                    try:
                        with self._target.on_target("open the directory", self._dirs[parent].rel):
                            fds.append(os.dup(fd))
                    finally:
                        self._fds.unpin(parent)
                    key = keys[parent] = len(fds) - 1
                files.append((key, name, node, rel))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._sent.append(self._pool.submit(RestoreBatch(files, self._target.bytes_done), fds))
        return True

    def _collect_sent(self, *, wait: bool) -> None:
        """Count the batches workers have written (all of them, waiting, when *wait*); a batch's error (a
        full target, a damaged blob, a worker that died) is raised here and fails the restore."""
        assert self._writer is not None
        while self._sent and (wait or self._sent[0].done()):
            outcome = self._sent.popleft().result()
            self._result.bytes += outcome.bytes
            self._writer.add_not_restored(outcome.xattrs_not_restored, outcome.warnings)

    def _add_dir(self, parent: int, name: bytes, rel: bytes, node: Node) -> int:
        assert self._deferred is not None
        depth = self._dirs[parent].depth + 1
        self._dirs.append(_Dir(parent, name, rel, depth))
        self._deferred.add_dir(len(self._dirs) - 1, depth, node)
        return len(self._dirs) - 1

    def _mkdir(self, parent_fd: int, name: bytes, rel: bytes) -> None:
        """A new directory, private (0700) until its metadata is applied at the end."""
        with self._target.on_target("create the directory", rel):
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                if rel not in self._existing_dirs:
                    raise
                # a child dataset's mount point (restore to ZFS): opened O_NOFOLLOW like any other directory

    def _dirs_on_the_way(self, sel: _Selection) -> int:
        """The directories leading to a ``--path`` (created once, with their own metadata applied at the end)."""
        parent, rel = 0, b""
        for part, node in zip(sel.parts[:-1], sel.chain[:-1], strict=True):
            rel = _join(rel, part)
            index = self._on_the_way.get(rel)
            if index is None:
                fd = self._pin(parent)
                try:
                    self._mkdir(fd, part, rel)
                finally:
                    self._fds.unpin(parent)
                index = self._on_the_way[rel] = self._add_dir(parent, part, rel, node)
            parent = index
        return parent

    def _pin(self, index: int) -> int:
        assert self._fds is not None
        with self._target.on_target("open the directory", self._dirs[index].rel):
            return self._fds.pin(index)

    def _make_device(self, parent_fd: int, name: bytes, node: Node, rel: bytes) -> None:
        """``mknod`` relative to the parent, then metadata through an ``O_PATH`` descriptor (opening a
        device would open the device itself)."""
        dev_type = stat.S_IFCHR if node["type"] == "chardev" else stat.S_IFBLK
        with self._target.on_target("create the device", rel):
            os.mknod(name, dev_type | 0o600, node["rdev"], dir_fd=parent_fd)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != dev_type:
                raise self._target.error(OSError(errno.ENOENT, "replaced"), "set the metadata of", rel)
            self._writer.apply_metadata(f"/proc/self/fd/{fd}", node, rel)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ file data
    # --------------------------------------------------------------- finish
    def _finish(self) -> None:
        """Hard links, then symlinks, then directory metadata deepest first (so that setting a
        directory's mtime is the last change inside it)."""
        assert self._fds is not None
        assert self._deferred is not None
        for first_parent, first_name, parent, name, rel in self._deferred.hardlinks():
            first_fd = self._pin(first_parent)
            try:
                fd = self._pin(parent)
                try:
                    with self._target.on_target("create the hard link", rel):
                        os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=fd, follow_symlinks=False)
                finally:
                    self._fds.unpin(parent)
            finally:
                self._fds.unpin(first_parent)
        for parent, name, node, rel in self._deferred.symlinks():
            fd = self._pin(parent)
            try:
                with self._target.on_target("create the symlink", rel):
                    os.symlink(node_target(node), name, dir_fd=fd)
                    os.chown(name, node["uid"], node["gid"], dir_fd=fd, follow_symlinks=False)
                    os.utime(name, ns=(node["mtime_ns"], node["mtime_ns"]), dir_fd=fd, follow_symlinks=False)
            finally:
                self._fds.unpin(parent)
        for index, node in self._deferred.dirs_deepest_first():
            fd = self._pin(index)
            try:
                self._writer.apply_metadata(fd, node, self._dirs[index].rel)
            finally:
                self._fds.unpin(index)
