"""Restore a backup (whole or selected paths) into a new directory under a target.

Safety (DESIGN invariant 5): every name is checked before use (no ``/``,
``..``, ``.``, NUL, empty); all directories on the way are ones this restore
created itself; symlinks are created last and never followed; the restore
goes into a new ``zfsbackd-restore_<UTC timestamp>`` directory and is renamed
``zfsbackd-failed-restore_<timestamp>`` if it fails.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from zfsbackd.engine.progress import Progress
from zfsbackd.errors import IntegrityError, RestoreError, ZfsbackdError
from zfsbackd.store.packcache import PackCache
from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.tree import (
    ROOT_NAME,
    Node,
    decode_xattrs,
    is_safe_name,
    node_name,
    node_target,
    parse_tree,
)

log = structlog.get_logger(__name__)

RESTORE_PREFIX = "zfsbackd-restore_"
MAX_FILES_IN_FLIGHT = 256
FETCH_AHEAD = 4  # chunks of one big file fetched (read, decrypted, verified) ahead of the writer
FAILED_PREFIX = "zfsbackd-failed-restore_"


@dataclass
class RestoreResult:
    path: Path
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0

    def to_api(self) -> dict[str, object]:
        return {"Path": str(self.path), "Files": self.files, "Directories": self.directories, "Bytes": self.bytes}


class _BoundedJobs:
    """File jobs on a pool with at most ``limit`` queued or running: memory stays flat for millions of files."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int) -> None:
        self._pool = pool
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._total = 0
        self._error: BaseException | None = None
        self._futures: set[Future[int]] = set()

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
class _Plan:
    """Work deferred until all regular files exist."""

    hardlinks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (first path, new path)
    symlinks: list[tuple[bytes, Node]] = field(default_factory=list)
    directories: list[tuple[bytes, Node]] = field(default_factory=list)  # metadata applied deepest first


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


def _apply_metadata(path: bytes, node: Node, *, fd: int | None = None) -> None:
    """Owner, then mode (chown clears setuid), xattrs and ACLs, then times — in that order."""
    target: int | bytes = fd if fd is not None else path
    os.chown(target, node["uid"], node["gid"])
    os.chmod(target, node["mode"])
    for name, value in decode_xattrs(node):
        try:
            os.setxattr(target, name, value)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            log.warning("xattr_not_supported", path=os.fsdecode(path), xattr=name)
    os.utime(target, ns=(node["mtime_ns"], node["mtime_ns"]))


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


class Restorer:
    def __init__(
        self,
        store: Store,
        record: BackupRecord,
        target: Path,
        paths: list[str] | None = None,
        *,
        progress: Progress | None = None,
        workers: int = 3,
    ) -> None:
        self.store = store
        self.record = record
        self.target = target
        self.paths = paths or []
        self.progress = progress or Progress(total_bytes=record.size_in_bytes)
        self.workers = workers
        self._hardlink_first: dict[int, bytes] = {}
        self._trees: dict[str, list[Node]] = {}  # tree id → nodes, read ahead for full restores
        self._packs: PackCache | None = None
        self._plan = _Plan()

    def run(self) -> RestoreResult:
        if not self.target.is_dir():
            raise RestoreError(f"--target {self.target} is not an existing directory; create it first")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.target / f"{RESTORE_PREFIX}{stamp}"
        os.mkdir(dest, 0o700)
        result = RestoreResult(path=dest)
        try:
            self._restore_into(os.fsencode(str(dest)), result)
        except BaseException as exc:
            failed = self.target / f"{FAILED_PREFIX}{stamp}"
            os.rename(dest, failed)
            log.error("restore_failed", backup_id=self.record.backup_id, path=str(failed), error=str(exc))
            if isinstance(exc, ZfsbackdError):
                exc.message = f"{exc.message} (partial restore left in {failed})"
                exc.args = (exc.message,)
            raise
        return result

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
        result = RestoreResult(path=dest)
        self._restore_into(os.fsencode(str(dest)), result)
        return result

    # ----------------------------------------------------------------- walk
    def _tree(self, tree_id: str, where: bytes) -> list[Node]:
        nodes = self._trees.get(tree_id)
        if nodes is None:
            what = f"backup {self.record.backup_id}: directory /{os.fsdecode(where)}"
            nodes = parse_tree(self.store.read_blob(bytes.fromhex(tree_id), what=what), what=what)
        for node in nodes:
            name = node_name(node)
            if not is_safe_name(name):
                raise RestoreError(
                    f"backup {self.record.backup_id}: directory /{os.fsdecode(where)} holds an unsafe entry "
                    f"name {name!r}; refusing to restore it (the backup may have been tampered with; "
                    "run `zfsbackd check --read-data`)"
                )
        return nodes

    def _restore_into(self, dest: bytes, result: RestoreResult) -> None:
        root_nodes = parse_tree(
            self.store.read_blob(bytes.fromhex(self.record.root_tree or ""), what=f"backup {self.record.backup_id}"),
            what=f"backup {self.record.backup_id} root",
        )
        root = next((n for n in root_nodes if n.get("name") == ROOT_NAME), None)
        if root is None:
            raise IntegrityError(f"backup {self.record.backup_id}: root tree has no root entry")
        with (
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zfsbackd-restore") as pool,
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zfsbackd-fetch") as self._fetch_pool,
        ):
            jobs = _BoundedJobs(pool, MAX_FILES_IN_FLIGHT)
            if not self.paths:
                self._plan_full_restore(root)
                self._restore_dir_contents(jobs, root, dest, b"", result)
                self._plan.directories.append((dest, root))
            else:
                for raw in self.paths:
                    self._restore_selected(jobs, root, dest, raw, result)
            result.bytes += jobs.wait()
        self._finish(result)

    def _plan_full_restore(self, root: Node) -> None:
        """Read every tree first, level by level and in parallel, then plan pack reads for all file data.

        One request per directory in a row would make a restore from S3 crawl; so would one per blob.
        """
        level = [root["subtree"]]
        wanted: list[bytes] = []
        linked: set[int] = set()
        what = f"backup {self.record.backup_id}: a directory tree"
        while level:
            todo = [t for t in dict.fromkeys(level) if t not in self._trees]
            for tree_id, nodes in zip(
                todo,
                self._fetch_pool.map(
                    lambda t: parse_tree(self.store.read_blob(bytes.fromhex(t), what=what), what=what), todo
                ),
                strict=True,
            ):
                self._trees[tree_id] = nodes
            next_level = []
            for tree_id in level:
                for node in self._trees[tree_id]:
                    if node.get("type") == "dir":
                        next_level.append(node["subtree"])
                    elif node.get("type") == "file":
                        link = node.get("hardlink")
                        if link is not None:
                            if link in linked:
                                continue  # restored as a hard link: its data is not read again
                            linked.add(link)
                        wanted.extend(bytes.fromhex(c[2]) for c in node.get("chunks", ()))
            level = next_level
        self._packs = PackCache(self.store, wanted)

    def _restore_selected(self, jobs: _BoundedJobs, root: Node, dest: bytes, raw: str, result: RestoreResult) -> None:
        parts = split_request_path(raw, self.record.backup_id)
        node, rel, out = root, b"", dest
        for i, part in enumerate(parts):
            if node.get("type") != "dir":
                break
            children = {node_name(n): n for n in self._tree(node["subtree"], rel)}
            child = children.get(part)
            if child is None:
                break
            rel = rel + b"/" + part if rel else part
            out = out + b"/" + part
            if i < len(parts) - 1 and not os.path.lexists(out):
                # a directory on the way: create it, with its own metadata applied at the end
                os.mkdir(out, 0o700)
                self._plan.directories.append((out, child))
            node = child
        else:
            self._restore_node(jobs, node, out, rel, result)
            return
        raise RestoreError(
            f"--path {raw!r} is not in backup {self.record.backup_id}; list the backup's files with a full "
            "restore or check the spelling (paths are relative to the backed-up file system's root)"
        )

    def _restore_dir_contents(
        self, jobs: _BoundedJobs, node: Node, out: bytes, rel: bytes, result: RestoreResult
    ) -> None:
        for child in self._tree(node["subtree"], rel):
            name = node_name(child)
            self._restore_node(jobs, child, out + b"/" + name, rel + b"/" + name if rel else name, result)

    def _restore_node(self, jobs: _BoundedJobs, node: Node, out: bytes, rel: bytes, result: RestoreResult) -> None:
        kind = node.get("type")
        if kind == "dir":
            if not os.path.isdir(out):
                os.mkdir(out, 0o700)
            result.directories += 1
            self._restore_dir_contents(jobs, node, out, rel, result)
            self._plan.directories.append((out, node))
        elif kind == "file":
            link_key = node.get("hardlink")
            if link_key is not None and link_key in self._hardlink_first:
                self._plan.hardlinks.append((self._hardlink_first[link_key], out))
            else:
                if link_key is not None:
                    self._hardlink_first[link_key] = out
                jobs.submit(self._write_file, node, out, rel)
            result.files += 1
        elif kind == "symlink":
            self._plan.symlinks.append((out, node))
            result.symlinks += 1
        elif kind in ("chardev", "blockdev"):
            dev_type = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
            os.mknod(out, dev_type | 0o600, node["rdev"])
            _apply_metadata(out, node)
        else:
            raise IntegrityError(f"backup {self.record.backup_id}: /{os.fsdecode(rel)} has unknown type {kind!r}")

    def _write_file(self, node: Node, out: bytes, rel: bytes) -> int:
        """Runs on the pool: create the file, write its chunks at their offsets (holes stay holes)."""
        what = f"backup {self.record.backup_id}: file /{os.fsdecode(rel)}"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        written = 0
        try:
            chunks = node.get("chunks", ())
            for (offset, length, _blob), data in zip(chunks, self._fetch(chunks, what), strict=True):
                if len(data) != length:
                    raise IntegrityError(f"{what}: chunk at offset {offset} has {len(data)} bytes, expected {length}")
                view = memoryview(data)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                written += length
                self.progress.advance(nbytes=length)
            end = chunks[-1][0] + chunks[-1][1] if chunks else 0
            if node["size"] > end:  # a trailing hole (truncating to the same size costs XFS a flush)
                os.ftruncate(fd, node["size"])
            _apply_metadata(out, node, fd=fd)
        finally:
            os.close(fd)
        self.progress.advance(files=1)
        return written

    def _fetch(self, chunks: Sequence[list], what: str) -> Iterator[bytes]:
        """The chunks' plaintexts in order; for big files a few are fetched ahead on the fetch pool."""
        if len(chunks) <= 1:
            for _offset, _length, blob_hex in chunks:
                yield self.store.read_blob(bytes.fromhex(blob_hex), what=what, packs=self._packs)
            return
        ahead: deque[Future[bytes]] = deque()
        pending = iter(chunks)
        for _offset, _length, blob_hex in itertools.islice(pending, FETCH_AHEAD):
            ahead.append(
                self._fetch_pool.submit(self.store.read_blob, bytes.fromhex(blob_hex), what=what, packs=self._packs)
            )
        while ahead:
            data = ahead.popleft().result()
            nxt = next(pending, None)
            if nxt is not None:
                ahead.append(
                    self._fetch_pool.submit(self.store.read_blob, bytes.fromhex(nxt[2]), what=what, packs=self._packs)
                )
            yield data

    # --------------------------------------------------------------- finish
    def _finish(self, result: RestoreResult) -> None:
        for first, path in self._plan.hardlinks:
            os.link(first, path)
        for path, node in self._plan.symlinks:
            os.symlink(node_target(node), path)
            os.chown(path, node["uid"], node["gid"], follow_symlinks=False)
            os.utime(path, ns=(node["mtime_ns"], node["mtime_ns"]), follow_symlinks=False)
        # Deepest first, so setting a parent's mtime is the last change inside it.
        for path, node in sorted(self._plan.directories, key=lambda item: item[0].count(b"/"), reverse=True):
            _apply_metadata(path, node)
