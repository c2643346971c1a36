"""A set of blob ids on disk: what the live backups reference, without a Python object per blob.

Garbage collection and ``check`` need the set of every blob the live backups
reference. As a Python ``set`` it costs ~100 B per blob (a bytes object and a
table slot): 100 MiB at a million files, 2 GiB at twenty million, in one
process. Here it is one row per blob of an SQLite table in a private file of
the state directory's cache, which the process deletes when it is done (and
the next one deletes if the process was killed); the process holds only
SQLite's bounded page cache, so memory stays flat whatever the store's size.

Ids are added through a buffer that is sorted before it is written, so that a
batch lands on neighbouring B-tree pages instead of one random page per id.
Nothing here is persistent or shared: the file is rebuilt by every walk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from zfsbackd.errors import StoreError

T = TypeVar("T")

#: ids buffered in memory before a sorted batch is written (~100 B each while buffered)
BUFFER_IDS = 65_536
#: SQLite's page cache for the set (KiB)
_PAGE_CACHE_KIB = 8192
#: ids per ``IN (...)`` query of :meth:`BlobIdSet.present`
_IN_BATCH = 500
_PREFIX = "blobids-"


class BlobIdSet:
    """An on-disk set of blob ids (32-byte strings); use it as a context manager so its file goes away."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}.sqlite"
        self._buffer: list[bytes] = []
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            _remove_orphans(directory)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from exc
        try:
            self._guarded(self._create)
        except StoreError:
            self.close()
            raise

    def _create(self) -> None:
        self._conn.execute("PRAGMA journal_mode=OFF")  # a private scratch file: a crash just discards it
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute(f"PRAGMA cache_size=-{_PAGE_CACHE_KIB}")
        self._conn.execute("CREATE TABLE ids (blob_id BLOB PRIMARY KEY) WITHOUT ROWID")

    def _guarded(self, op: Callable[[], T]) -> T:
        """Run ``op``; an SQLite error (a full or read-only file system) is a StoreError that says where."""
        try:
            return op()
        except sqlite3.Error as exc:
            raise self._unusable(exc) from exc

    def _unusable(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"the scratch file {self.path}, which holds the blobs the live backups reference while they are "
            f"marked, cannot be written ({exc}): check the file system of state_dir (full? read-only?); "
            "nothing was deleted"
        )

    def add(self, blob_id: bytes) -> None:
        self._buffer.append(blob_id)
        if len(self._buffer) >= BUFFER_IDS:
            self._flush()

    def add_many(self, blob_ids: Iterable[bytes]) -> None:
        self._buffer.extend(blob_ids)
        if len(self._buffer) >= BUFFER_IDS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._buffer.sort()
        self._guarded(self._insert_buffer)
        self._buffer.clear()

    def _insert_buffer(self) -> None:
        try:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR IGNORE INTO ids VALUES (?)", ((b,) for b in self._buffer))
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def present(self, blob_ids: list[bytes]) -> set[bytes]:
        """Which of ``blob_ids`` are in the set, in a few queries."""
        self._flush()
        found: set[bytes] = set()
        for start in range(0, len(blob_ids), _IN_BATCH):
            part = blob_ids[start : start + _IN_BATCH]
            query = f"SELECT blob_id FROM ids WHERE blob_id IN ({','.join('?' * len(part))})"
            found.update(self._guarded(lambda q=query, p=part: [row[0] for row in self._conn.execute(q, p)]))
        return found

    def __len__(self) -> int:
        self._flush()
        return int(self._guarded(lambda: self._conn.execute("SELECT count(*) FROM ids").fetchone()[0]))

    def batches(self, size: int = _IN_BATCH) -> Iterator[list[bytes]]:
        """Every id, in order, ``size`` at a time."""
        self._flush()
        cursor = self._guarded(lambda: self._conn.execute("SELECT blob_id FROM ids ORDER BY blob_id"))
        while rows := self._guarded(lambda: cursor.fetchmany(max(size, 1))):
            yield [row[0] for row in rows]

    def close(self) -> None:
        self._buffer.clear()
        self._conn.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> BlobIdSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _remove_orphans(directory: Path) -> None:
    """Delete the sets of processes that were killed before they could (their pid is in the name)."""
    for path in directory.glob(f"{_PREFIX}*.sqlite"):
        pid = path.name.removeprefix(_PREFIX).partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True
