"""What every snapshot provider offers the archiver, and the small system calls they share.

A :class:`Snapshot` is a directory the archiver walks plus :meth:`Snapshot.open_file`,
which hands back a :class:`FrozenFile`: an fd whose content matches its ``stat``.
Providers differ only in how strong that promise is (``atomic``):

* btrfs: the whole tree is one read-only point-in-time image;
* reflink: each file is cloned when opened, so every file is point-in-time but the
  tree as a whole is not;
* copy: the live file is read, and :meth:`FrozenFile.changed` reports whether it
  moved underneath us so the archiver can record that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import structlog

from zfsbackd.errors import SnapshotError
from zfsbackd.store.tree import Node, node_name

log = structlog.get_logger(__name__)

# statfs(2) f_type values (linux/magic.h) of the file systems people actually point us at.
BTRFS_MAGIC = 0x9123683E
XFS_MAGIC = 0x58465342
ZFS_MAGIC = 0x2FC12FC1
FS_TYPE_NAMES: dict[int, str] = {
    BTRFS_MAGIC: "btrfs",
    XFS_MAGIC: "xfs",
    ZFS_MAGIC: "zfs",
    0xEF53: "ext4",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x47504653: "gpfs",
    0x0BD00BD0: "lustre",
    0xF2F52010: "f2fs",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
    0x7366746E: "ntfs3",
    0x5346544E: "ntfs",
    0x73717368: "squashfs",
    0x52654973: "reiserfs",
    0x3153464A: "jfs",
    0x24051905: "ubifs",
}

# The inode number of every btrfs subvolume root (BTRFS_FIRST_FREE_OBJECTID).
BTRFS_SUBVOLUME_INO = 256

# openat2(2): one syscall that opens a path strictly beneath a directory fd, following
# no symlinks anywhere, so a live tree being renamed under us cannot make us read a file
# outside the file system being backed up. Same number on every Linux architecture.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
# O_NONBLOCK: a file swapped for a FIFO between walk and open must not hang the backup.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class _StatFs(ctypes.Structure):
    """struct statfs as far as we need it: f_type is its first member (a long on Linux).

    The padding covers the rest of the struct (120 bytes on 64-bit Linux) with room to
    spare, so the kernel never writes past our buffer.
    """

    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def fs_type(path: str | os.PathLike[str]) -> int:
    """The statfs(2) ``f_type`` of the file system holding *path* (``os.statvfs`` lacks it)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return buf.f_type & 0xFFFFFFFF  # the kernel's value is unsigned; a C long may show it negative


def fs_type_name(f_type: int) -> str:
    return FS_TYPE_NAMES.get(f_type, f"an unknown file system (f_type {f_type:#x})")


class FileSystemSource(Protocol):
    """The part of a configured file system (``config.FileSystemConfig``) snapshots need.

    Read-only properties so that frozen dataclasses satisfy it.
    """

    @property
    def id(self) -> str: ...
    @property
    def source_path(self) -> Path | None: ...
    @property
    def source_zfs(self) -> str | None: ...
    @property
    def allow_copy_snapshots(self) -> bool: ...
    @property
    def pre_snapshot(self) -> tuple[str, ...] | None: ...
    @property
    def post_snapshot(self) -> tuple[str, ...] | None: ...
    @property
    def hook_timeout_seconds(self) -> int: ...


class FileChangedError(OSError):
    """A file kept changing (or changed type) while we tried to freeze it.

    An ``OSError`` so the archiver can treat it like any other per-file read problem:
    record it against the path and go on with the rest of the tree.
    """


def source_dir(fs: FileSystemSource) -> Path:
    """The resolved source directory of *fs*, or a :class:`SnapshotError` saying what is wrong."""
    if fs.source_zfs is not None:
        raise SnapshotError(
            f"file_systems[{fs.id}]: source zfs: {fs.source_zfs} is a dataset, not a directory; only the zfs "
            "provider can snapshot it"
        )
    if fs.source_path is None:
        raise SnapshotError(f"file_systems[{fs.id}]: no source configured; set source: {{path: /dir}}")
    path = Path(os.path.realpath(fs.source_path))
    if not path.exists():
        raise SnapshotError(
            f"file_systems[{fs.id}]: source path {fs.source_path} does not exist; "
            "create it or mount the file system there"
        )
    if not path.is_dir():
        raise SnapshotError(f"file_systems[{fs.id}]: source path {fs.source_path} is not a directory")
    return path


#: errnos that mean the source file system (or the quota on it) is full
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space_error(fs_id: str, path: os.PathLike[str] | str, what: str) -> SnapshotError:
    """The snapshot of *path* cannot be taken because its file system is full: where, and what to do.

    A snapshot needs a little space on the source itself (btrfs metadata, a reflink
    clone's inode), so a full source fails before any data is read. Said plainly,
    because the raw ``OSError`` would read like a bug and the fix is the administrator's.
    """
    return SnapshotError(
        f"file_systems[{fs_id}]: cannot {what}: the file system holding {os.fspath(path)} is full "
        f"(no space left on device, or its quota is exhausted); free some space on it or grow it "
        f"(`df -h {os.fspath(path)}`; on btrfs also `btrfs filesystem usage`), then run the backup again"
    )


def read_only_error(fs_id: str, path: os.PathLike[str] | str, what: str) -> SnapshotError:
    """The snapshot of *path* cannot be taken because its file system is read-only here (EROFS).

    Reflink clones and btrfs snapshots are written onto the source's own file
    system. Under the shipped systemd unit that is usually not the mount being
    read-only but the sandbox: ``ProtectSystem=strict`` makes every path outside
    the unit's ``ReadWritePaths=`` read-only inside its mount namespace, so the
    same command works from a shell and fails in the daemon. The raw EROFS says
    none of that, so name the setting and the command that changes it.
    """
    where = os.fspath(path)
    return SnapshotError(
        f"file_systems[{fs_id}]: cannot {what}: {where} is read-only here. Under systemd this is the "
        f"zfsbackd unit's sandbox (ProtectSystem=strict: only its ReadWritePaths= are writable, by default "
        f"/var/lib/zfsbackd, /srv, /mnt and /data): add `ReadWritePaths={where}` with "
        f"`systemctl edit zfsbackd`, then `systemctl restart zfsbackd`; otherwise the file system is mounted "
        f"read-only: remount it read-write (`mount -o remount,rw`)"
    )


def check_name(what: str, value: str) -> str:
    """Refuse ids that would escape the snapshot directory when used as a path component."""
    if not value or "/" in value or "\0" in value or value in (".", ".."):
        raise SnapshotError(f"{what} {value!r} cannot be used as a snapshot name")
    return value


def open_beneath(dir_fd: int, relpath: bytes) -> int:
    """Open the existing file *relpath* below *dir_fd* read-only, following no symlinks at all."""
    if b"\0" in relpath:
        raise ValueError("embedded null byte")  # what os.open says; C would silently truncate
    resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    how = _OpenHow(flags=_OPEN_FLAGS, mode=0, resolve=resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(relpath),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):  # kernel < 5.6, or a seccomp filter that predates openat2
        return open_beneath_by_walk(dir_fd, relpath)
    raise OSError(err, os.strerror(err), os.fsdecode(relpath))


def open_beneath_by_walk(dir_fd: int, relpath: bytes) -> int:
    """:func:`open_beneath` without openat2: one ``O_NOFOLLOW`` openat per path component."""
    parts = relpath.split(b"/")
    if any(part in (b"", b"..") for part in parts):
        raise OSError(errno.EXDEV, "path leaves the snapshot root", os.fsdecode(relpath))
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], _OPEN_FLAGS, dir_fd=cur)
    except OSError as exc:
        exc.filename = os.fsdecode(relpath)
        raise
    finally:
        if cur != dir_fd:
            os.close(cur)


class FrozenFile:
    """An open file whose content matches ``stat``; use as a context manager (closes the fd).

    ``live`` is True when ``fd`` is the live file itself (copy provider, or a file the
    reflink provider could not clone): then :meth:`changed` re-checks the metadata.
    ``clone`` is True when ``fd`` is a copy of the file (the reflink provider's clone): its
    extended attributes are not the file's, which are read by path instead; otherwise (the live
    file, a ZFS or btrfs snapshot's) through ``fd``, without a second lookup of the path.
    """

    def __init__(self, fd: int, st: os.stat_result, *, live: bool, clone: bool = False) -> None:
        self.fd = fd
        self.stat = st
        self.live = live
        self.clone = clone

    def changed(self) -> bool:
        """True if the content may have changed since open; call it after reading."""
        if not self.live:
            return False
        now = os.fstat(self.fd)
        return _version(now) != _version(self.stat)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FrozenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(st: os.stat_result) -> tuple[int, int, int]:
    """What tells two states of a file's content apart without reading it."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def same_version(a: os.stat_result, b: os.stat_result) -> bool:
    return _version(a) == _version(b)


@dataclass(frozen=True)
class ArchivedDirectory:
    """What the archiver made of one directory (for :meth:`Snapshot.directory_archived`).

    Split so that a provider keeping its own map of names (ZFS) updates only
    what changed: in a changed directory most entries are the parent backup's
    nodes, taken as they were (``kept``, the very objects of ``previous``).
    """

    kept: list[Node]
    """The parent backup's nodes of entries that did not change."""
    fresh: list[Node]
    """The nodes made now: new or changed entries (all of them when ``previous`` is None)."""
    previous: Mapping[bytes, Node] | None
    """The parent backup's entries of this directory, by name; None when there were none to compare
    with (a new directory, another object under the same name, or a parent tree that could not be read)."""
    complete: bool = True
    """False for a directory a change list spared the listing of: ``kept`` and ``previous`` then hold only
    the entries the change list named; the others are the parent backup's, as they were, and not given."""

    def removed(self) -> set[bytes]:
        """Names of the parent backup's entries that are no longer there (or were skipped this time)."""
        if self.previous is None or len(self.kept) == len(self.previous):
            return set()
        kept = set(map(id, self.kept))
        gone = {name for name, node in self.previous.items() if id(node) not in kept}
        return gone - {node_name(node) for node in self.fresh}

    @property
    def nodes(self) -> list[Node]:
        """Every entry of the directory (only when ``complete``)."""
        if not self.complete:
            raise ValueError("the entries of a directory not listed are not all given")
        return self.kept + self.fresh


class DirectoryListings(Protocol):
    """Complete listings of changed directories that came with a change list (a send stream carries the
    block of a directory whose names changed: :class:`zfsbackd.zfs.zap.StreamDirectories`)."""

    def entries(self, inode: int) -> list[tuple[bytes, int]] | None:
        """(name, inode) of every entry of the directory *inode* in the new snapshot, in no order; None
        when the change list does not carry its listing (then the directory is listed)."""


class KnownAttributes(Protocol):
    """An object's attributes as a change list carries them (a send stream's OBJECT record:
    :class:`zfsbackd.zfs.sendstream.ZplAttributes`), in the snapshot's state."""

    def as_stat(self, inode: int, dev: int) -> os.stat_result:
        """What ``lstat`` of the object *inode* on device *dev* in the snapshot says (its times to the
        nanosecond; ``st_atime`` is not known: 0)."""


@dataclass(frozen=True)
class ChangeSet:
    """What changed since the parent backup's snapshot, when the snapshot provider knows (``zfs diff``).

    ``touched`` are paths relative to the snapshot root that were added, removed,
    modified or renamed (both names); ``dirty_dirs`` are their ancestors. A
    directory that is neither is not even listed: its parent-backup node,
    subtree included, is reused as it is — which is exactly what a full walk
    would have produced for an unchanged directory. The archiver reuses a clean
    name's node only while the name still has the node's inode number: a send
    stream's list names objects, so a name given to a new object is not in it.

    A directory other than the root in which a name was added, removed or
    renamed must itself be touched (its mtime and ctime changed: ``zfs diff``
    reports it modified, the send stream sends its dnode). The archiver relies on
    it twice: a new name is found only by listing its directory, and a directory
    that is dirty but not touched is not even listed — it holds its parent
    backup's names for the same objects, and only its changed entries are looked at.

    ``objects``, when the provider knows them all (a send stream of one dataset), are the
    inode numbers of the objects that may have changed, new ones included. An object's names
    change only with its ctime (link, unlink and rename all set it), so in a listed directory
    an entry whose inode is not among them, under a name the change list does not name, is
    its parent backup's node for that name: the archiver then looks at the other entries only.

    ``listings``, with ``objects``: the complete listings the change list carries of directories
    whose names changed, by the directory's inode; the archiver takes them instead of listing.

    With ``objects``, ``touched`` are the paths of the parent backup's snapshot (a send stream's
    object map has no others): a directory renamed since is walked against its old tree and asks
    the change list by its old path (``_DirFrame.moved_from``). ``directory_paths`` are those old
    paths of the changed directories by inode, for one moved to another parent.

    ``files``, with ``objects``: the regular files whose content changed (a send stream's data
    records), by inode, with their sizes (their bonus buffers'): an entry of one of those inodes is
    read without being stat'ed first (the read stats it through its descriptor anyway).

    ``directories``, with ``objects``: the attributes of the changed directories (a send stream's
    OBJECT records of trusted bonus layouts), by inode: such a directory is entered without a stat.
    """

    touched: frozenset[bytes]
    dirty_dirs: frozenset[bytes]
    objects: frozenset[int] | None = None
    listings: DirectoryListings | None = None
    directory_paths: Mapping[int, bytes] = field(default_factory=dict)
    files: Mapping[int, int] = field(default_factory=dict)
    directories: Mapping[int, KnownAttributes] = field(default_factory=dict)

    @classmethod
    def from_paths(
        cls,
        paths: Iterable[bytes],
        objects: Iterable[int] | None = None,
        listings: DirectoryListings | None = None,
        directory_paths: Mapping[int, bytes] | None = None,
        files: Mapping[int, int] | None = None,
        directories: Mapping[int, KnownAttributes] | None = None,
    ) -> ChangeSet:
        touched = frozenset(p.strip(b"/") for p in paths)
        dirty = {b""}
        for path in touched:
            parts = path.split(b"/")
            dirty.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
        frozen = None if objects is None else frozenset(objects)
        return cls(touched, frozenset(dirty), frozen, listings, directory_paths or {}, files or {}, directories or {})

    def is_clean(self, rel: bytes) -> bool:
        return rel not in self.touched and rel not in self.dirty_dirs

    def names_not_clean(self, rel: bytes) -> frozenset[bytes]:
        """The names in directory ``rel`` whose paths are not :meth:`is_clean`: one set lookup per entry
        instead of building each entry's path."""
        return self._not_clean_by_dir.get(rel, frozenset())

    @cached_property
    def _not_clean_by_dir(self) -> dict[bytes, frozenset[bytes]]:
        by_dir: dict[bytes, set[bytes]] = {}
        for path in self.touched | self.dirty_dirs:
            parent, _, name = path.rpartition(b"/")
            if name:
                by_dir.setdefault(parent, set()).add(name)
        return {parent: frozenset(names) for parent, names in by_dir.items()}


class PendingChanges:
    """:meth:`Snapshot.changes_since` running on its own thread while the archiver already walks.

    A race, because neither side always wins: ``zfs diff`` answers in seconds
    when little changed, but when changes are scattered it inspects every
    object that shares a metadata block with a changed one (and resolves its
    path twice), and can then take longer than the metadata walk it is meant
    to save. The archiver compares metadata until the change set is ready and
    skips clean subtrees from then on; when the walk ends first, the diff is
    stopped. Both ways give the same tree.
    """

    def __init__(self, snapshot: Snapshot, parent_snapshot: dict[str, object]) -> None:
        self._stop = threading.Event()
        self._done = threading.Event()
        self._result: ChangeSet | None = None
        self._thread = threading.Thread(
            target=self._run, args=(snapshot, parent_snapshot), daemon=True, name="zfsbackd-changes"
        )
        self._thread.start()

    def _run(self, snapshot: Snapshot, parent_snapshot: dict[str, object]) -> None:
        try:
            self._result = snapshot.changes_since(parent_snapshot, self._stop)
        except Exception as exc:  # without a change list the walk compares metadata: slower, never wrong
            if not self._stop.is_set():
                log.warning("change_list_failed", snapshot=snapshot.name, error=str(exc))
        finally:
            self._done.set()

    def ready(self) -> ChangeSet | None:
        """The change set if it is known by now; None while it is being worked out, abandoned, or there is none."""
        return self._result if self._done.is_set() and not self._stop.is_set() else None

    def answered_none(self) -> bool:
        """Worked out, and there is no change set (the provider has none, or working it out failed)."""
        return self._done.is_set() and self._result is None

    def wait(self, timeout: float | None = None) -> ChangeSet | None:
        self._done.wait(timeout)
        return self.ready()

    def abandon(self) -> None:
        """Give up on the change set without waiting (the thread ends soon after)."""
        self._stop.set()

    def stop(self) -> None:
        """Give up on the change set (the walk is done) and wait for the thread to end."""
        self._stop.set()
        self._thread.join()


class Snapshot(ABC):
    """One point-in-time view of a file system, valid until :meth:`release`.

    Holds an fd on ``root`` so every :meth:`open_file` resolves beneath it in one
    syscall; :meth:`release` closes it, so always release a snapshot.
    """

    provider: str
    atomic: bool
    #: Seconds the archiver waits for a pending change list (:meth:`changes_since`) before it walks
    #: without it: worth waiting for when its cost follows what changed, not when it may take longer
    #: than the walk (``zfs diff``).
    change_list_head_start: float = 1.0
    #: Whether worker processes may archive parts of the tree (zfsbackd.engine.shards): they read
    #: through a copy of this object (:meth:`__reduce__`), which opens files like this one but keeps no
    #: other state, so a provider whose :meth:`directory_archived` or change list keeps state says False.
    parallel_walk: bool = True
    #: Whether the archiver may take an unchanged directory's entries all at once from the listing cache
    #: (zfsbackd.store.listingcache), reading its parent backup's tree only if a subdirectory changed; a
    #: provider whose :meth:`directory_archived` needs every directory's entries says False.
    reuses_listings: bool = True

    def __init__(
        self,
        name: str,
        root: Path,
        excluded: frozenset[tuple[int, int]] = frozenset(),
        grafts: Mapping[bytes, Path] | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.excluded = excluded
        #: Other snapshot roots that appear at a path below ``root`` (a recursive ZFS
        #: backup's child datasets): one walk then yields one tree, children included.
        self.grafts: dict[bytes, Path] = dict(grafts or {})
        self._graft_order = sorted(self.grafts, key=len, reverse=True)  # longest prefix wins
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._graft_fds: dict[bytes, int] = {}
        self._local = threading.local()  # the files :meth:`prefetched` holds open for this thread's reads
        try:
            for rel, path in self.grafts.items():
                self._graft_fds[rel] = os.open(path, _DIR_FLAGS)
        except BaseException:
            self.close()
            raise

    def __reduce__(self) -> tuple[Callable[..., Snapshot], tuple[object, ...]]:
        """Pickled for an archive worker process: a reader of the same snapshot that opens its own fds.

        The copy only reads (:meth:`open_file`, :meth:`path`) and is closed (:meth:`close`); releasing or
        committing the snapshot stays with the process that took it.
        """
        if not self.parallel_walk:
            raise TypeError(f"a {self.provider} snapshot is not read by worker processes")
        return _reader_of, (type(self), self.name, self.root, self.excluded, self.grafts)

    def split(self, rel: bytes) -> tuple[bytes, bytes]:
        """(graft prefix, path below it) for *rel*; the prefix is ``b""`` for the snapshot's own root."""
        for prefix in self._graft_order:
            if rel == prefix:
                return prefix, b""
            if rel.startswith(prefix) and rel[len(prefix) : len(prefix) + 1] == b"/":
                return prefix, rel[len(prefix) + 1 :]
        return b"", rel

    def path(self, rel: bytes) -> bytes:
        """The real path of *rel* (relative to the snapshot root, grafts resolved)."""
        prefix, rest = self.split(rel) if self._graft_order else (b"", rel)
        base = os.fsencode(self.grafts[prefix] if prefix else self.root)
        return base + b"/" + rest if rest else base

    @abstractmethod
    def open_file(self, relpath: bytes) -> FrozenFile:
        """Open the regular file *relpath* (relative to ``root``); FileNotFoundError if it vanished."""

    def close(self) -> None:
        """Stop using the snapshot but keep it (an interrupted backup resumes from it); idempotent."""
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        for fd in self._graft_fds.values():
            os.close(fd)
        self._graft_fds.clear()

    def release(self) -> None:
        """Give the snapshot up; idempotent. Providers that own storage destroy it here."""
        self.close()

    def commit(self) -> None:
        """The backup made from this snapshot is AVAILABLE. ZFS keeps it as the next incremental's base."""
        self.release()

    def directory_archived(
        self, rel: bytes, node: Node | None, entries: ArchivedDirectory | None, as_before: bool
    ) -> None:
        """The archiver archived the directory *rel* (its *node*; None for the root): *entries* are its
        entries, or None when it could not be listed; *as_before*: the directory and all its entries
        are the parent backup's nodes.

        ZFS keeps each object's names and ctime from these (its send-stream change list needs
        them); other providers need nothing.
        """
        return None

    def source_properties(self) -> dict[str, str]:
        """Properties of the source a restore should recreate (ZFS dataset properties); none elsewhere."""
        return {}

    def changes_since(
        self, parent_snapshot: dict[str, object], stop: threading.Event | None = None
    ) -> ChangeSet | None:
        """What changed since the parent backup's snapshot, if this provider can tell without a walk.

        May take long (``zfs diff``); providers give up soon after ``stop`` is set.
        """
        return None

    def describe(self) -> dict[str, object]:
        return {"Provider": self.provider, "Name": self.name, "Atomic": self.atomic}

    @contextlib.contextmanager
    def prefetched(self, relpaths: Iterable[bytes]) -> Iterator[None]:
        """Have the kernel start reading these files' data now (``POSIX_FADV_WILLNEED``), all at once, and keep
        each one open for the :meth:`open_file` of it on this thread inside the block (closed at its end if
        none came).

        Why: a batch of small files read one after another from a cold cache waits
        for the disk once per file, one request in flight per read thread; hinted
        first, their reads are queued together and the reads that follow find the
        data in the page cache (1M small files, cold: GNU ``cat`` in 8 streams reads
        them in 24 s, a backup with 4 read threads spent half of its 79 s waiting).
        Kept open, each file is looked up once, not twice (a system call costs ~1 ms
        under emulation). Only a hint: a file that cannot be opened is left to the read
        that follows, which reports it.
        """
        opened: dict[bytes, int] = {}
        try:
            if self._root_fd >= 0:
                for relpath in relpaths:
                    if relpath in opened:
                        continue
                    try:
                        fd = self._open_below_root(relpath)
                    except (OSError, ValueError):
                        continue
                    opened[relpath] = fd
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            self._local.prefetched = opened
            yield
        finally:
            self._local.prefetched = None
            for fd in opened.values():
                os.close(fd)

    def _open_regular(self, relpath: bytes) -> tuple[int, os.stat_result]:
        """Open *relpath* and make sure it is (still) a regular file."""
        if self._root_fd < 0:
            raise ValueError(f"snapshot {self.name} has been released")
        prefetched: dict[bytes, int] | None = getattr(self._local, "prefetched", None)
        fd = prefetched.pop(relpath, -1) if prefetched else -1
        try:
            if fd < 0:
                fd = self._open_below_root(relpath)
        except OSError as exc:
            exc.filename = self._display_path(relpath)  # the full path, for the archiver's error report
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                why = "is no longer a regular file"
                raise FileChangedError(errno.EINVAL, why, self._display_path(relpath))
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _open_below_root(self, relpath: bytes) -> int:
        """Open *relpath* below the snapshot's root (or the graft it lies in), following no symlinks."""
        prefix, rest = self.split(relpath) if self._graft_order else (b"", relpath)
        return open_beneath(self._graft_fds[prefix] if prefix else self._root_fd, rest)

    def _display_path(self, relpath: bytes) -> str:
        return os.fsdecode(self.path(relpath))


def _reader_of(
    kind: type[Snapshot], name: str, root: Path, excluded: frozenset[tuple[int, int]], grafts: Mapping[bytes, Path]
) -> Snapshot:
    """A worker's copy of a snapshot (see :meth:`Snapshot.__reduce__`): only the base state, its own fds."""
    reader = kind.__new__(kind)
    Snapshot.__init__(reader, name, root, excluded, grafts)
    return reader


class SnapshotProvider(ABC):
    name: str

    @abstractmethod
    def take(self, fs: FileSystemSource, backup_id: str) -> Snapshot:
        """Take the snapshot for *backup_id*; SnapshotError if this provider cannot."""

    @abstractmethod
    def find(self, fs: FileSystemSource, backup_id: str) -> Snapshot | None:
        """The snapshot an earlier :meth:`take` made for *backup_id* (to resume after a crash).

        None when there is none — and always for providers whose snapshot is the live
        tree: nothing of it survives an attempt, so a resumed backup takes it again,
        ``pre_snapshot``/``post_snapshot`` hooks included (see ``find_or_take_snapshot``).
        """


def snapshot_name(backup_id: str) -> str:
    return "zfsbackd-" + check_name("backup id", backup_id)
