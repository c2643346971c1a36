"""Reading many blobs at once: a pack's wanted blobs in a few ranged reads (spans), not one per blob.

A restore (or a copy) knows every blob it will read before it starts. Wanted blobs
of a pack that lie close together — gaps of at most the object store's
``span_gap_bytes`` — are fetched in one span of at most ``SPAN_BYTES`` instead of
one ranged read each: what makes a restore from S3 fast, where each request costs a
round trip, and a restore of many small files from a local store, where each read
opens and closes the pack (100,000 small files restored: 39,058 pack opens when
spans were only made for packs of which 30 % was wanted). A blob with no wanted
neighbour close by is read alone. A span is kept only until its last wanted blob has
been read, so memory follows the reader's progress through the packs: a reader going
through a pack in order holds one span of it, not the whole pack.
"""

from __future__ import annotations

import operator
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future

from zfsbackd.store.index import Location
from zfsbackd.store.packs import pack_key
from zfsbackd.store.repository import Store

#: the most bytes one span holds: a whole 16 MiB pack is read in 4 MiB pieces, each dropped once its
#: last wanted blob has been read, so a reader going through a pack in order holds a piece, not a pack
SPAN_BYTES = 4 * 1024 * 1024

_OFFSET = operator.attrgetter("offset")


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
        # (pack id, offset) → (pack id, start, length)
        self._span_of = _plan_spans(store.objects.span_gap_bytes, locations.values())
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


def _plan_spans(gap: int, locations: Iterable[Location]) -> dict[tuple[bytes, int], tuple[bytes, int, int]]:
    """The span each wanted blob is read with: runs of a pack's wanted blobs, in offset order, with at most
    *gap* unwanted bytes between neighbours and at most SPAN_BYTES from the run's start to its end. A blob
    alone in its run has no span (it is read by itself)."""
    by_pack: dict[bytes, list[Location]] = {}
    for loc in locations:
        by_pack.setdefault(loc.pack_id, []).append(loc)
    span_of: dict[tuple[bytes, int], tuple[bytes, int, int]] = {}
    for pack_id, locs in by_pack.items():
        locs.sort(key=_OFFSET)
        run: list[Location] = []
        for loc in [*locs, None]:
            if run and (
                loc is None
                or loc.offset - (run[-1].offset + run[-1].length) > gap
                or loc.offset + loc.length - run[0].offset > SPAN_BYTES
            ):
                if len(run) > 1:
                    start = run[0].offset
                    span = (pack_id, start, run[-1].offset + run[-1].length - start)
                    span_of.update(((pack_id, member.offset), span) for member in run)
                run = []
            if loc is not None:
                run.append(loc)
    return span_of
