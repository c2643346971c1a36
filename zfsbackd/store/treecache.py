"""A local, bounded cache of tree blobs, so an incremental backup does not fetch its parent's trees
from the object store every time (issue 13: a no-change backup against S3 spent most of its time
downloading the parent backup's directories).

Trees are immutable and named by their blob id, which is the keyed BLAKE3 of their plaintext, so a
cached tree is *verified by its id on every read*: a file that was damaged, truncated, or written by
someone without the store's id key does not hash to its name and is deleted and fetched again, never
used. What the cache holds is plaintext directory listings of backups, as sensitive as the source
tree's names: the directory is mode 0700 under ``state_dir`` (root's), like the index cache.

Layout: ``state_dir/cache/<store id>/trees/<2 hex>/<64 hex>``, each file the zstd-compressed tree.
Writes go to a temporary name and are renamed into place (a crash leaves no partial tree under a
real name, and temporaries are removed at the next open). They are made by the cache's own writer
thread, so that the walk of a backup, which writes a tree per changed directory, does not wait for
a compression, an open, a write and a rename each time (``PENDING_MAX_BYTES`` of trees may wait;
beyond that :meth:`TreeCache.put` writes itself); :meth:`TreeCache.flush` waits for them.

The cache is bounded in bytes: when it grows past ``max_bytes`` the least recently used files (by
modification time, touched on every hit by the writer thread) are removed down to 80 % of the bound.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
import zstandard

from zfsbackd.store.blobs import ZstdPerThread

log = structlog.get_logger(__name__)

#: default bound of one store's tree cache
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: what eviction shrinks the cache to, as a share of the bound (so it does not evict on every write)
EVICT_TO = 0.8
_TMP_PREFIX = ".tmp-"
#: plaintext bytes of trees waiting for the writer thread, at most
PENDING_MAX_BYTES = 16 * 1024 * 1024
#: hits whose touch waits for the writer thread, at most (past it the reader touches)
PENDING_MAX_TOUCHES = 10_000


class TreeCache:
    """Tree blob id → plaintext, on local disk, verified on read and bounded in size."""

    def __init__(
        self, directory: Path, verify: Callable[[bytes, bytes], bool], *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        """``verify(blob_id, plaintext)`` says whether ``plaintext`` is the blob ``blob_id`` names."""
        self.directory = directory
        self._root = os.fspath(directory)
        self.max_bytes = max_bytes
        self._verify = verify
        self._lock = threading.Lock()
        self._zstd = ZstdPerThread(level=3)
        self.hits = 0
        self.misses = 0
        self._write_failed = False
        self._pending: queue.Queue[tuple[bytes, bytes | None, bool]] = queue.Queue()
        self._pending_bytes = 0
        self._pending_touches = 0
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._size = self._scan_and_clean()

    def _path(self, blob_id: bytes) -> str:
        """The file of a tree (a str: pathlib's joins were a tenth of an incremental's per-directory work)."""
        hex_id = blob_id.hex()
        return f"{self._root}/{hex_id[:2]}/{hex_id}"

    # ------------------------------------------------------------------ reads
    def get(self, blob_id: bytes) -> bytes | None:
        """The tree's plaintext, or None when it is not cached (or was, but did not verify)."""
        path = self._path(blob_id)
        try:
            with open(path, "rb", buffering=0) as f:
                packed = f.readall()
            plaintext = self._zstd.decompressor().decompress(packed)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, zstandard.ZstdError):
            plaintext = b""  # unreadable: treated like a file that does not verify
            packed = b""
        if not plaintext or not self._verify(blob_id, plaintext):
            log.warning("tree_cache_entry_discarded", path=path, reason="does not match its id")
            self._remove(path, len(packed))
            self.misses += 1
            return None
        if not self._queue(blob_id, None, False):  # touched by the writer thread: least recently used goes first
            self._touch(blob_id)
        self.hits += 1
        return plaintext

    # ----------------------------------------------------------------- writes
    def put(self, blob_id: bytes, data: bytes, *, compressed: bool = False) -> None:
        """Remember a tree that was just verified (read from the store) or written by a backup: its
        plaintext, or its zstd frame if *compressed* (a backup's new tree, compressed for the store
        already: compressing it twice was a tenth of an incremental backup's CPU per changed directory).

        Written by the writer thread, or here when too much already waits. A failure to write (full
        or read-only ``state_dir``) only costs the cache: it is logged once per process and the tree
        is simply not cached.
        """
        if not self._queue(blob_id, data, compressed):
            self._write(blob_id, data, compressed)

    def _queue(self, blob_id: bytes, data: bytes | None, compressed: bool) -> bool:
        """Give the writer thread a tree to write, or (*data* None) a cached one to touch; False when
        ``PENDING_MAX_BYTES`` (or ``PENDING_MAX_TOUCHES``) already wait."""
        size = 0 if data is None else len(data)
        with self._pending_lock:
            if size and self._pending_bytes + size > PENDING_MAX_BYTES:
                return False
            if not size and self._pending_touches >= PENDING_MAX_TOUCHES:
                return False
            self._pending_bytes += size
            self._pending_touches += not size
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="zfsbackd-tree-cache", daemon=True)
                self._writer.start()
        self._pending.put((blob_id, data, compressed))
        return True

    def flush(self) -> None:
        """Wait until every tree given to :meth:`put` so far is written (or given up)."""
        self._pending.join()

    def _write_pending(self) -> None:
        """The writer thread: one tree (or touch) after another, for the life of the process."""
        while True:
            blob_id, data, compressed = self._pending.get()
            try:
                if data is None:
                    self._touch(blob_id)
                else:
                    self._write(blob_id, data, compressed)
            except Exception as exc:  # a bug must not stop the thread: flush() would wait for ever
                log.error("tree_cache_write_crashed", directory=str(self.directory), error=repr(exc))
            finally:
                with self._pending_lock:
                    if data is None:
                        self._pending_touches -= 1
                    else:
                        self._pending_bytes -= len(data)
                self._pending.task_done()

    def _touch(self, blob_id: bytes) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._path(blob_id))

    def _write(self, blob_id: bytes, data: bytes, compressed: bool) -> None:
        path = self._path(blob_id)
        if os.path.exists(path):
            return
        packed = data if compressed else self._zstd.compressor().compress(data)
        parent = os.path.dirname(path)
        tmp = f"{parent}/{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(packed)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._write_failed:
                self._write_failed = True
                log.warning("tree_cache_write_failed", directory=str(self.directory), error=str(exc))
            return
        with self._lock:
            self._size += len(packed)
            over = self._size > self.max_bytes
        if over:
            self._evict()

    # -------------------------------------------------------------- bounding
    def _remove(self, path: str | Path, size: int) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
            with self._lock:
                self._size -= size

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for sub in os.scandir(self.directory):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, Path(entry.path)))
        return entries

    def _scan_and_clean(self) -> int:
        """The cache's size on disk; temporaries of a process that was killed mid-write are removed."""
        total = 0
        for _mtime, size, path in self._entries():
            if path.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            total += size
        return total

    def _evict(self) -> None:
        """Remove the least recently used trees until the cache is at ``EVICT_TO`` of its bound."""
        if not self._lock.acquire(blocking=False):
            return  # another thread is evicting
        try:
            entries = sorted(e for e in self._entries() if not e[2].name.startswith(_TMP_PREFIX))
            total = sum(size for _m, size, _p in entries)
            target = self.max_bytes * EVICT_TO
            removed = 0
            for _mtime, size, path in entries:
                if total <= target:
                    break
                with contextlib.suppress(OSError):
                    path.unlink()
                    total -= size
                    removed += 1
            self._size = total
        finally:
            self._lock.release()
        log.info("tree_cache_evicted", directory=str(self.directory), removed=removed, bytes=total)

    @property
    def size(self) -> int:
        """Bytes the cache holds on disk (compressed)."""
        return self._size
