"""Writing a restore's files: their data from the store, their metadata, and what an error of the target means.

Used by the restore's own process (:class:`~zfsbackd.engine.restorer.Restorer`) and by its worker
processes (:mod:`zfsbackd.engine.restore_workers`) alike: a :class:`FileWriter` is given files as
(directory descriptor, name, node, path) and writes each into its directory — created ``O_EXCL |
O_NOFOLLOW`` relative to the descriptor, never through a path — with its chunks read from the store
(authenticated there), then its owner, mode, xattrs and times. A :class:`RestoreTarget` says where the
restore goes, and turns an OSError of the target into a classified error that names the path and the
fix (see restorer.py's module docstring for the rules).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

from zfsbackd import faults
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import IntegrityError, RestoreError, RestoreTargetFull, StoreError
from zfsbackd.store.packcache import PackCache
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import Node, decode_xattrs

log = structlog.get_logger(__name__)

MAX_FILES_IN_FLIGHT = 256  # bounds the directories held open (each file in flight pins its own)
#: files (of at most one chunk each) written by one pool job: a job per file cost more in futures,
#: semaphores and thread hand-offs than writing a 4 KiB file does
FILES_PER_JOB = 32
FETCH_AHEAD = 4  # chunks of one big file fetched (read, decrypted, verified) ahead of the writer
MAX_WARNINGS = 20  # listed in the result and logged one by one; all are counted
#: an xattr refused with ENOSPC while less than this (plus its size) is free means the file system is full
XATTR_FULL_MARGIN = 1024 * 1024

NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TARGET_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: setxattr errors that mean "this attribute does not fit this file system": skipped and reported
XATTR_DOES_NOT_FIT = frozenset(
    {errno.ENOSPC, errno.E2BIG, errno.ERANGE, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.EINVAL}
)
REPLACED = (
    "something replaced a directory of the restore while it ran (another process is changing the target); "
    "the restore does not follow it: make sure nothing else writes there and run the restore again"
)
#: what to do about an error of the target, by errno (full and quota have their own message)
FIXES: dict[int, str] = {
    errno.EROFS: "the target file system is mounted read-only: remount it read-write or give another --target",
    errno.EACCES: (
        "restores run as root (owners and modes are restored): check the target's permissions, ACLs and "
        "security modules (SELinux, AppArmor)"
    ),
    errno.EPERM: (
        "the target (or a directory in it) may be immutable or append-only (`lsattr`, `chattr -i`), or the "
        "file system does not allow this operation; restores run as root"
    ),
    errno.EIO: "the target's device reported an I/O error: check the kernel log (`dmesg`) and the disk",
    errno.EEXIST: (
        "the name exists already: the backup lists it twice, which no directory can hold, so it may have "
        "been tampered with; run `zfsbackd check --read-data`"
    ),
    errno.ELOOP: REPLACED,
    errno.ENOTDIR: REPLACED,
    errno.ENOENT: REPLACED,
    errno.EMLINK: (
        "the target file system allows fewer hard links or subdirectories than this backup needs: "
        "restore to one that allows more (XFS, btrfs, ZFS)"
    ),
    errno.EFBIG: "the file is larger than the target file system allows: restore to one that allows it",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`, systemd `LimitNOFILE=`)",
    errno.ENFILE: "the system ran out of open files (fs.file-max): try again when fewer files are open",
    errno.EINVAL: "the target file system refused this value (a name or attribute it cannot hold)",
    errno.EILSEQ: (
        "the target file system only takes names in its own encoding (e.g. ext4 with casefold or strict "
        "UTF-8): restore to one that takes any bytes"
    ),
}

def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def describe(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the words for people, the symbol for searching."""
    return f"{exc.strerror or exc} ({_errno_name(exc)})"


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB ({n} bytes)"




#: a file to write: (a key its ``release`` callback is given, its directory's descriptor, name, node, path)
FileToWrite = tuple[int, int, bytes, Node, bytes]


class BoundedJobs:
    """File jobs on a pool with at most ``limit`` queued or running: memory stays flat for millions of files."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        limit: int = MAX_FILES_IN_FLIGHT // FILES_PER_JOB,
        stop: threading.Event | None = None,
    ) -> None:
        """*stop*, when set, makes the jobs not started yet return at once (a worker process told to stop)."""
        self._pool = pool
        self._stop = stop
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._total = 0
        self._error: BaseException | None = None
        self._cancelled = False
        self._futures: set[Future[int]] = set()

    @property
    def stopping(self) -> bool:
        """A job failed or the walk gave up: queued jobs return at once instead of writing for nothing."""
        return self._cancelled or self._error is not None or (self._stop is not None and self._stop.is_set())

    def cancel(self) -> None:
        self._cancelled = True

    def submit(self, fn: Callable[..., int], *args: object) -> None:
        if self._error is not None:
            raise self._error
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[int]) -> None:
        with self._lock:
            self._futures.discard(future)
            if future.exception() is not None:
                self._error = self._error or future.exception()
            else:
                self._total += future.result()
        self._slots.release()

    def wait(self) -> int:
        """Bytes written by all jobs; raises the first job's error."""
        while True:
            with self._lock:
                remaining = list(self._futures)
            if not remaining:
                break
            for future in remaining:
                future.exception()  # waits
        if self._error is not None:
            raise self._error
        return self._total


@dataclass
class RestoreTarget:
    """Where a restore is written, and how much of it: what an error of the target is told with.

    ``dest_path`` is the restore's own directory and ``target_path`` the directory whose file
    system receives it (both for messages); ``space_fd`` is any descriptor on that file
    system (free space, name length); ``planned_bytes`` the file data the restore writes in
    all and ``bytes_done`` what is written so far (a worker process starts from the figure
    its parent had when it sent the batch).
    """

    backup_id: str
    dest_path: Path
    target_path: Path
    space_fd: int = -1
    planned_bytes: int = 0
    bytes_done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def written(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_done += nbytes

    def on_target(self, action: str, rel: bytes | None) -> _OnTarget:
        """``with target.on_target(action, rel):`` turns an OSError of the target into a classified error."""
        return _OnTarget(self, action, rel)

    def available(self) -> int:
        st = os.fstatvfs(self.space_fd)
        return st.f_bavail * st.f_frsize

    def error(self, exc: OSError, action: str, rel: bytes | None) -> RestoreError:
        """An OSError of the target (``rel`` inside the restore; None: the restore directory itself) as the
        error a person can act on: what failed, where, why, and what to do."""
        where = str(self.dest_path) if rel is None else f"/{os.fsdecode(rel)}"
        head = f"restore of backup {self.backup_id}: cannot {action} {where}: {describe(exc)}"
        if exc.errno in TARGET_FULL:
            try:
                available = _size(self.available())
            except OSError:
                available = "an unknown amount"
            what = "quota on the target" if exc.errno == errno.EDQUOT else f"file system of {self.target_path}"
            return RestoreTargetFull(
                f"{head}. The {what} is full: this restore needs about "
                f"{_size(max(0, self.planned_bytes - self.bytes_done))} more of file data "
                f"({self.bytes_done} of {self.planned_bytes} bytes written), and {available} are available. "
                "Free space (delete the partial restore, if one was left) or raise the quota, or restore to a larger "
                "file system, then run the restore again"
            )
        if exc.errno == errno.ENAMETOOLONG and rel is not None:
            name = rel.rsplit(b"/", 1)[-1]
            try:
                limit = f"at most {os.fstatvfs(self.space_fd).f_namemax} bytes"
            except OSError:
                limit = "fewer"
            fix = (
                f"the name is {len(name)} bytes and the target file system allows {limit}: restore to a file "
                "system that allows longer names, or restore the other paths with --path"
            )
        elif exc.errno == errno.EEXIST and rel is None:
            fix = "another process created this name at the same moment: run the restore again"
        else:
            fix = FIXES.get(exc.errno or 0, "fix the target and run the restore again")
        return RestoreError(f"{head}. {fix[0].upper()}{fix[1:]}")


class _OnTarget:
    __slots__ = ("_action", "_rel", "_target")

    def __init__(self, target: RestoreTarget, action: str, rel: bytes | None) -> None:
        self._target, self._action, self._rel = target, action, rel

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, OSError):
            raise self._target.error(exc, self._action, self._rel) from exc


class FileWriter:
    """Writes files into directories given as descriptors, and applies metadata to what a restore made.

    Counts what it could not restore exactly (``xattrs_not_restored``; the first MAX_WARNINGS
    are listed in ``warnings`` and logged one by one).
    """

    def __init__(self, store: Store, target: RestoreTarget, progress: Progress, fetch_pool: ThreadPoolExecutor) -> None:
        """*fetch_pool* fetches the chunks of big files ahead of their writer."""
        self.store = store
        self.target = target
        self.progress = progress
        self.xattrs_not_restored = 0
        self.warnings: list[str] = []
        self._fetch_pool = fetch_pool
        self._lock = threading.Lock()
        self._egid = os.getegid()  # the group new files get (see _creation_mode)

    def add_not_restored(self, count: int, warnings: Sequence[str]) -> None:
        """Count what another process's writer could not restore (its warnings listed while there is room)."""
        with self._lock:
            self.xattrs_not_restored += count
            self.warnings.extend(warnings[: max(0, MAX_WARNINGS - len(self.warnings))])

    def submit(
        self, jobs: BoundedJobs, packs: PackCache, files: Iterable[FileToWrite], release: Callable[[int], None]
    ) -> None:
        """Write *files* (their reads planned in *packs*) as jobs on *jobs*' pool: FILES_PER_JOB small ones
        per job, a file of many chunks in a job of its own (its chunks are fetched ahead). Each file's
        *release* (with its key) is called once it is written or given up; a submit that raises means
        the restore is over, and whoever gave the descriptors closes them."""
        group: list[FileToWrite] = []
        for item in files:
            if len(item[3].get("chunks", ())) > 1:
                jobs.submit(self._write_group, jobs, packs, [item], release)
                continue
            group.append(item)
            if len(group) == FILES_PER_JOB:
                jobs.submit(self._write_group, jobs, packs, group, release)
                group = []
        if group:
            jobs.submit(self._write_group, jobs, packs, group, release)

    def _write_group(
        self, jobs: BoundedJobs, packs: PackCache, files: list[FileToWrite], release: Callable[[int], None]
    ) -> int:
        """Runs on the pool: write *files* in order; release each one, whatever happens."""
        written = 0
        try:
            for _key, dir_fd, name, node, rel in files:
                if jobs.stopping:
                    break
                written += self._write_file(packs, dir_fd, name, node, rel)
        finally:
            for key, *_ in files:
                release(key)
        return written

    def _write_file(self, packs: PackCache, dir_fd: int, name: bytes, node: Node, rel: bytes) -> int:
        """Create the file in its directory, write its chunks at their offsets (holes stay holes), apply its
        metadata."""
        with self.target.on_target("create the file", rel):
            fd = os.open(name, NEW_FILE_FLAGS, self._creation_mode(node), dir_fd=dir_fd)
        try:
            written = self._write_data(fd, node, rel, packs)
            self.apply_metadata(fd, node, rel)
        finally:
            os.close(fd)
        faults.point("restore-file-written")
        self.progress.advance(files=1)
        return written

    def _write_data(self, fd: int, node: Node, rel: bytes, packs: PackCache) -> int:
        what = f"backup {self.target.backup_id}: file /{os.fsdecode(rel)}"
        chunks = node.get("chunks", ())
        written = 0
        try:
            for (offset, length, _blob), data in zip(chunks, self._fetch(chunks, what, packs), strict=True):
                if len(data) != length:
                    raise IntegrityError(f"{what}: chunk at offset {offset} has {len(data)} bytes, expected {length}")
                with self.target.on_target("write", rel):
                    view = memoryview(data)
                    pos = offset
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view, pos = view[n:], pos + n
                written += length
                self.target.written(length)
                self.progress.advance(nbytes=length)
        except (IntegrityError, StoreError) as exc:
            if what not in exc.message:  # name the backup and the file, whoever raised it
                exc.message = f"{what}: {exc.message}"
                exc.args = (exc.message,)
            raise
        end = chunks[-1][0] + chunks[-1][1] if chunks else 0
        if node["size"] > end:  # a trailing hole (truncating to the same size costs XFS a flush)
            with self.target.on_target("extend", rel):
                os.ftruncate(fd, node["size"])
        return written

    def _fetch(self, chunks: Sequence[list], what: str, packs: PackCache) -> Iterator[bytes]:
        """The chunks' plaintexts in order; for big files a few are fetched ahead on the fetch pool."""
        if len(chunks) <= 1:
            for _offset, _length, blob_hex in chunks:
                yield self.store.read_blob(bytes.fromhex(blob_hex), what=what, packs=packs)
            return
        ahead: deque[Future[bytes]] = deque()
        pending = iter(chunks)
        for _offset, _length, blob_hex in itertools.islice(pending, FETCH_AHEAD):
            ahead.append(self._fetch_pool.submit(self.store.read_blob, bytes.fromhex(blob_hex), what=what, packs=packs))
        while ahead:
            data = ahead.popleft().result()
            nxt = next(pending, None)
            if nxt is not None:
                ahead.append(
                    self._fetch_pool.submit(self.store.read_blob, bytes.fromhex(nxt[2]), what=what, packs=packs)
                )
            yield data

    # -------------------------------------------------------------- metadata
    def _creation_mode(self, node: Node) -> int:
        """The permissions a file is created with, so that most files need no chmod after it.

        Never set-id or sticky bits (they follow the owner, set after the data). Group bits
        only when the file's group is the one it is created with: until the chown, the group
        is this process's. The directory it goes into stays 0700 until the restore ends.
        """
        mode = node["mode"] & 0o777
        return mode if node["gid"] == self._egid else mode & ~0o070

    def apply_metadata(self, target: int | str, node: Node, rel: bytes) -> None:
        """Owner, then mode (chown clears setuid), xattrs and ACLs, then times — in that order.

        Owner and mode are changed only when they differ (one ``fstat``, no inode update): restoring a
        million small files, the chown and chmod of files created right were two journal transactions each.
        """
        with self.target.on_target("set the owner, mode and times of", rel):
            current = os.fstat(target) if isinstance(target, int) else None
            if current is None or (current.st_uid, current.st_gid) != (node["uid"], node["gid"]):
                os.chown(target, node["uid"], node["gid"])
                current = None  # a chown may clear set-id bits: the mode goes on after it
            if current is None or stat.S_IMODE(current.st_mode) != stat.S_IMODE(node["mode"]):
                os.chmod(target, node["mode"])
            try:
                xattrs = decode_xattrs(node)
            except ValueError:
                raise IntegrityError(
                    f"backup {self.target.backup_id}: /{os.fsdecode(rel)} has a malformed extended attribute value"
                ) from None
            for name, value in xattrs:
                try:
                    os.setxattr(target, name, value)
                except OSError as exc:
                    if not self._xattr_does_not_fit(exc, value):
                        raise
                    self._xattr_not_restored(rel, name, value, exc)
            os.utime(target, ns=(node["mtime_ns"], node["mtime_ns"]))

    def _xattr_does_not_fit(self, exc: OSError, value: bytes) -> bool:
        """ENOSPC is both "too large for this file system's xattr space" and "the file system is full":
        only the first is skipped (free space tells them apart)."""
        if exc.errno not in XATTR_DOES_NOT_FIT:
            return False
        return exc.errno != errno.ENOSPC or self.target.available() >= XATTR_FULL_MARGIN + len(value)

    def _xattr_not_restored(self, rel: bytes, name: str, value: bytes, exc: OSError) -> None:
        with self._lock:
            self.xattrs_not_restored += 1
            listed = len(self.warnings) < MAX_WARNINGS
            if listed:
                self.warnings.append(
                    f"/{os.fsdecode(rel)}: extended attribute {name} ({len(value)} bytes) not restored: "
                    f"{describe(exc)}"
                )
        if listed:
            log.warning(
                "xattr_not_restored",
                backup_id=self.target.backup_id,
                path="/" + os.fsdecode(rel),
                xattr=name,
                size=len(value),
                error=_errno_name(exc),
            )
