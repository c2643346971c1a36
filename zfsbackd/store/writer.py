"""PackWriter: turns blobs into packs, uploads them in the background, checkpoints the index.

Many archiver threads call :meth:`PackWriter.add` at once. Encoding (zstd,
AES-GCM) happens outside the lock in the caller's thread — those calls release
the GIL, so both cores work. Trees (:meth:`PackWriter.add_tree`) come from the
walk's one thread, which needs only their ids: they are encoded on the writer's
own tree thread instead. Uploads run on a small pool with a bound on packs
in flight, which bounds memory. Commit order (DESIGN invariant 1): a pack is
durable before any index names it, and :meth:`flush` returns only when every
pack and an index covering them are durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from zfsbackd import faults, pools
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.packs import PackEntry, build_trailer, pack_id_of, pack_key
from zfsbackd.store.repository import Store

DEFAULT_PACK_SIZE = 16 * 1024 * 1024
#: plaintext bytes of trees waiting for the tree thread: the walk waits past it (a larger tree waits alone)
TREES_QUEUED_BYTES = 32 * 1024 * 1024


@dataclass
class WriterStats:
    blobs_new: int = 0
    blobs_deduplicated: int = 0
    bytes_new: int = 0  # plaintext bytes of new blobs
    bytes_deduplicated: int = 0  # plaintext bytes found already stored
    bytes_uploaded: int = 0  # sealed bytes written to the object store (packs incl. headers)
    packs_uploaded: int = 0

    def add(self, other: WriterStats) -> None:
        """Count in what another writer of the same backup did (an archive worker process's)."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


class PackWriter:
    def __init__(
        self,
        store: Store,
        *,
        pack_size: int = DEFAULT_PACK_SIZE,
        upload_threads: int = pools.UPLOAD_THREADS,
        max_packs_in_flight: int = pools.PACKS_IN_FLIGHT,
        checkpoint_every: int = 4,
        on_uploaded: Callable[[int], None] | None = None,
    ) -> None:
        """``on_uploaded`` is told each pack's size as it lands (a backup's progress: throughput while it runs)."""
        self.store = store
        self.on_uploaded = on_uploaded
        self.pack_size = pack_size
        self.checkpoint_every = checkpoint_every
        self.stats = WriterStats()
        self._lock = threading.Lock()
        #: signalled when a full pack got its upload slot, so the next pack may start filling
        self._room = threading.Condition(self._lock)
        self._full_waiting = False  # the buffer is full and waits for a slot: nobody adds to it
        self._pending: set[bytes] = set()  # reserved: being encoded or in an unuploaded pack
        self._buffer = bytearray()
        self._entries: list[PackEntry] = []
        self._unindexed: dict[bytes, list[PackEntry]] = {}
        self._slots = threading.BoundedSemaphore(max_packs_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="zfsbackd-upload")
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None
        self._tree_pool = ThreadPoolExecutor(max_workers=pools.TREE_ENCODE_THREADS, thread_name_prefix="zfsbackd-trees")
        self._trees_room = threading.Condition()  # signalled as queued trees are stored
        self._trees_queued = 0  # their plaintext bytes (TREES_QUEUED_BYTES)

    # ------------------------------------------------------------------ adding
    def reserve(self, blob_id: bytes, raw_length: int, *, stored: bool | None = None) -> bool:
        """Claim ``blob_id`` for this writer; False if the store has it or another thread claimed it.

        ``stored`` is the store's answer when the caller asked it already (for many blobs at once).
        """
        with self._lock:
            if blob_id in self._pending or (self.store.can_deduplicate(blob_id) if stored is None else stored):
                self.stats.blobs_deduplicated += 1
                self.stats.bytes_deduplicated += raw_length
                return False
            self._pending.add(blob_id)
            return True

    def add(self, blob_type: BlobType, plaintext: bytes | memoryview) -> tuple[bytes, bool]:
        """Store ``plaintext`` unless it is already stored; returns (blob id, was new)."""
        blob_id = self.store.hasher.blob_id(plaintext)
        new = self.reserve(blob_id, len(plaintext))
        self._encode(blob_type, blob_id, plaintext, new)
        return blob_id, new

    def add_tree(self, plaintext: bytes) -> bytes:
        """Store the tree ``plaintext`` unless it is already stored; returns its id at once.

        The id is made here; asking the index whether the store has it (an SQLite query), compressing,
        caching and sealing the tree happen on the writer's tree thread (the last three release the
        GIL), while the caller goes on. The walk makes every tree of a backup on its one thread, and
        with scattered churn a few hundred of them (a changed file in nearly every directory) were
        half of its time. An error there is raised by the next add or by :meth:`flush`, which waits
        for every tree queued.
        """
        blob_id = self.store.hasher.blob_id(plaintext)
        self._raise_upload_error()
        with self._trees_room:
            while self._trees_queued and self._trees_queued + len(plaintext) > TREES_QUEUED_BYTES:
                self._trees_room.wait()
            self._trees_queued += len(plaintext)
        try:
            self._tree_pool.submit(self._store_tree, blob_id, plaintext)
        except BaseException:
            self._tree_stored(len(plaintext))
            raise
        return blob_id

    def _store_tree(self, blob_id: bytes, plaintext: bytes) -> None:
        """:meth:`add_tree`'s work on the tree thread; its error is kept for the caller's next call."""
        try:
            self._encode(BlobType.TREE, blob_id, plaintext, self.reserve(blob_id, len(plaintext)))
        except BaseException as exc:
            self._error = self._error or exc
        finally:
            self._tree_stored(len(plaintext))

    def _tree_stored(self, size: int) -> None:
        with self._trees_room:
            self._trees_queued -= size
            self._trees_room.notify_all()

    def _encode(self, blob_type: BlobType, blob_id: bytes, plaintext: bytes | memoryview, new: bool) -> None:
        """Compress and seal a blob reserved as *new* into the pack; a tree also goes to the tree cache
        (the next incremental's parent, read locally: compressed once for both)."""
        body = self.store.codec.compress(plaintext) if new else None
        if blob_type == BlobType.TREE:
            self.store.remember_tree(blob_id, plaintext, body.data if body is not None and body.zstd else None)
        if body is not None:
            self.add_sealed(blob_type, blob_id, self.store.codec.seal(blob_id, body), len(plaintext))

    def add_many(self, blob_type: BlobType, plaintexts: list[bytes]) -> list[tuple[bytes, bool]]:
        """:meth:`add` for many small blobs: the store is asked about all of them in one lookup."""
        ids = [self.store.hasher.blob_id(plaintext) for plaintext in plaintexts]
        stored = self.store.deduplicable(ids)
        added = []
        for blob_id, plaintext in zip(ids, plaintexts, strict=True):
            new = self.reserve(blob_id, len(plaintext), stored=blob_id in stored)
            if new:
                self.add_sealed(blob_type, blob_id, self.store.codec.encode(blob_id, plaintext), len(plaintext))
            added.append((blob_id, new))
        return added

    def add_sealed(self, blob_type: BlobType, blob_id: bytes, sealed: bytes, raw_length: int) -> None:
        """Append an already-sealed blob (reserved by the caller); used by copies and repacking too."""
        self._raise_upload_error()
        with self._room:
            while self._full_waiting:
                self._room.wait()
            self._entries.append(PackEntry(blob_type, blob_id, len(self._buffer), len(sealed), raw_length))
            self._buffer += sealed
            self.stats.blobs_new += 1
            self.stats.bytes_new += raw_length
            if len(self._buffer) < self.pack_size:
                return
            self._full_waiting = True
        self._submit_full()

    def _submit_full(self) -> None:
        """Upload the full buffer once a slot is free; until then every adding thread waits.

        Why they wait rather than fill the next buffer: each thread that found a buffer full
        and then waited for a slot held a whole pack, so a writer with N adding threads held
        up to N packs beyond its slots (four threads, one slot: five packs held at once).
        Now the writer holds at most its slots' packs and the one it fills.
        """
        try:
            self._slots.acquire()
            with self._room:
                full = self._take_pack()
        finally:
            with self._room:
                self._full_waiting = False
                self._room.notify_all()
        self._start_upload(*full)

    def _take_pack(self) -> tuple[bytearray, list[PackEntry]]:
        """The filled buffer itself: a copy cost 16 MiB of memcpy under the lock, and the pack was held
        twice while it uploaded (the copy, and the copy with its trailer)."""
        data, entries = self._buffer, self._entries
        self._buffer = bytearray()
        self._entries = []
        return data, entries

    # ---------------------------------------------------------------- uploading
    def _start_upload(self, body: bytearray, entries: list[PackEntry]) -> None:
        """Hand a pack to the upload pool; the caller holds its slot (released when the upload ends)."""
        try:
            self._futures.append(self._pool.submit(self._upload, body, entries))
        except BaseException:
            self._slots.release()
            raise

    def _upload(self, data: bytearray, entries: list[PackEntry]) -> None:
        try:
            data += build_trailer(entries, self.store.sealer)  # in place: no second copy of the pack
            pack_id = pack_id_of(data)
            self.store.objects.put_if_absent(pack_key(pack_id), memoryview(data))
            faults.point("pack-uploaded")
            self.store.index.add_pack(pack_id, entries)
            checkpoint: dict[bytes, list[PackEntry]] | None = None
            if self.on_uploaded is not None:
                self.on_uploaded(len(data))
            with self._lock:
                self.stats.bytes_uploaded += len(data)
                self.stats.packs_uploaded += 1
                self._pending.difference_update(e.blob_id for e in entries)
                self._unindexed[pack_id] = entries
                if len(self._unindexed) >= self.checkpoint_every:
                    checkpoint, self._unindexed = self._unindexed, {}
            if checkpoint:
                self.store.write_index(checkpoint)
        except BaseException as exc:
            self._error = self._error or exc
            raise
        finally:
            self._slots.release()

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ----------------------------------------------------------------- finishing
    def flush(self) -> None:
        """Store the trees queued, upload the partial pack, wait for every upload, write the final index checkpoint."""
        with self._trees_room:
            while self._trees_queued:
                self._trees_room.wait()
        self._raise_upload_error()
        with self._lock:
            last = self._take_pack() if self._entries else None
        if last is not None:
            self._slots.acquire()
            self._start_upload(*last)
        for future in self._futures:
            future.result()
        self._futures.clear()
        self._raise_upload_error()
        with self._lock:
            remaining, self._unindexed = self._unindexed, {}
        if remaining:
            self.store.write_index(remaining)

    def close(self) -> None:
        """Stop the tree thread and the upload pool. Packs already uploaded stay (the next open adopts them)."""
        self._tree_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
