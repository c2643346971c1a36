"""Garbage collection: remove data no live backup needs (DESIGN invariant 3).

Mark from every record that is not DELETED; then for each pack older than
the grace period (and older than any backup still in progress): delete it if
nothing in it is referenced, or rewrite its referenced blobs into new packs
if only part of it is, so deleting a backup frees exactly its unique data.
Order keeps every step crash-safe: new packs → consolidated index → old
index objects deleted → old packs deleted.

Damage never makes collection delete more: a backup record that cannot be
read (corrupt, or written by a newer zfsbackd) may reference anything, so
while one exists nothing is deleted (the run says why and how to fix it); a
live backup's directory that cannot be read likewise stops the sweep. Index
objects that cannot be read are replaced (their packs were re-read from their
headers when the index was loaded), and temporary files of writers that were
killed are removed once they are older than the grace period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from zfsbackd import faults
from zfsbackd.errors import ZfsbackdError
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
    index_objects_replaced: int = 0
    stale_writes_removed: int = 0
    skipped_reason: str | None = None
    """Why nothing was deleted (unreadable records or trees); None when the sweep ran."""

    def to_api(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {
            "PacksDeleted": self.packs_deleted,
            "PacksRewritten": self.packs_rewritten,
            "BlobsRemoved": self.blobs_removed,
            "BytesFreed": self.bytes_freed,
            "PacksKeptYoung": self.packs_kept_young,
            "IndexObjectsReplaced": self.index_objects_replaced,
            "StaleWritesRemoved": self.stale_writes_removed,
        }
        if self.skipped_reason:
            out["SkippedReason"] = self.skipped_reason
        return out


def collect_garbage(store: Store, *, grace_seconds: int, now: float | None = None) -> GcResult:
    """Must run under the store's exclusive lock (no backup, copy or restore of this host using it)."""
    now = time.time() if now is None else now
    result = GcResult()
    store.load_index(force=True, verify=True)  # verify: a damaged index object is found and replaced
    result.stale_writes_removed = store.objects.remove_stale_writes(now - grace_seconds)
    records, unreadable = store.load_records_checked()
    if unreadable:
        names = ", ".join(f"{u.backup_id} ({u.error.code})" for u in unreadable[:5])
        return _skip(
            store,
            result,
            f"{len(unreadable)} backup record(s) cannot be read: {names}; they may reference any data, so "
            "nothing was deleted. Run `zfsbackd check` for details; a corrupt record is cleared with "
            "`zfsbackd delete-backup --backup-id ID`, a newer-format one needs a newer zfsbackd",
        )
    live = [r for r in records if r.lifecycle != Lifecycle.DELETED]
    try:
        referenced = mark_reachable(store, live).blobs
    except ZfsbackdError as exc:
        return _skip(
            store,
            result,
            f"a live backup's directory cannot be read ({exc.message}), so what it references is unknown and "
            "nothing was deleted. Run `zfsbackd check`; delete the damaged backup to let collection proceed",
        )
    cutoff = now - grace_seconds
    for r in records:
        if r.lifecycle in IN_PROGRESS:  # its blobs are not referenced yet: keep everything since it began
            cutoff = min(cutoff, r.creation_time.timestamp() - grace_seconds)

    sizes = {info.key: info for info in store.objects.list("data/")}
    obsolete: list[bytes] = []
    to_rewrite: list[PackEntry] = []
    rewritten_ids: set[bytes] = set()
    for pack_id, entries in store.index.iter_packs():  # one pack at a time, from the on-disk index
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
    if not obsolete and not store.unreadable_indexes:
        return result

    with PackWriter(store) as writer:
        for e in to_rewrite:
            loc = store.index.get(e.blob_id)
            assert loc is not None
            sealed = store.objects.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
            writer.add_sealed(e.blob_type, e.blob_id, sealed, e.raw_length)  # moved as-is, still sealed
        writer.flush()
    store.index.remove_packs(obsolete)
    # Unreadable index objects go too: every pack they listed was adopted from its header.
    superseded = set(store.index_keys) | {bad.key for bad in store.unreadable_indexes}
    result.index_objects_replaced = len(superseded)
    store.write_consolidated_index()
    faults.point("gc-index-replaced")
    for key in superseded:
        store.objects.delete(key)
        store.index_keys.discard(key)
    store.unreadable_indexes = []
    for pack_id in obsolete:
        store.objects.delete(pack_key(pack_id))
        faults.point("gc-pack-deleted")
    log.info("garbage_collected", region=store.region, **result.to_api())
    return result


def _skip(store: Store, result: GcResult, reason: str) -> GcResult:
    result.skipped_reason = reason
    log.error("garbage_collection_skipped", region=store.region, reason=reason)
    return result
