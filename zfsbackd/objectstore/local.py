"""A directory as an object store: the embedded default and the reference backend.

Durability matters more than speed here: every object is written to a
temporary file, fsync'ed, then linked (create-only) or renamed (replace) into
place, and the directory is fsync'ed, so a crash never leaves a partial object
under its final key. A writer killed mid-object leaves only its ``.tmp-*``
file, which :meth:`LocalObjectStore.remove_stale_writes` removes later.

The store directory itself is never created implicitly (only with
``create=True``, which ``zfsbackd store init`` passes): an unmounted file
system's mount point must not quietly receive backups. For the same reason,
with ``store_marker`` set, directories below the root are created only while
the marker object (the store's ``config``) is still there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from zfsbackd.errors import StoreError, StoreNotInitialized
from zfsbackd.objectstore.base import ObjectInfo, ObjectStore

_TMP_PREFIX = ".tmp-"


#: What to do when a write fails with one of these errors (the store directory's file system refused it).
_WRITE_FIXES = {
    errno.ENOSPC: ("its file system is full (ENOSPC)",
                   "free space there or move {setting} to a larger file system"),
    errno.EDQUOT: ("its file system's disk quota is exhausted (EDQUOT)",
                   "raise the quota of the user zfsbackd runs as, or free space"),
    errno.EROFS: ("its file system is mounted read-only (EROFS)",
                  "remount it read-write (after errors the kernel may have remounted it read-only: see dmesg)"),
    errno.EACCES: ("permission denied (EACCES)", "run zfsbackd as root or fix the directory's permissions"),
    errno.EPERM: ("permission denied (EPERM)", "run zfsbackd as root or fix the directory's permissions"),
}


class LocalObjectStore(ObjectStore):
    location_settings = ("path",)

    clock_shift: float = 0.0
    """Tests only: seconds added to the time stamped on every object written, a store clock that runs
    ahead, so that packs, candidate sets and leases age without waiting (0, and untouched, in production).
    ``$ZFSBACKD_TEST_STORE_CLOCK_FILE`` (a file holding seconds) does the same for every process of a
    test at once (daemons, CLI), read at each write."""

    def __init__(
        self, root: Path | str, *, region: str | None = None, create: bool = False, store_marker: str | None = None
    ) -> None:
        """``region`` names the region in errors; ``create`` makes the root directory (mkdir -p) now;
        ``store_marker`` is the key whose absence means the directory no longer holds the store."""
        super().__init__()
        self.root = Path(root)
        self.region = region
        self.store_marker = store_marker
        self.location = f"local directory {self.root}"
        self._setting = f"regions.{region}.path" if region else "the region's `path`"
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the store directory {self.root}: {exc.strerror}; "
                    f"check {self._setting} and that its parent is writable"
                ) from exc

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def _write_error(self, exc: OSError, key: str) -> StoreError:
        """A failed write as a StoreError that names the region, the directory and the fix."""
        where = f"region {self.region}: " if self.region else ""
        problem, fix = _WRITE_FIXES.get(
            exc.errno or 0,
            (f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, 'error')})",
             "check the file system of the store directory"),
        )
        return StoreError(
            f"{where}cannot write {key} to the store directory {self.root} ({self._setting}): {problem}. "
            f"Nothing already stored was lost: {fix.format(setting=self._setting)}, then run the operation "
            "again (an interrupted backup resumes where it stopped)"
        )

    def _make_parent(self, directory: Path) -> None:
        """Create a missing directory below the root, never the root itself (see the module docstring)."""
        if not self.root.is_dir():
            raise StoreError(
                f"the store directory {self.root} ({self._setting}) is gone: is its file system mounted? "
                "Nothing was written"
            )
        if self.store_marker is not None and not (self.root / self.store_marker).exists():
            raise StoreError(
                f"the store directory {self.root} ({self._setting}) no longer holds the store (its "
                f"`{self.store_marker}` object is gone): is its file system still mounted? Nothing was written"
            )
        directory.mkdir(parents=True, exist_ok=True)

    def _write_temp(self, path: Path, data: bytes | memoryview) -> Path:
        """Write ``data`` to a new temporary file next to ``path`` and fsync it; on any failure remove it."""
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            self._make_parent(path.parent)
            fd = os.open(tmp, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            shift = self.clock_shift + _shared_clock_shift()
            if shift:
                stamp = time.time() + shift
                os.utime(fd, (stamp, stamp))
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.close(fd)  # NFS reports a full disk or quota as late as close()
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        path = self._path(key)
        self.metrics.count("put", written=len(data))
        if path.exists():
            return False
        try:
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)
        except OSError as exc:
            self.metrics.count_error("put")
            raise self._write_error(exc, key) from exc
        return True

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        self.metrics.count("put", written=len(data))
        try:
            tmp = self._write_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._fsync_dir(path.parent)
        except OSError as exc:
            self.metrics.count_error("put")
            raise self._write_error(exc, key) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        data = path.read_bytes()
        self.metrics.count("get", read=len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        path = self._path(key)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if offset < 0:
                offset = max(0, os.fstat(fd).st_size + offset)
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self.metrics.count("get", read=len(data))
        return data

    def head(self, key: str) -> ObjectInfo | None:
        self.metrics.count("head")
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.metrics.count("list")
        # Walk only the directory that can hold the prefix.
        directory, _, _ = prefix.rpartition("/")
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def delete(self, key: str) -> None:
        self.metrics.count("delete")
        self._path(key).unlink(missing_ok=True)

    def stale_writes(self, older_than: float) -> list[ObjectInfo]:
        """``.tmp-*`` files not written to since ``older_than``: a killed writer's partial objects."""
        self.metrics.count("list")
        found: list[ObjectInfo] = []
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if not name.startswith(_TMP_PREFIX):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue  # its writer finished (or another sweep removed it) meanwhile
                if st.st_mtime < older_than:
                    found.append(ObjectInfo(os.path.relpath(full, self.root), st.st_size, st.st_mtime))
        return found

    def remove_stale_writes(self, older_than: float) -> int:
        """Unlink each stale temporary file, checking its age again just before (a writer may have resumed)."""
        removed = 0
        for info in self.stale_writes(older_than):
            path = self._path(info.key)
            try:
                if os.lstat(path).st_mtime >= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            self.metrics.count("delete")
            removed += 1
        return removed

    def check_reachable(self) -> None:
        if not self.root.is_dir():
            region = self.region or "R"
            raise StoreNotInitialized(
                f"the store directory {self.root} ({self._setting}) does not exist. zfsbackd never creates it "
                "implicitly, so that an unmounted file system never receives backups: mount the file system, or "
                f"create the store deliberately with `zfsbackd store init --region {region}` (which creates the "
                "directory)"
            )
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(
                f"the store directory {self.root} is not writable "
                f"({errno.errorcode.get(errno.EACCES)}); run as root or fix its permissions"
            )


def _version(st: os.stat_result) -> str:
    """Every put writes a new file and renames it into place: a new inode, whatever the clock says."""
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _shared_clock_shift() -> float:
    """Tests only: the store clock shift every process of a test shares (see ``clock_shift``)."""
    path = os.environ.get("ZFSBACKD_TEST_STORE_CLOCK_FILE")
    if not path:
        return 0.0
    try:
        return float(Path(path).read_text() or 0)
    except (OSError, ValueError):
        return 0.0
