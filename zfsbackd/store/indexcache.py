"""The blob index as an SQLite file in ``state_dir``: a cache of the store's ``index/`` objects.

Why not Python objects: a dict of every blob costs ~430 B per blob in every
process and seconds per million blobs to decode at every open (bench/README.md,
"Scale benchmark"); a 10M-blob store would need ~4 GiB per process. Here a
blob is one row of a ``WITHOUT ROWID`` table on disk (blob id, a small pack
number, offset, sealed and plaintext length, type) and a process holds only
SQLite's page cache; the OS page cache holds the file. Why SQLite: in the
standard library, crash-safe (WAL: a killed writer's transaction is rolled
back on the next open), many readers at once across threads and processes,
and it releases the GIL while it searches. Measured figures: README "Why each
dependency" and bench/README.md.

Nothing here is trusted for data: every blob read re-hashes its id, a cached
location that does not hold its blob is checked against the pack's
authenticated header (:meth:`zfsbackd.store.repository.Store.read_blob`), and
a cache that is not a database, is truncated, belongs to another store or to
another cache format is deleted and rebuilt from the store (FORMAT.md, "Local
index cache").

Thread model: each thread has its own connection (readers never wait for each
other, nor for a writer: WAL); writes are serialized by a lock within the
process and by SQLite's write lock (``BEGIN IMMEDIATE``, waiting up to a
minute) across processes — the daemon and a CLI restore may share the file.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any, TypeVar

import structlog

from zfsbackd import faults
from zfsbackd.errors import StoreError
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.index import Location
from zfsbackd.store.packs import PackEntry

#: Bumped whenever the schema or the meaning of a column changes: an older cache is rebuilt, never migrated.
CACHE_FORMAT = 1
CACHE_FILE = "index.sqlite"
_SUFFIXES = ("", "-wal", "-shm", "-journal")
#: SQLite's page cache per connection (KiB); the file itself stays in the OS page cache.
_PAGE_CACHE_KIB = 4096
#: All of SQLite's memory in this process together (bytes): past it, page caches recycle their pages
#: instead of growing. Why: each thread that queries has its own connection and so its own page cache,
#: and a backup's process has up to nine; together they held 6 to 17 MiB at 3M files, rising with the
#: size of the cache file. A process-wide limit bounds them whatever the count of threads.
_SQLITE_HEAP_BYTES = 8 << 20
#: How long a writer waits for another process's write transaction.
BUSY_TIMEOUT_S = 60.0
#: Rows fetched at a time by the iterators (bounded memory, few round trips).
_FETCH = 4096
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26  # primary result codes (sqlite3.h)

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE packs (
    id INTEGER PRIMARY KEY,
    pack_id BLOB NOT NULL UNIQUE,
    blobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE blobs (
    blob_id BLOB NOT NULL,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    type INTEGER NOT NULL,
    PRIMARY KEY (blob_id, pack)
) WITHOUT ROWID;
CREATE INDEX blobs_by_pack ON blobs (pack);
CREATE TABLE index_objects (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE index_packs (pack INTEGER NOT NULL, key TEXT NOT NULL, PRIMARY KEY (pack, key)) WITHOUT ROWID;
CREATE INDEX index_packs_by_key ON index_packs (key);
"""

_LOCATE = (
    "SELECT p.pack_id, b.offset, b.length, b.raw_length, b.type FROM blobs b JOIN packs p ON p.id = b.pack "
    "WHERE b.blob_id = ? ORDER BY b.pack LIMIT 1"
)

_LOCATE_MANY = (
    "SELECT b.blob_id, p.pack_id, b.offset, b.length, b.raw_length, b.type FROM blobs b "
    "JOIN packs p ON p.id = b.pack WHERE b.blob_id IN ({}) ORDER BY b.pack"
)
#: blob ids per ``IN (...)`` query of :meth:`BlobIndex.get_many` and :meth:`BlobIndex.present` (SQLite allows 32,766)
_IN_BATCH = 500

#: BlobType by value without the enum call (a measurable share of a lookup)
_BLOB_TYPES = {t.value: t for t in BlobType}

log = structlog.get_logger(__name__)
T = TypeVar("T")


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced: a thread's connection closes when the thread ends."""


class IndexCacheCorrupt(Exception):
    """The cache file failed (not a database, malformed): it is deleted and rebuilt from the store."""


class BlobIndex:
    """Blob id → location, for every blob of one store, on disk.

    ``get``, ``in`` and ``len`` answer as the in-memory index did (a blob
    stored in two packs answers with the one recorded first, by pack number,
    so garbage collection sees one location per blob); per-pack questions are
    per-pack queries (:meth:`pack_entries`) or a stream
    (:meth:`iter_packs`), never a copy of the whole index. Which ``index/``
    objects the cache has absorbed, and which packs each listed, is kept too,
    so that opening a store reads only the objects it has not seen.
    """

    def __init__(self, directory: Path | None, store_id: str) -> None:
        """``directory`` None: a private temporary cache, removed with this object (tests, tools)."""
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="zfsbackd-index-"))
            self._finalizer: weakref.finalize | None = weakref.finalize(self, shutil.rmtree, directory, True)
        else:
            self._finalizer = None
        self.path = directory / CACHE_FILE
        self.store_id = store_id
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._generation = 0  # bumped by reset(): threads then reconnect to the new file
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()  # to close them all at close()
        self._conn_lock = threading.Lock()
        #: called after the cache was found corrupt and emptied: re-sync it from the store
        self.on_reset: Callable[[], None] | None = None
        self.rebuilt_reason: str | None = None
        """Why the cache was rebuilt when it was opened (None: it was reused or new)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._open_checked()

    # ------------------------------------------------------------ the file
    def _open_checked(self) -> None:
        """Use the existing file only if it is whole, of this format and of this store; else start afresh."""
        reason = self._invalid_reason() if self.path.exists() else None
        if reason is not None:
            log.warning("index_cache_rebuilt", path=str(self.path), reason=reason)
            self.rebuilt_reason = reason
            self._delete_files()
        with self._write_lock:
            self._create_schema()

    def _invalid_reason(self) -> str | None:
        try:
            size = self.path.stat().st_size
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
            try:
                truncated = truncation(conn, self.path, size)
                if truncated is not None:
                    return truncated
                tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables:
                    # Made by a process killed before its schema committed, or being made right now by
                    # another: either way _create_schema (under the write lock) completes it in place.
                    return None
                if "meta" not in tables:
                    return f"not a cache of this zfsbackd (tables {sorted(tables)})"
                meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise self._unusable(exc) from exc
            return f"not a readable cache ({exc})"
        if meta.get("format") != str(CACHE_FORMAT):
            return f"cache format {meta.get('format')}, this zfsbackd uses {CACHE_FORMAT}"
        if meta.get("store_id") != self.store_id:
            return f"made for store {meta.get('store_id')}, not {self.store_id}"
        return None

    def _unusable(self, exc: sqlite3.Error) -> StoreError:
        """An error of the cache's file system, not of its content: rebuilding would not help."""
        return StoreError(
            f"the local blob index cache {self.path} cannot be used ({exc}): check the file system of "
            "state_dir (full? read-only? another zfsbackd process stuck?); the cache can always be deleted, "
            "it is rebuilt from the store"
        )

    def _delete_files(self) -> None:
        delete_database(self.path)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection to the current file (a new one after :meth:`reset`)."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            stale = getattr(local, "conn", None)
            if stale is not None:  # of a file reset() replaced: this thread's, so closing it is safe
                stale.close()
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a crash loses at most recent rows: they are re-read
            conn.execute(f"PRAGMA cache_size=-{_PAGE_CACHE_KIB}")
            conn.execute(f"PRAGMA soft_heap_limit={_SQLITE_HEAP_BYTES}")
            with self._conn_lock:
                self._connections.add(conn)
            local.conn, local.generation = conn, self._generation
        return local.conn  # type: ignore[no-any-return]

    def reset(self, reason: str) -> None:
        """Forget everything: delete the file and start an empty one (the caller re-syncs it)."""
        log.warning("index_cache_rebuilt", path=str(self.path), reason=reason)
        with self._write_lock:
            # Other threads' connections are left to them (closed on their next use): closing a
            # connection another thread is using is not safe. Until then they read the old, unlinked
            # file, whose answers are as good as before (every read is verified anyway).
            self._generation += 1
            self._delete_files()
            self._create_schema()

    def _create_schema(self) -> None:
        """Create the tables unless there (write lock held); one transaction, so never half made."""
        with self._transaction(locked=True) as conn:
            if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'meta'").fetchone()[0]:
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)", [("format", str(CACHE_FORMAT)), ("store_id", self.store_id)]
            )

    def _close_connections(self) -> None:
        with self._conn_lock:
            for conn in list(self._connections):
                conn.close()
            self._connections.clear()

    def close(self) -> None:
        """Close every connection (and remove a temporary cache)."""
        self._close_connections()
        self._generation += 1
        if self._finalizer is not None:
            self._finalizer()

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection | None = None, *, locked: bool = False) -> Iterator[
        sqlite3.Connection
    ]:
        """One write transaction; writers of this process queue on a lock, other processes on SQLite's."""
        if not locked:
            self._write_lock.acquire()
        try:
            conn = conn or self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if not locked:
                self._write_lock.release()

    def _guarded(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op``; a cache that turns out corrupt is rebuilt from the store and ``op`` tried once more.

        Inside a sync (``on_reset`` unset or already running) the corruption is
        raised as :class:`IndexCacheCorrupt` for the sync to restart.
        """
        try:
            return op(self._conn())
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise self._unusable(exc) from exc
            resync = self.on_reset
            if resync is None or getattr(self._local, "manual", False):
                raise IndexCacheCorrupt(str(exc)) from exc
            problem = str(exc)
        with self.manual_recovery():
            self.reset(f"corrupt ({problem})")
            resync()
            return op(self._conn())

    @contextmanager
    def manual_recovery(self) -> Iterator[None]:
        """In this thread, report corruption as :class:`IndexCacheCorrupt` instead of recovering (a sync)."""
        before = getattr(self._local, "manual", False)
        self._local.manual = True
        try:
            yield
        finally:
            self._local.manual = before

    # ------------------------------------------------------------- lookups
    def get(self, blob_id: bytes) -> Location | None:
        row = self._guarded(lambda c: c.execute(_LOCATE, (blob_id,)).fetchone())
        if row is None:
            return None
        pack_id, offset, length, raw_length, blob_type = row
        return Location(pack_id, offset, length, raw_length, _BLOB_TYPES[blob_type])

    def __contains__(self, blob_id: object) -> bool:
        return self._guarded(
            lambda c: c.execute("SELECT 1 FROM blobs WHERE blob_id = ? LIMIT 1", (blob_id,)).fetchone() is not None
        )

    def locations(self, blob_id: bytes) -> list[Location]:
        """Every location of ``blob_id`` (a blob stored twice has two), in the order :meth:`get` prefers."""
        rows = self._guarded(lambda c: c.execute(_LOCATE.removesuffix(" LIMIT 1"), (blob_id,)).fetchall())
        return [Location(p, o, n, r, _BLOB_TYPES[t]) for p, o, n, r, t in rows]

    def keeping_pack(self, blob_id: bytes, *, present: set[bytes], avoid: frozenset[bytes]) -> bytes | None:
        """The pack whose copy of ``blob_id`` garbage collection keeps; every other copy is a duplicate its
        pack need not keep.

        Only a pack in ``present`` (the store's listing) counts: the index may
        still name a pack a killed collection deleted. Of those, one outside
        ``avoid`` (deletion candidates) if any; then the greatest pack id, an
        order every host agrees on (pack numbers are this cache's own).
        """
        rows = self._guarded(
            lambda c: c.execute(
                "SELECT p.pack_id FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.blob_id = ?", (blob_id,)
            ).fetchall()
        )
        held = [pack_id for (pack_id,) in rows if pack_id in present]
        return max(held, key=lambda pack_id: (pack_id not in avoid, pack_id), default=None)

    def get_many(self, blob_ids: list[bytes]) -> dict[bytes, Location]:
        """:meth:`get` for many blobs, in a few queries (a restore plans its reads with it)."""
        found: dict[bytes, Location] = {}
        for blob_id, pack_id, offset, length, raw_length, blob_type in self._rows_for(_LOCATE_MANY, blob_ids):
            if blob_id not in found:  # rows come in get()'s order of preference
                found[blob_id] = Location(pack_id, offset, length, raw_length, _BLOB_TYPES[blob_type])
        return found

    def present(self, blob_ids: list[bytes]) -> set[bytes]:
        """Which of ``blob_ids`` the index has: one query (one read transaction) for many blobs, where
        ``in`` per blob took a read lock each (two ``fcntl`` calls) and most of a small file's lookup time."""
        return {row[0] for row in self._rows_for("SELECT blob_id FROM blobs WHERE blob_id IN ({})", blob_ids)}

    def _rows_for(self, template: str, blob_ids: list[bytes]) -> Iterator[tuple[Any, ...]]:
        """The rows of ``template`` (an ``IN ({})`` query) for ``blob_ids``, _IN_BATCH ids per query."""
        for start in range(0, len(blob_ids), _IN_BATCH):
            part = blob_ids[start : start + _IN_BATCH]
            query = template.format(",".join("?" * len(part)))
            yield from self._guarded(lambda c, q=query, a=part: c.execute(q, a).fetchall())

    def duplicated(self) -> set[bytes]:
        """The blobs stored in more than one pack (a scan in SQLite; few in a healthy store)."""
        return self._guarded(
            lambda c: {row[0] for row in c.execute("SELECT blob_id FROM blobs GROUP BY blob_id HAVING count(*) > 1")}
        )

    def stored_outside(self, blob_id: bytes, packs: frozenset[bytes]) -> bool:
        """Is ``blob_id`` in at least one pack not in ``packs``?"""
        rows = self._guarded(
            lambda c: c.execute(
                "SELECT p.pack_id FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.blob_id = ?", (blob_id,)
            ).fetchall()
        )
        return any(pack_id not in packs for (pack_id,) in rows)

    def __len__(self) -> int:
        """Distinct blobs (a scan: for reports and tests, not for hot paths)."""
        return int(self._guarded(lambda c: c.execute("SELECT count(DISTINCT blob_id) FROM blobs").fetchone()[0]))

    def has_pack(self, pack_id: bytes) -> bool:
        return self._pack_number(pack_id) is not None

    def _pack_number(self, pack_id: bytes) -> int | None:
        row = self._guarded(lambda c: c.execute("SELECT id FROM packs WHERE pack_id = ?", (pack_id,)).fetchone())
        return None if row is None else int(row[0])

    def pack_ids(self) -> set[bytes]:
        """Every known pack (one 32-byte id per pack: packs are few next to blobs)."""
        return self._guarded(lambda c: {row[0] for row in c.execute("SELECT pack_id FROM packs")})

    def pack_entries(self, pack_id: bytes) -> list[PackEntry]:
        """The blobs a pack holds, by offset (empty for an unknown pack)."""
        return self._guarded(
            lambda c: [
                _entry(row)
                for row in c.execute(
                    "SELECT b.type, b.blob_id, b.offset, b.length, b.raw_length FROM blobs b JOIN packs p "
                    "ON p.id = b.pack WHERE p.pack_id = ? ORDER BY b.offset",
                    (pack_id,),
                )
            ]
        )

    def iter_packs(self) -> Iterator[tuple[bytes, list[PackEntry]]]:
        """Every pack with its entries, one pack at a time (garbage collection, the consolidated index)."""
        cursor = self._conn().execute(
            "SELECT p.pack_id, b.type, b.blob_id, b.offset, b.length, b.raw_length FROM packs p "
            "JOIN blobs b ON b.pack = p.id ORDER BY p.id, b.offset"
        )
        for pack_id, rows in groupby(_fetch_all(cursor), key=lambda row: row[0]):
            yield pack_id, [_entry(row[1:]) for row in rows]

    def blob_ids(self) -> Iterator[bytes]:
        cursor = self._conn().execute("SELECT DISTINCT blob_id FROM blobs")
        for row in _fetch_all(cursor):
            yield row[0]

    # ------------------------------------------------------------- updates
    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        """A pack whose header this process knows (written or adopted); no index object lists it yet."""
        entries = list(entries)
        self._guarded(lambda c: self._write(lambda w: self._insert_pack(w, pack_id, entries)))

    def add_index_object(self, key: str, packs: dict[bytes, list[PackEntry]]) -> None:
        """Absorb one ``index/`` object (one this process wrote): see :meth:`absorb`."""
        self.absorb([(key, packs)])

    def absorb(self, objects: Iterable[tuple[str, dict[bytes, list[PackEntry]]]]) -> int:
        """Absorb index objects — their packs, their blobs, and that they were seen — in one transaction.

        Rows are first appended to this connection's temporary tables (no lock
        on the cache: other processes keep writing while objects are
        downloaded), then merged in blob-id order in one short write
        transaction. Blob ids are random, so inserting them as they come
        would touch a random page of the table per row; merged in order, each
        page is written once per sync, many times faster at millions of blobs
        (bench/README.md, "Blob index cache"). A crash before the commit
        leaves the cache as it was (WAL rolls the transaction back): the next
        sync reads the same objects again. Returns the objects absorbed.
        """

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS staged_blobs (blob_id, pack_id, offset, length, raw, type)")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS staged_packs (pack_id, key, blobs, bytes)")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS staged_keys (key)")
            count = 0
            try:
                for key, packs in objects:
                    with conn:  # one temp-table transaction per object: appends only
                        conn.execute("BEGIN")
                        for pack_id, entries in packs.items():
                            conn.execute(
                                "INSERT INTO staged_packs VALUES (?, ?, ?, ?)",
                                (pack_id, key, len(entries), sum(e.length for e in entries)),
                            )
                            if conn.execute("SELECT 1 FROM main.packs WHERE pack_id = ?", (pack_id,)).fetchone():
                                continue  # known already (a pack is immutable): its blob rows are there
                            conn.executemany(
                                "INSERT INTO staged_blobs VALUES (?, ?, ?, ?, ?, ?)",
                                ((e.blob_id, pack_id, e.offset, e.length, e.raw_length, int(e.blob_type))
                                 for e in entries),
                            )
                        conn.execute("INSERT INTO staged_keys VALUES (?)", (key,))
                    count += 1
                if count:
                    self._write(_merge_staged)
            finally:
                for table in ("staged_blobs", "staged_packs", "staged_keys"):
                    conn.execute(f"DELETE FROM temp.{table}")
            return count

        return self._guarded(run)

    def record_index_object(self, key: str, pack_ids: Iterable[bytes]) -> None:
        """Record an index object this process wrote about packs the cache knows already."""

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO index_packs SELECT id, ? FROM packs WHERE pack_id = ?",
                ((key, pack_id) for pack_id in pack_ids),
            )
            conn.execute("INSERT OR IGNORE INTO index_objects VALUES (?)", (key,))
            faults.point("index-cache-written")  # written, not committed (as in _merge_staged)

        self._guarded(lambda c: self._write(write))

    def _write(self, body: Callable[[sqlite3.Connection], None]) -> None:
        with self._transaction() as conn:
            body(conn)

    @staticmethod
    def _insert_pack(conn: sqlite3.Connection, pack_id: bytes, entries: list[PackEntry]) -> int:
        """Insert a pack and its blobs unless known (packs are immutable: same id, same blobs); its number."""
        cursor = conn.execute(
            "INSERT OR IGNORE INTO packs (pack_id, blobs, bytes) VALUES (?, ?, ?)",
            (pack_id, len(entries), sum(e.length for e in entries)),
        )
        new = cursor.rowcount == 1
        number = int(conn.execute("SELECT id FROM packs WHERE pack_id = ?", (pack_id,)).fetchone()[0])
        if new:
            conn.executemany(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                sorted((e.blob_id, number, e.offset, e.length, e.raw_length, int(e.blob_type)) for e in entries),
            )
        return number

    def remove_packs(self, pack_ids: Iterable[bytes]) -> None:
        """Forget packs (deleted by garbage collection); blobs also kept in other packs stay known."""
        ids = list(pack_ids)

        def write(conn: sqlite3.Connection) -> None:
            for pack_id in ids:
                row = conn.execute("SELECT id FROM packs WHERE pack_id = ?", (pack_id,)).fetchone()
                if row is not None:
                    _delete_pack(conn, int(row[0]))

        self._guarded(lambda c: self._write(write))

    # --------------------------------------------------- index-object bookkeeping
    def data_listed_at(self) -> float | None:
        """When (unix seconds) a sync last listed the store's ``data/`` through this cache, if ever."""
        row = self._guarded(lambda c: c.execute("SELECT value FROM meta WHERE name = 'data_listed_at'").fetchone())
        return float(row[0]) if row else None

    def set_data_listed_at(self, when: float) -> None:
        self._guarded(lambda c: self._write(
            lambda w: w.execute("INSERT OR REPLACE INTO meta VALUES ('data_listed_at', ?)", (repr(when),))
        ))

    def seen_index_keys(self) -> set[str]:
        return self._guarded(lambda c: {row[0] for row in c.execute("SELECT key FROM index_objects")})

    def last_pack_number(self) -> int:
        return int(self._guarded(lambda c: c.execute("SELECT coalesce(max(id), 0) FROM packs").fetchone()[0]))

    def forget_index_objects(self, keys: Iterable[str], *, present: set[bytes], up_to: int) -> int:
        """Index objects gone from the store: drop the packs only they listed, unless the pack still exists.

        A pack stays while another seen index object lists it or it is
        present in ``data/`` (it is then as good as adopted: its rows came
        from an authenticated index or header). Packs numbered above
        ``up_to`` were added after ``present`` was listed (a writer of
        this or another process) and are never dropped. Returns the packs dropped.
        """
        keys = list(keys)
        dropped = 0

        def write(conn: sqlite3.Connection) -> None:
            nonlocal dropped
            for key in keys:
                conn.execute("DELETE FROM index_packs WHERE key = ?", (key,))
                conn.execute("DELETE FROM index_objects WHERE key = ?", (key,))
            unlisted = conn.execute(
                "SELECT id, pack_id FROM packs WHERE id <= ? AND NOT EXISTS "
                "(SELECT 1 FROM index_packs i WHERE i.pack = packs.id)",
                (up_to,),
            ).fetchall()
            for number, pack_id in unlisted:
                if pack_id not in present:
                    _delete_pack(conn, int(number))
                    dropped += 1

        self._guarded(lambda c: self._write(write))
        return dropped


def truncation(conn: sqlite3.Connection, path: Path, size: int) -> str | None:
    """Why the database file *path* of *size* bytes, open as *conn*, is cut short (None: it is whole).

    A file shorter than its pages is truncated unless its WAL still holds them (not checkpointed yet)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    wal = Path(f"{path}-wal")
    if size < page_size * pages and not (wal.exists() and wal.stat().st_size > 0):
        return f"truncated ({size} bytes, {pages} pages of {page_size})"
    return None


def delete_database(path: Path) -> None:
    """Remove an SQLite file and its WAL, shared-memory and journal files."""
    for suffix in _SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def is_corruption(exc: sqlite3.Error) -> bool:
    """Damage of the file itself (rebuilt), as opposed to its file system failing (reported)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return type(exc) is sqlite3.DatabaseError
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _merge_staged(conn: sqlite3.Connection) -> None:
    """Move staged rows into the cache (inside the caller's write transaction), blobs in id order."""
    conn.execute(
        "INSERT OR IGNORE INTO packs (pack_id, blobs, bytes) "
        "SELECT pack_id, blobs, bytes FROM temp.staged_packs ORDER BY rowid"
    )
    conn.execute(
        "INSERT OR IGNORE INTO blobs SELECT s.blob_id, p.id, s.offset, s.length, s.raw, s.type "
        "FROM temp.staged_blobs s JOIN packs p ON p.pack_id = s.pack_id ORDER BY s.blob_id, p.id"
    )
    conn.execute(
        "INSERT OR IGNORE INTO index_packs SELECT p.id, s.key FROM temp.staged_packs s "
        "JOIN packs p ON p.pack_id = s.pack_id WHERE s.key IS NOT NULL"
    )
    conn.execute("INSERT OR IGNORE INTO index_objects SELECT key FROM temp.staged_keys")
    faults.point("index-cache-written")  # rows written into the cache file, not committed yet


def _delete_pack(conn: sqlite3.Connection, number: int) -> None:
    conn.execute("DELETE FROM blobs WHERE pack = ?", (number,))
    conn.execute("DELETE FROM index_packs WHERE pack = ?", (number,))
    conn.execute("DELETE FROM packs WHERE id = ?", (number,))


def _entry(row: tuple[int, bytes, int, int, int]) -> PackEntry:
    blob_type, blob_id, offset, length, raw_length = row
    return PackEntry(_BLOB_TYPES[blob_type], blob_id, offset, length, raw_length)


def _fetch_all(cursor: sqlite3.Cursor) -> Iterator[tuple]:  # type: ignore[type-arg]
    """The rows of ``cursor``; closed however the iteration ends, so no read transaction stays open."""
    try:
        while rows := cursor.fetchmany(_FETCH):
            yield from rows
    finally:
        cursor.close()


def cache_directory(state_dir: Path, store_id: str) -> Path:
    """Where a store's cache lives: one directory per store id, so two stores never share one."""
    return Path(state_dir) / "cache" / store_id


