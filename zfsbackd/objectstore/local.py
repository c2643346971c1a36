"""A directory as an object store: the embedded default and the reference backend.

Durability matters more than speed here: every object is written to a
temporary file, fsync'ed, then linked (create-only) or renamed (replace) into
place, and the directory is fsync'ed, so a crash never leaves a partial object
under its final key.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from zfsbackd.errors import StoreError
from zfsbackd.objectstore.base import ObjectInfo, ObjectStore

_TMP_PREFIX = ".tmp-"


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        super().__init__()
        self.root = Path(root)
        self.location = f"local directory {self.root}"
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the store directory {self.root}: {exc.strerror}; "
                    "check the region's `path` and that its parent is writable"
                ) from exc

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def _write_temp(self, path: Path, data: bytes | memoryview) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
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
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir(path.parent)
        return True

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        self.metrics.count("put", written=len(data))
        tmp = self._write_temp(path, data)
        os.replace(tmp, path)
        self._fsync_dir(path.parent)

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
        return ObjectInfo(key, st.st_size, st.st_mtime)

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
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self.metrics.count("delete")
        self._path(key).unlink(missing_ok=True)

    def check_reachable(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"the store directory {self.root} does not exist; check the region's `path`")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(
                f"the store directory {self.root} is not writable "
                f"({errno.errorcode.get(errno.EACCES)}); run as root or fix its permissions"
            )
