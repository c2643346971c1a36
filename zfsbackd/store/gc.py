"""Garbage collection: remove data no live backup needs (DESIGN invariant 3).

Mark from every record that is not DELETED; then for each pack older than
the grace period (and older than any backup still in progress): delete it if
nothing in it is referenced, or rewrite its referenced blobs into new packs
if only part of it is, so deleting a backup frees exactly its unique data.
Order keeps every step crash-safe: new packs → consolidated index → old
index objects deleted → old packs deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from zfsbackd.store.packs import PackEntry, pack_key
from zfsbackd.store.reachability import mark_reachable
from zfsbackd.store.records import IN_PROGRESS, Lifecycle
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter

log = structlog.get_logger(__name__)


@dataclass
class GcResult:
    packs_deleted: int = 0
    packs_rewritten: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    packs_kept_young: int = 0

    def to_api(self) -> dict[str, int]:
        return {
            "PacksDeleted": self.packs_deleted,
            "PacksRewritten": self.packs_rewritten,
            "BlobsRemoved": self.blobs_removed,
            "BytesFreed": self.bytes_freed,
            "PacksKeptYoung": self.packs_kept_young,
        }


def collect_garbage(store: Store, *, grace_seconds: int, now: float | None = None) -> GcResult:
    """Must run under the store's exclusive lock (no backup or copy writing to it)."""
    now = time.time() if now is None else now
    store.load_index(force=True)
    records = store.load_records()
    live = [r for r in records if r.lifecycle != Lifecycle.DELETED]
    referenced = mark_reachable(store, live).blobs
    cutoff = now - grace_seconds
    for r in records:
        if r.lifecycle in IN_PROGRESS:  # its blobs are not referenced yet: keep everything since it began
            cutoff = min(cutoff, r.creation_time.timestamp() - grace_seconds)

    result = GcResult()
    packs = store.index.packs()
    sizes = {info.key: info for info in store.objects.list("data/")}
    obsolete: list[bytes] = []
    to_rewrite: list[PackEntry] = []
    rewritten_ids: set[bytes] = set()
    for pack_id, entries in packs.items():
        info = sizes.get(pack_key(pack_id))
        if info is None:
            continue  # listed by an index but gone: `check` reports it
        if info.mtime > cutoff:
            result.packs_kept_young += 1
            continue
        used = [
            e
            for e in entries
            if e.blob_id in referenced
            and store.index.get(e.blob_id).pack_id == pack_id  # type: ignore[union-attr]
            and e.blob_id not in rewritten_ids
        ]
        if len(used) == len(entries):
            continue
        obsolete.append(pack_id)
        result.blobs_removed += len(entries) - len(used)
        result.bytes_freed += info.size - sum(e.length for e in used)
        if used:
            result.packs_rewritten += 1
            to_rewrite.extend(used)
            rewritten_ids.update(e.blob_id for e in used)
        else:
            result.packs_deleted += 1
    if not obsolete:
        return result

    with PackWriter(store) as writer:
        for e in to_rewrite:
            loc = store.index.get(e.blob_id)
            assert loc is not None
            sealed = store.objects.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
            writer.add_sealed(e.blob_type, e.blob_id, sealed, e.raw_length)  # moved as-is, still sealed
        writer.flush()
    store.index.remove_packs(obsolete)
    superseded = set(store.index_keys)
    store.write_index(store.index.packs())
    for key in superseded:
        store.objects.delete(key)
        store.index_keys.discard(key)
    for pack_id in obsolete:
        store.objects.delete(pack_key(pack_id))
    log.info("garbage_collected", region=store.region, **result.to_api())
    return result
