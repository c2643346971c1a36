"""Each ZFS object's names and ctime as of the last committed backup: the map that turns a send
stream's object numbers into the paths the archiver must look at again.

Inside a ZFS file system an inode number is the object number, so the map costs no system
call of its own: the archiver reports every directory it archives with its nodes (name, inode,
ctime: :meth:`ObjectMap.archived`), and the rows of that directory are replaced by them — or,
when the map is the parent backup's, only its new and changed entries are written and the names
that went are removed (:meth:`ObjectMap.changed`: most of a changed directory is as it was). The
ctime tells an object whose dnode the stream sent only because it shares a dnode block with a
changed one (same ctime) from a changed one. A backup that skips an unchanged directory keeps its rows
from the map of the parent backup's snapshot, which is therefore only used when it describes
exactly that snapshot (``meta.snapshot``) and was complete (every directory listed at least
once since it was started).

One SQLite file per configured file system in ``state_dir/zfs``, a cache and nothing more:
rows are ``(member, parent, name) -> (object, ctime)`` (``parent`` 0 for a member's root directory:
object 0 is the meta-dnode, never a directory), with an index by object. A backup writes in
one transaction that commits with the backup (:meth:`commit`) and is rolled back otherwise;
readers (the change list, on its own thread) use their own connection and see the committed
map of the parent's snapshot, never half of the new one (WAL). A file that cannot be read
is deleted and rebuilt by the next full walk.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

import structlog

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

MAP_FORMAT = 1
#: object numbers per IN (...) query (SQLite's default limit on host parameters is 32766)
_IN_BATCH = 500
#: rows of changed directories kept in memory before they are written (see ObjectMap.changed)
WRITE_BATCH = 20_000
#: a chain of parents longer than this is a corrupt map, not a directory tree
_MAX_DEPTH = 4096
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    member TEXT NOT NULL, parent INTEGER NOT NULL, name BLOB NOT NULL, object INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    PRIMARY KEY (member, parent, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_object ON entries (member, object);
"""


class MapChanges(NamedTuple):
    """What the map says of a batch of objects the stream sent (see :meth:`ObjectMap.changes`)."""

    paths: set[bytes]
    """Every name of the objects that may have changed, as of the map's snapshot."""
    objects: set[int]
    """The objects that may have changed (new ones included: they have no name yet)."""
    names: dict[int, list[bytes]]
    """``paths`` by object (an object with no name that resolves is not in it)."""


class ObjectMap:
    """Names by object number for one file system's datasets (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._deletes: list[tuple[str, int, bytes]] = []
        self._inserts: list[tuple[str, int, bytes, int, int]] = []
        """Rows :meth:`changed` keeps until they are written together (:meth:`_write_batch`)."""
        self._broken = False

    # ----------------------------------------------------------------- reading
    def describes(self, snapshot: str) -> bool:
        """Whether the committed map is complete and exactly that of ``snapshot`` (by name)."""
        meta = self._read(lambda conn: dict(conn.execute("SELECT name, value FROM meta").fetchall()))
        return meta is not None and meta.get("format") == str(MAP_FORMAT) and meta.get("snapshot") == snapshot

    def paths(self, member: str, objects: Iterable[int]) -> set[bytes]:
        """Every name (relative to the member's root) that the committed map gives ``objects``."""
        return self.changes(member, objects, {}).paths

    def changes(self, member: str, objects: Iterable[int], ctimes: Mapping[int, int]) -> MapChanges:
        """The names of ``objects``, but not of those whose ctime is known (``ctimes``) and as it was; and
        the objects that may have changed: all of ``objects`` but those (a new object has no name yet).

        Rows whose chain of parents does not reach the root are of deleted directories and give
        no name. Directories have one name each, so their paths are resolved once and shared.
        """
        wanted = list(objects)
        result = self._read(lambda conn: self._changes(conn, member, wanted, ctimes))
        return result if result is not None else MapChanges(set(), set(wanted), {})

    @staticmethod
    def _changes(conn: sqlite3.Connection, member: str, objects: list[int], ctimes: Mapping[int, int]) -> MapChanges:
        changed = _changed_objects(conn, member, objects, ctimes)
        links = _rows(conn, member, list(changed))  # object -> [(parent, name, ctime)] of those with names
        named: dict[int, tuple[int, bytes]] = {}  # directory -> (its parent, its name)
        wanted = {parent for entries in links.values() for parent, _, _ in entries} - {0}
        for _ in range(_MAX_DEPTH):
            if not wanted:
                break
            found = _rows(conn, member, list(wanted))
            named.update((obj, entries[0][:2]) for obj, entries in found.items())
            wanted = {parent for parent, _ in (named[obj] for obj in found)} - named.keys() - {0}
        resolved: dict[int, bytes | None] = {0: b""}

        def dir_path(directory: int) -> bytes | None:
            chain: list[int] = []
            while directory not in resolved:
                link = named.get(directory)
                if link is None or len(chain) > _MAX_DEPTH:  # a deleted directory's rows, or a cycle
                    resolved.update(dict.fromkeys([*chain, directory]))
                    return None
                chain.append(directory)
                directory = link[0]
            base = resolved[directory]
            for obj in reversed(chain):
                base = None if base is None else _join(base, named[obj][1])
                resolved[obj] = base
            return base

        paths: set[bytes] = set()
        names: dict[int, list[bytes]] = {}
        for obj, entries in links.items():
            for parent, name, _ in entries:
                base = dir_path(parent)
                if base is not None:
                    path = _join(base, name)
                    paths.add(path)
                    names.setdefault(obj, []).append(path)
        return MapChanges(paths, changed, names)

    def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T | None:
        """Run ``query`` on a fresh reader connection; None when there is no usable map."""
        if self._broken or not self.path.exists():
            return None
        try:
            conn = sqlite3.connect(self.path, timeout=30)  # not mode=ro: WAL readers may need to make the -shm
            try:
                return query(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            self._discard(f"unreadable: {exc}")
            return None

    # ----------------------------------------------------------------- writing
    def archived(self, member: str, parent: int, entries: list[tuple[bytes, int, int]]) -> None:
        """The directory ``parent`` (0: the member's root) holds ``entries`` (name, object, ctime) now."""
        with self._lock:
            self._write_batch()  # (its rows as they are so far)
            conn = self._begin()
            if conn is None:
                return
            try:
                # Only what differs is written: a changed directory has mostly unchanged entries.
                rows = conn.execute(
                    "SELECT name, object, ctime_ns FROM entries WHERE member = ? AND parent = ?", (member, parent)
                )
                before = {bytes(name): (obj, ctime) for name, obj, ctime in rows}
                now = {name: (obj, ctime) for name, obj, ctime in entries}
                conn.executemany(
                    "DELETE FROM entries WHERE member = ? AND parent = ? AND name = ?",
                    [(member, parent, name) for name in before.keys() - now.keys()],
                )
                conn.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                    [(member, parent, name, *row) for name, row in now.items() if before.get(name) != row],
                )
            except sqlite3.Error as exc:
                self._fail(exc)

    def changed(self, member: str, parent: int, entries: list[tuple[bytes, int, int]], removed: set[bytes]) -> None:
        """In the directory ``parent``, ``entries`` (name, object, ctime) are new or changed and the names
        ``removed`` are gone; its other rows stay as they are.

        Kept in memory and written with other directories' (up to ``WRITE_BATCH`` rows): two statements
        per directory cost more than their rows (a few ms each under emulation, hundreds per backup).
        """
        with self._lock:
            self._deletes.extend((member, parent, name) for name in removed)
            self._inserts.extend((member, parent, *row) for row in entries)
            if len(self._deletes) + len(self._inserts) >= WRITE_BATCH:
                self._write_batch()

    def _write_batch(self) -> None:
        """Write what :meth:`changed` kept (lock held): the removals first, as one directory's were."""
        deletes, inserts, self._deletes, self._inserts = self._deletes, self._inserts, [], []
        if not deletes and not inserts:
            return
        conn = self._begin()
        if conn is None:
            return
        try:
            conn.executemany("DELETE FROM entries WHERE member = ? AND parent = ? AND name = ?", deletes)
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", inserts)
        except sqlite3.Error as exc:
            self._fail(exc)

    def commit(self, snapshot: str | None) -> None:
        """The backup of ``snapshot`` is committed: so is the map, as that snapshot's (None: incomplete)."""
        with self._lock:
            self._write_batch()
            conn = self._begin()
            if conn is None:
                return
            try:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(MAP_FORMAT),))
                if snapshot is None:
                    conn.execute("DELETE FROM meta WHERE name = 'snapshot'")
                else:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('snapshot', ?)", (snapshot,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._fail(exc)
            self._close_writer()

    def rollback(self) -> None:
        """The backup did not commit: forget what it listed."""
        with self._lock:
            self._deletes, self._inserts = [], []
            if self._writer is not None:
                try:
                    self._writer.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.warning("zfs_object_map_rollback_failed", path=str(self.path), error=str(exc))
            self._close_writer()

    def _begin(self) -> sqlite3.Connection | None:
        """The writer's connection inside its open transaction (lock held); None once the map is broken."""
        if self._broken:
            return None
        if self._writer is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                # A commit lost with power is only the map of an older snapshot than the base: one full walk.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM meta WHERE name = 'snapshot'")  # until commit() says which
                self._writer = conn
            except (OSError, sqlite3.Error) as exc:
                self._fail(exc)
        return self._writer

    def _fail(self, exc: BaseException) -> None:
        self._close_writer()
        self._discard(f"cannot be written: {exc}")

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _discard(self, reason: str) -> None:
        """Give up on the file for this process: delete it, so the next full walk builds a new one."""
        self._broken = True
        log.warning("zfs_object_map_discarded", path=str(self.path), reason=reason)
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


def _changed_objects(
    conn: sqlite3.Connection, member: str, objects: list[int], ctimes: Mapping[int, int]
) -> set[int]:
    """Those of ``objects`` that may have changed: with no ctime known (``ctimes``), with no row (new), or with
    a row whose ctime is not the one known.

    Compared inside SQLite, against a temporary table of what the stream said: a dnode block is sent
    whole when one of its 32 dnodes changed, so with scattered churn most objects sent are as they
    were (11,000 sent for 600 changed at 1 % of 50,000 files), and fetching every one's rows into
    Python to compare them took most of the change list's time after the stream itself.
    """
    conn.execute("PRAGMA temp_store = MEMORY")  # (at most a batch's rows: no temporary file, wherever /tmp is)
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS sent (object INTEGER PRIMARY KEY, ctime_ns INTEGER)")
    try:
        conn.executemany("INSERT OR REPLACE INTO sent VALUES (?, ?)", ((obj, ctimes.get(obj)) for obj in objects))
        found = conn.execute(
            # INDEXED BY: see _rows
            "SELECT object FROM sent WHERE ctime_ns IS NULL"
            " OR NOT EXISTS (SELECT 1 FROM entries INDEXED BY entries_by_object"
            "   WHERE member = ?1 AND object = sent.object)"
            " OR EXISTS (SELECT 1 FROM entries INDEXED BY entries_by_object"
            "   WHERE member = ?1 AND object = sent.object AND ctime_ns != sent.ctime_ns)",
            (member,),
        )
        return {obj for (obj,) in found}
    finally:
        conn.execute("DELETE FROM sent")


def _rows(conn: sqlite3.Connection, member: str, objects: list[int]) -> dict[int, list[tuple[int, bytes, int]]]:
    """object -> [(parent, name, ctime)] for ``objects``, in batches of one IN (...) query."""
    found: dict[int, list[tuple[int, bytes, int]]] = {}
    for start in range(0, len(objects), _IN_BATCH):
        batch = objects[start : start + _IN_BATCH]
        marks = ",".join("?" * len(batch))
        for parent, name, obj, ctime in conn.execute(
            # INDEXED BY: without statistics SQLite would pick the primary key (member, ...) and scan it all
            f"SELECT parent, name, object, ctime_ns FROM entries INDEXED BY entries_by_object "
            f"WHERE member = ? AND object IN ({marks})",
            (member, *batch),
        ):
            found.setdefault(obj, []).append((parent, bytes(name), ctime))
    return found
