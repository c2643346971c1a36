"""Reading many blobs at once: whole packs where most of a pack is wanted, byte ranges elsewhere.

A restore knows every blob it will read before it starts. Fetching a pack
once instead of one ranged request per blob turns thousands of small-file
requests into a few large ones — what makes a restore from S3 fast, where each
request costs a round trip. A pack is kept only until its last wanted blob has
been read, so memory follows the restore's progress through the packs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future

from zfsbackd.store.index import Location
from zfsbackd.store.packs import pack_key
from zfsbackd.store.repository import Store

#: fetch the whole pack when at least this share of its bytes is wanted
WHOLE_PACK_SHARE = 0.3


class PackCache:
    def __init__(
        self, store: Store, wanted: Iterable[bytes], *, locations: dict[bytes, Location] | None = None
    ) -> None:
        """``wanted``: the blob ids that will be read, once per read. ``locations``: where they are, when
        the caller looked that up already (a copy groups its blobs by pack with it)."""
        self.store = store
        self._uses: Counter[bytes] = Counter()  # pack id → reads still to come
        wanted_bytes: Counter[bytes] = Counter()
        # Looked up once here and served to read_blob, instead of a second index query per blob
        # (the index is an SQLite file: each lookup costs a query; restores plan in bounded batches).
        reads = list(wanted)
        if locations is None:
            locations = store.index.get_many(list(dict.fromkeys(reads)))
        self._locations: dict[bytes, Location] = locations
        for loc in self._locations.values():
            wanted_bytes[loc.pack_id] += loc.length
        for blob_id in reads:
            loc = self._locations.get(blob_id)
            if loc is not None:  # else read_blob reports it, naming the file
                self._uses[loc.pack_id] += 1
        self._whole = {
            pack_id
            for pack_id, need in wanted_bytes.items()
            if need >= WHOLE_PACK_SHARE * max(1, store.index.pack_bytes(pack_id))
        }
        self._lock = threading.Lock()
        self._loaded: dict[bytes, Future[bytes]] = {}

    def location(self, blob_id: bytes) -> Location | None:
        """Where the planned blob ``blob_id`` was when the reads were planned (None: not planned)."""
        return self._locations.get(blob_id)

    def sealed(self, loc: Location) -> bytes:
        """The sealed bytes of the blob at ``loc``."""
        pack_id = loc.pack_id
        if pack_id not in self._whole:
            return self.store.objects.get_range(pack_key(pack_id), loc.offset, loc.length)
        with self._lock:
            future = self._loaded.get(pack_id)
            owner = future is None
            if owner:
                future = self._loaded[pack_id] = Future()
        assert future is not None
        if owner:
            try:
                future.set_result(self.store.objects.get(pack_key(pack_id)))
            except BaseException as exc:
                future.set_exception(exc)
        data = future.result()
        with self._lock:
            self._uses[pack_id] -= 1
            if self._uses[pack_id] <= 0:
                self._loaded.pop(pack_id, None)  # its last wanted blob: let the memory go
        return data[loc.offset : loc.offset + loc.length]
