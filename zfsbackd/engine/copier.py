"""Copy a backup to another region's store: only the blobs the destination lacks travel.

Blob ids are keyed with the deployment's shared id key, so "lacks" is a set
difference even when the destination encrypts with another data key: each
missing blob is authenticated and verified with the source key, re-sealed
with the destination key (not recompressed), and packed as usual. An
interrupted copy leaves durable packs behind that the destination adopts on
open, so the next run sends only what is still missing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.errors import IntegrityError
from zfsbackd.store.index import Location
from zfsbackd.store.packs import pack_key
from zfsbackd.store.reachability import mark_reachable
from zfsbackd.store.records import BackupRecord
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter

# Fetch a whole source pack when at least this share of it is needed (one request instead of many).
WHOLE_PACK_SHARE = 0.5


@dataclass
class CopyStats:
    blobs_total: int = 0
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
        workers: int = 4,
    ) -> None:
        self.source = source
        self.destination = destination
        self.record = record
        self.cancel = cancel or threading.Event()
        self.workers = workers

    def run(self) -> CopyStats:
        self.source.load_index(record_adopted=False)
        self.destination.load_index(adopt=True)  # a resumed copy's packs, uploaded before it stopped
        needed = mark_reachable(self.source, [self.record]).blobs
        stats = CopyStats(blobs_total=len(needed))
        by_pack: dict[bytes, list[bytes]] = defaultdict(list)
        for blob_id in needed:
            if not self.destination.can_deduplicate(blob_id):
                loc = self.source.index.get(blob_id)
                if loc is None:
                    raise IntegrityError(
                        f"backup {self.record.backup_id} in region {self.record.region} references blob "
                        f"{blob_id.hex()}, which its store does not have; run "
                        f"`zfsbackd check --region {self.record.region}`"
                    )
                by_pack[loc.pack_id].append(blob_id)
        with PackWriter(self.destination) as writer:
            try:
                with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="zfsbackd-copy") as pool:
                    for _ in pool.map(lambda item: self._copy_pack(writer, *item), by_pack.items()):
                        pass
            finally:
                writer.flush()  # checkpoint whatever was copied, also when interrupted
        stats.blobs_copied = writer.stats.blobs_new
        stats.bytes_copied = writer.stats.bytes_new
        stats.bytes_uploaded = writer.stats.bytes_uploaded
        return stats

    def _copy_pack(self, writer: PackWriter, pack_id: bytes, blob_ids: list[bytes]) -> None:
        if self.cancel.is_set():
            raise BackupCancelled()
        key = pack_key(pack_id)
        locations = {b: self.source.index.get(b) for b in blob_ids}
        pack_bytes = self.source.index.pack_bytes(pack_id) or 1
        wanted = sum(loc.length for loc in locations.values() if loc)
        what = f"copy of backup {self.record.backup_id}: pack {key}"
        try:
            whole = self.source.objects.get(key) if wanted / pack_bytes >= WHOLE_PACK_SHARE else None
            for blob_id, loc in locations.items():
                assert loc is not None
                if not writer.reserve(blob_id, loc.raw_length):
                    continue
                if whole is not None:
                    sealed = whole[loc.offset : loc.offset + loc.length]
                else:
                    sealed = self.source.objects.get_range(key, loc.offset, loc.length)
                self._send(writer, blob_id, loc, sealed, what)
        except FileNotFoundError:
            raise IntegrityError(
                f"{what} is missing from region {self.record.region}'s store; the copy stays resumable. Run "
                f"`zfsbackd check --region {self.record.region}` to see which backups it affects"
            ) from None

    def _send(self, writer: PackWriter, blob_id: bytes, loc: Location, sealed: bytes, what: str) -> None:
        """Verify a sealed blob of the source and append it, sealed for the destination."""
        resealed = self.source.codec.reseal(blob_id, sealed, self.destination.codec, what=what)
        writer.add_sealed(loc.blob_type, blob_id, resealed, loc.raw_length)
