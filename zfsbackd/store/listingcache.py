"""Which directory listing each tree was made from: ``state_dir/cache/<store id>/listings.sqlite``.

Why: a backup in which little changed still compares every entry of the source with its node in
the parent backup. At a million files that was most of a no-change backup's Python time — reading
and parsing the parent's trees (a dict per node), then a stat result against a node per entry —
on top of the cold ``lstat`` itself (bench/README.md, "Listings as before"). A row here says:
*tree T was made from a listing whose digest is D*, where the listing is the directory's entry
names and each entry's stat (mode, inode, ctime, mtime, size) in name order
(:func:`listing_digest`), with a summary of T: its regular files and their bytes, its symlinks
and other non-directory entries, and its directory nodes. When a directory's listing now has the
digest its parent backup's tree was made from, every entry of it that is not a directory is
exactly what the tree says — the per-entry test (same type, mode, inode, ctime, mtime and size),
made for the whole directory with one comparison — so the archiver takes the summary's totals,
walks only the subdirectories, and reads T itself only when one of them changed.

A row is a fact about a content-addressed tree id, true whenever it was written: it never goes
stale, whichever backups come and go. It is written only when the tree holds every listed entry
(none skipped, excluded, unreadable or vanished), by whichever process archived the directory
(the backup's own, or an archive worker: SQLite's WAL and write lock let them share the file).

Trust: the cache is local (root's ``state_dir``, mode 0700, like the index and tree caches beside
it) and each row carries a keyed BLAKE3 of its tree id and summary under the store's id key
(:meth:`ListingCache.get` drops a row that does not verify), so a damaged or foreign row is never
used. A file that is not a database, is truncated, or has another format or store id is replaced
by an empty one; an error of its file system (full, read-only) turns the cache off for the process
with a warning. A backup never fails because of this cache: without it, entries are compared one
by one as before.

Bounded: rows carry the day they were last used; past ``max_bytes`` the least recently used
rows are deleted down to 80 %.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from pathlib import Path

import blake3
import orjson
import structlog

from zfsbackd import faults
from zfsbackd.store.indexcache import BUSY_TIMEOUT_S, delete_database, is_corruption, truncation
from zfsbackd.store.tree import Node

log = structlog.get_logger(__name__)

#: Bumped whenever the schema, the summary or the digest changes: an older file is replaced, never migrated.
CACHE_FORMAT = 1
CACHE_FILE = "listings.sqlite"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: what eviction shrinks the cache to, as a share of the bound
EVICT_TO = 0.8
#: rows (and last-use updates) waiting to be written, at most, before a write transaction
PENDING_ROWS = 512
_DIGEST_PREFIX = b"zfsbackd listing v1\0"
_MAC_PREFIX = b"zfsbackd listing cache row v1\0"
#: what of an entry's stat the digest covers: the fields the per-entry test compares, and the mode
_STAT_KEY = attrgetter("st_mode", "st_ino", "st_ctime_ns", "st_mtime_ns", "st_size")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS listings (tree_id BLOB PRIMARY KEY, summary BLOB NOT NULL, mac BLOB NOT NULL, "
    "used INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS listings_by_use ON listings (used)",
)


def listing_digest(names: list[bytes], stats: list[os.stat_result]) -> bytes | None:
    """The digest of a directory listing: *names* in order with each entry's *stats* (``lstat``).

    BLAKE3 of a version prefix, the count of entries (8 bytes, little-endian), the names joined by
    ``/`` (which no name holds), a NUL, and the stat fields (mode, inode, ctime ns, mtime ns, size)
    of each entry as signed 64-bit integers in the host's byte order (the cache never leaves the
    host). Made without a Python call per entry (``map`` over ``attrgetter``, ``array``): this runs for
    every directory of every backup. None for a value outside 64 bits (then no digest: entries are
    compared one by one).
    """
    try:
        fields = array("q", chain.from_iterable(map(_STAT_KEY, stats)))
    except OverflowError:
        return None
    hasher = blake3.blake3(_DIGEST_PREFIX)
    hasher.update(len(names).to_bytes(8, "little"))
    hasher.update(b"/".join(names))
    hasher.update(b"\0")
    hasher.update(fields.tobytes())
    return hasher.digest()


@dataclass(frozen=True)
class ListingSummary:
    """What a tree made from a listing holds, beyond its directories' nodes: enough to archive the
    directory again without reading the tree, as long as its listing is the same."""

    digest: bytes
    files: int
    bytes: int
    symlinks: int
    others: int  # character and block devices
    dirs: list[Node]  # the tree's directory nodes, in name order

    def encode(self) -> bytes:
        return orjson.dumps([self.digest.hex(), self.files, self.bytes, self.symlinks, self.others, self.dirs])

    @classmethod
    def decode(cls, raw: bytes) -> ListingSummary:
        """The summary :meth:`encode` made; ValueError for anything else."""
        try:
            digest, files, nbytes, symlinks, others, dirs = orjson.loads(raw)
            counts = (files, nbytes, symlinks, others)
            if not all(type(c) is int and c >= 0 for c in counts) or not isinstance(dirs, list):
                raise TypeError("counts or directories of the wrong type")
            if not all(isinstance(d, dict) for d in dirs):
                raise TypeError("a directory node that is not an object")
            return cls(bytes.fromhex(digest), files, nbytes, symlinks, others, dirs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a listing summary ({exc})") from None

    @classmethod
    def of_tree(cls, digest: bytes, nodes: list[Node]) -> ListingSummary:
        """The summary of a tree of *nodes* (every entry of the directory) made from the listing *digest*."""
        files = nbytes = symlinks = others = 0
        dirs = []
        for node in nodes:
            kind = node.get("type")
            if kind == "file":
                files += 1
                nbytes += int(node.get("size", 0))
            elif kind == "dir":
                dirs.append(node)
            elif kind == "symlink":
                symlinks += 1
            else:
                others += 1
        return cls(digest, files, nbytes, symlinks, others, dirs)

    @property
    def entries(self) -> int:
        return self.files + self.symlinks + self.others + len(self.dirs)


class ListingCache:
    """Tree id → :class:`ListingSummary`, in one SQLite file shared by the processes of a host.

    One connection per instance, used under a lock: a backup asks once per directory (its walk
    and its read-ahead threads), so there is nothing to gain from a connection per thread.
    """

    def __init__(
        self,
        directory: Path,
        store_id: str,
        authenticate: Callable[[bytes], bytes],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """*authenticate* maps bytes to their keyed hash under the store's id key (rows are verified with it)."""
        self.path = directory / CACHE_FILE
        self.store_id = store_id
        self.max_bytes = max_bytes
        self._authenticate = authenticate
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[bytes, bytes]] = {}  # tree id → (summary, mac), not written yet
        self._touched: set[bytes] = set()  # tree ids used today whose rows say an earlier day
        self._conn: sqlite3.Connection | None = None
        self.hits = 0
        self.rebuilt_reason: str | None = None
        """Why the file was replaced when it was opened (None: reused or new)."""
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._turn_off("open", exc)

    # ------------------------------------------------------------ the file
    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            reason = self._invalid_reason(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if not is_corruption(exc):
                raise
            reason = f"not a readable cache ({exc})"
        else:
            if reason is None:
                return conn
            conn.close()
        log.warning("listing_cache_rebuilt", path=str(self.path), reason=reason)
        self.rebuilt_reason = reason
        delete_database(self.path)
        conn = self._connect()
        self._invalid_reason(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a crash loses at most the latest rows: made again later
        return conn

    def _invalid_reason(self, conn: sqlite3.Connection) -> str | None:
        """Why the open file cannot be used (None: it can; a new file gets its schema here)."""
        truncated = truncation(conn, self.path, self.path.stat().st_size)
        if truncated is not None:
            return truncated
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if not meta:
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("format", str(CACHE_FORMAT)), ("store_id", self.store_id)]
                )
                meta = {"format": str(CACHE_FORMAT), "store_id": self.store_id}
        finally:
            conn.execute("COMMIT")
        if meta.get("format") != str(CACHE_FORMAT):
            return f"cache format {meta.get('format')}, this zfsbackd uses {CACHE_FORMAT}"
        if meta.get("store_id") != self.store_id:
            return f"made for store {meta.get('store_id')}, not {self.store_id}"
        return None

    def _turn_off(self, doing: str, exc: sqlite3.Error | OSError) -> None:
        """The file cannot be used: compare entries one by one for the rest of this process's life."""
        log.warning(
            "listing_cache_off", path=str(self.path), doing=doing, error=str(exc),
            advice="check the file system of state_dir; the cache can always be deleted",
        )
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._pending.clear()
        self._touched.clear()

    def _mac(self, tree_id: bytes, summary: bytes) -> bytes:
        return self._authenticate(_MAC_PREFIX + tree_id + summary)

    # ------------------------------------------------------------ reads
    def get(self, tree_id: bytes) -> ListingSummary | None:
        """The summary of the tree *tree_id* and the digest of the listing it was made from, if known here."""
        with self._lock:
            pending = self._pending.get(tree_id)
            if pending is not None:
                raw, used = pending[0], _today()
            else:
                row = self._query(tree_id)
                if row is None:
                    return None
                raw, mac, used = row
                if mac != self._mac(tree_id, raw):
                    log.warning("listing_cache_row_dropped", tree_id=tree_id.hex(), reason="does not verify")
                    self._delete(tree_id)
                    return None
            try:
                summary = ListingSummary.decode(raw)
            except ValueError as exc:  # verified, so written by a zfsbackd of this format: a bug, but not fatal
                log.warning("listing_cache_row_dropped", tree_id=tree_id.hex(), reason=str(exc))
                self._delete(tree_id)
                return None
            if used < _today():
                self._touched.add(tree_id)
            self.hits += 1
            return summary

    def _query(self, tree_id: bytes) -> tuple[bytes, bytes, int] | None:
        if self._conn is None:
            return None
        try:
            return self._conn.execute(  # type: ignore[no-any-return]
                "SELECT summary, mac, used FROM listings WHERE tree_id = ?", (tree_id,)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._recover("read", exc)
            return None

    def _recover(self, doing: str, exc: sqlite3.DatabaseError) -> None:
        """A damaged file is replaced by an empty one; any other failure turns the cache off."""
        if not is_corruption(exc) or self._conn is None:
            self._turn_off(doing, exc)
            return
        self._conn.close()
        self._conn = None
        try:
            delete_database(self.path)
            self._conn = self._open()
            self.rebuilt_reason = f"corrupt ({exc})"
            log.warning("listing_cache_rebuilt", path=str(self.path), reason=self.rebuilt_reason)
        except (sqlite3.Error, OSError) as again:
            self._turn_off(doing, again)

    # ------------------------------------------------------------ writes
    def put(self, tree_id: bytes, summary: ListingSummary) -> None:
        """Remember that the tree *tree_id* was made from the listing ``summary.digest`` (written in batches)."""
        raw = summary.encode()
        with self._lock:
            if self._conn is None:
                return
            self._pending[tree_id] = (raw, self._mac(tree_id, raw))
            if len(self._pending) + len(self._touched) >= PENDING_ROWS:
                self._write()

    def flush(self) -> None:
        """Write the rows and last-use days waiting; evict if the file grew past its bound."""
        with self._lock:
            self._write()
            self._evict()

    def _write(self) -> None:
        if self._conn is None or not (self._pending or self._touched):
            return
        today = _today()
        rows = [(tree_id, raw, mac, today) for tree_id, (raw, mac) in self._pending.items()]
        touched = [(today, tree_id) for tree_id in self._touched - self._pending.keys()]
        self._pending.clear()
        self._touched.clear()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO listings VALUES (?, ?, ?, ?)", rows)
                self._conn.executemany("UPDATE listings SET used = ? WHERE tree_id = ?", touched)
                faults.point("listing-cache-written")  # rows in the file, not committed yet
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self._recover("write", exc)

    def _delete(self, tree_id: bytes) -> None:
        self._pending.pop(tree_id, None)
        if self._conn is None:
            return
        try:
            self._conn.execute("DELETE FROM listings WHERE tree_id = ?", (tree_id,))
        except sqlite3.DatabaseError as exc:
            self._recover("delete", exc)

    def _evict(self) -> None:
        """Past ``max_bytes`` of rows, delete the least recently used down to ``EVICT_TO`` of it."""
        if self._conn is None:
            return
        try:
            pragmas = ("page_size", "page_count", "freelist_count")
            page_size, pages, free = (self._conn.execute(f"PRAGMA {name}").fetchone()[0] for name in pragmas)
            used_bytes = (pages - free) * page_size
            if used_bytes <= self.max_bytes:
                return
            rows = self._conn.execute("SELECT count(*) FROM listings").fetchone()[0]
            drop = rows - int(rows * EVICT_TO * self.max_bytes / used_bytes)
            self._conn.execute(
                "DELETE FROM listings WHERE tree_id IN (SELECT tree_id FROM listings ORDER BY used LIMIT ?)", (drop,)
            )
            log.info("listing_cache_evicted", rows=drop, bytes_before=used_bytes, max_bytes=self.max_bytes)
        except sqlite3.DatabaseError as exc:
            self._recover("evict", exc)

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _today() -> int:
    """The day (since the epoch) a row was last used: fine enough for eviction, and a row is updated at
    most once a day however often it is used."""
    return int(time.time() // 86400)
