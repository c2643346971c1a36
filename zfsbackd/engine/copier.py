"""Copy a backup to another region's store: only the blobs the destination lacks travel.

Blob ids are keyed with the deployment's shared id key, so "lacks" is a set
difference even when the destination encrypts with another data key: each
missing blob is authenticated and verified with the source key, re-sealed
with the destination key (not recompressed), and packed as usual. An
interrupted copy leaves durable packs behind that the destination adopts on
open, so the next run sends only what is still missing. The backup's trees
are walked in batches of blob ids (``BATCH_BLOBS``), so a copy's memory does
not follow the size of the backup.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zfsbackd import pools
from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.errors import IntegrityError
from zfsbackd.store.index import Location
from zfsbackd.store.packcache import PackCache
from zfsbackd.store.packs import pack_key
from zfsbackd.store.reachability import reachable_in_batches
from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter

#: Blob ids a copy plans at once (checked against the destination, grouped by source pack, copied):
#: bounds its memory whatever the size of the backup.
BATCH_BLOBS = 50_000


@dataclass
class CopyStats:
    blobs_copied: int = 0
    bytes_copied: int = 0  # plaintext bytes of the blobs sent
    bytes_uploaded: int = 0  # bytes written to the destination object store


class Copier:
    def __init__(
        self,
        source: Store,
        destination: Store,
        record: BackupRecord,
        *,
        cancel: threading.Event | None = None,
        workers: int = pools.COPY_WORKERS,
    ) -> None:
        self.source = source
        self.destination = destination
        self.record = record
        self.cancel = cancel or threading.Event()
        self.workers = workers

    def run(self) -> CopyStats:
        """Walk the backup's trees in batches of ``BATCH_BLOBS`` blobs and copy what the destination lacks.

        A blob met again in a later batch is found in the destination (uploaded) or in the writer
        (reserved), so it is sent once.
        """
        self.source.load_index(record_adopted=False)
        self.destination.load_index(adopt=True)  # a resumed copy's packs, uploaded before it stopped
        with PackWriter(self.destination) as writer:
            try:
                with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zfsbackd-copy") as pool:
                    for batch in reachable_in_batches(self.source, self.record, batch_size=BATCH_BLOBS):
                        by_pack = self._missing_by_source_pack(batch)
                        for _ in pool.map(lambda item: self._copy_pack(writer, *item), by_pack.items()):
                            pass
            finally:
                writer.flush()  # checkpoint whatever was copied, also when interrupted
        return CopyStats(writer.stats.blobs_new, writer.stats.bytes_new, writer.stats.bytes_uploaded)

    def _missing_by_source_pack(self, batch: list[bytes]) -> dict[bytes, dict[bytes, Location]]:
        """The blobs of ``batch`` the destination does not have, with their locations, by the source pack
        that holds them."""
        unique = list(dict.fromkeys(batch))
        stored = self.destination.deduplicable(unique)
        missing = [blob_id for blob_id in unique if blob_id not in stored]
        locations = self.source.index.get_many(missing)
        by_pack: dict[bytes, dict[bytes, Location]] = defaultdict(dict)
        for blob_id in missing:
            loc = locations.get(blob_id)
            if loc is None:
                raise IntegrityError(
                    f"backup {self.record.backup_id} in region {self.record.region} references blob "
                    f"{blob_id.hex()}, which its store does not have; run "
                    f"`zfsbackd check --region {self.record.region}`"
                )
            by_pack[loc.pack_id][blob_id] = loc
        return by_pack

    def _copy_pack(self, writer: PackWriter, pack_id: bytes, blobs: dict[bytes, Location]) -> None:
        """Copy the blobs of one source pack, in pack order, read as the PackCache plans (in spans, or blob by blob).

        A pack that garbage collection (of any host) moved meanwhile is found
        again where its live blobs went (Store.fetch_blob): a copy running beside
        a collection of its source region does not fail.

        Cancellation is looked at before every blob, not only before every pack: the
        packs of a small backup are all started at once, and a stop must not wait for them.
        """
        packs = PackCache(self.source, blobs, locations=blobs)
        what = f"copy of backup {self.record.backup_id} from region {self.record.region}: pack {pack_key(pack_id)}"
        for blob_id, loc in sorted(blobs.items(), key=lambda item: item[1].offset):  # a span at a time
            if self.cancel.is_set():
                raise BackupCancelled()
            if not writer.reserve(blob_id, loc.raw_length):
                continue
            resealed = self.source.fetch_blob(
                blob_id,
                what=what,
                packs=packs,
                open_sealed=lambda sealed, blob_id=blob_id: self.source.codec.reseal(
                    blob_id, sealed, self.destination.codec, what=what
                ),
            )
            writer.add_sealed(loc.blob_type, blob_id, resealed, loc.raw_length)

