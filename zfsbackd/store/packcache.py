"""Reading many blobs at once: packs in spans where much of a pack is wanted, blob by blob elsewhere.

A restore (or a copy) knows every blob it will read before it starts. Fetching
a pack in a few spans instead of one ranged request per blob turns thousands of
small-file requests into a few large ones — what makes a restore from S3 fast,
where each request costs a round trip. A span (at most ``SPAN_BYTES``) is kept
only until its last wanted blob has been read, so memory follows the reader's
progress through the packs: a reader going through a pack in order holds one
span of it, not the whole pack.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future

from zfsbackd.store.index import Location
from zfsbackd.store.packs import pack_key
from zfsbackd.store.repository import Store

#: read a pack's wanted blobs in spans (rather than one ranged read per blob) when at least this share
#: of its bytes is wanted
WHOLE_PACK_SHARE = 0.3
#: the most bytes one span holds: a whole 16 MiB pack is read in 4 MiB pieces, each dropped once its
#: last wanted blob has been read, so a reader going through a pack in order holds a piece, not a pack
SPAN_BYTES = 4 * 1024 * 1024


class PackCache:
    def __init__(
        self, store: Store, wanted: Iterable[bytes], *, locations: dict[bytes, Location] | None = None
    ) -> None:
        """``wanted``: the blob ids that will be read, once per read. ``locations``: where they are, when
        the caller looked that up already (a copy groups its blobs by pack with it)."""
        self.store = store
        # Looked up once here and served to read_blob, instead of a second index query per blob
        # (the index is an SQLite file: each lookup costs a query; restores plan in bounded batches).
        reads = list(wanted)
        if locations is None:
            locations = store.index.get_many(list(dict.fromkeys(reads)))
        self._locations: dict[bytes, Location] = locations
        self._span_of = _plan_spans(store, locations.values())  # (pack id, offset) → (pack id, start, length)
        self._uses: Counter[tuple[bytes, int, int]] = Counter()  # span → reads still to come
        for blob_id in reads:
            loc = self._locations.get(blob_id)
            span = self._span_of.get((loc.pack_id, loc.offset)) if loc is not None else None
            if span is not None:  # else read_blob reports a missing blob, naming the file
                self._uses[span] += 1
        self._lock = threading.Lock()
        self._loaded: dict[tuple[bytes, int, int], Future[bytes]] = {}

    def location(self, blob_id: bytes) -> Location | None:
        """Where the planned blob ``blob_id`` was when the reads were planned (None: not planned)."""
        return self._locations.get(blob_id)

    def sealed(self, loc: Location) -> bytes:
        """The sealed bytes of the blob at ``loc``."""
        span = self._span_of.get((loc.pack_id, loc.offset))
        if span is None:  # a pack read blob by blob, or a location that was not planned (the blob moved)
            return self.store.objects.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
        with self._lock:
            future = self._loaded.get(span)
            owner = future is None
            if owner:
                future = self._loaded[span] = Future()
        assert future is not None
        if owner:
            pack_id, start, length = span
            try:
                future.set_result(self.store.objects.get_range(pack_key(pack_id), start, length))
            except BaseException as exc:
                future.set_exception(exc)
        data = future.result()
        with self._lock:
            self._uses[span] -= 1
            if self._uses[span] <= 0:
                self._loaded.pop(span, None)  # its last wanted blob: let the memory go
        offset = loc.offset - span[1]
        return data[offset : offset + loc.length]


def _plan_spans(store: Store, locations: Iterable[Location]) -> dict[tuple[bytes, int], tuple[bytes, int, int]]:
    """The span each wanted blob is read with, for the packs of which at least WHOLE_PACK_SHARE is wanted:
    consecutive wanted blobs, in offset order, up to SPAN_BYTES from the first one's start."""
    by_pack: dict[bytes, list[Location]] = {}
    for loc in locations:
        by_pack.setdefault(loc.pack_id, []).append(loc)
    span_of: dict[tuple[bytes, int], tuple[bytes, int, int]] = {}
    for pack_id, locs in by_pack.items():
        if sum(loc.length for loc in locs) < WHOLE_PACK_SHARE * max(1, store.index.pack_bytes(pack_id)):
            continue
        locs.sort(key=lambda loc: loc.offset)
        group: list[Location] = []
        for loc in [*locs, None]:
            if group and (loc is None or loc.offset + loc.length - group[0].offset > SPAN_BYTES):
                start = group[0].offset
                span = (pack_id, start, group[-1].offset + group[-1].length - start)
                span_of.update(((pack_id, member.offset), span) for member in group)
                group = []
            if loc is not None:
                group.append(loc)
    return span_of
