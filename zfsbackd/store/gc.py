"""Garbage collection: remove data no live backup needs (DESIGN invariant 3), safely across hosts.

Mark from every record that is not DELETED; a pack older than the grace
period (and older than any backup still in progress) with blobs nothing
references is *unreferenced*. Deleting one is two-phase, so that a writer on
another host that deduplicated against it is never undone:

1. A run that finds unreferenced packs no candidate set names writes them as
   a new candidate set (``gc/candidates-*``, zfsbackd.store.candidates) and
   deletes nothing of them. Writers that start after that never deduplicate
   against them.
2. A run at least the grace period later (store time) executes the set: it
   deletes, or rewrites the referenced blobs of, each of its packs that is
   still unreferenced now — but only when no live writer lease started before
   the set was written (plus ``ORDER_MARGIN_SECONDS``): such a writer may
   have deduplicated against the set's packs without knowing.

With a grace period of 0 a run may execute the set it just wrote, when a
second look shows no writer that could have missed it and no record changed
since the run began. Leases are listed before records are read: a writer
that released its lease before the listing saved its record before, so the
marking sees what it references. One collection per store at a time, fleet
wide (an exclusive lease). The whole argument: FORMAT.md, "Garbage
collection across hosts".

Order keeps every step crash-safe: new packs → consolidated index → old packs
deleted → old index objects deleted → executed candidate sets deleted (a pack
leaves the avoided set only after no index lists it).

Damage never makes collection delete more: a backup record that cannot be
read (corrupt, or written by a newer zfsbackd) may reference anything, so
while one exists nothing is deleted (the run says why and how to fix it); a
live backup's directory that cannot be read likewise stops the sweep. Index
objects that cannot be read are replaced (their packs were re-read from their
headers when the index was loaded), and temporary files of writers that were
killed are removed once they are older than the grace period and an hour.
Last, the records of backups deleted longer ago than
``garbage_collection.deleted_records_retention_days`` are removed (FORMAT.md,
"Backup records").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from zfsbackd import faults
from zfsbackd.errors import ZfsbackdError
from zfsbackd.store.blobidset import BlobIdSet
from zfsbackd.store.candidates import CandidateSet
from zfsbackd.store.leases import Lease, Operation
from zfsbackd.store.packs import PackEntry, pack_id_from_key, pack_key
from zfsbackd.store.reachability import mark_reachable
from zfsbackd.store.records import IN_PROGRESS, RECORD_PREFIX, BackupRecord, Lifecycle, record_key
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter

log = structlog.get_logger(__name__)

STALE_WRITE_MIN_AGE_SECONDS = 3600
"""Leftovers of interrupted writes are removed only once at least this old, whatever the grace period."""
DELETED_RECORDS_RETENTION_SECONDS = 30 * 86400
"""How long a DELETED record stays (garbage_collection.deleted_records_retention_days' default)."""
ORDER_MARGIN_SECONDS = 60.0
"""A writer whose lease was first written less than this after a candidate set may have listed the
sets before that set was in the store (an upload's duration plus timestamp resolution): it counts as
having started before the set."""


@dataclass
class GcResult:
    packs_deleted: int = 0
    packs_rewritten: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    packs_kept_young: int = 0
    packs_marked: int = 0
    """Unreferenced packs named in a new candidate set by this run (deleted by a later one)."""
    packs_waiting: int = 0
    """Packs of candidate sets not executed yet (too young, or a writer that started before holds a lease)."""
    index_objects_replaced: int = 0
    stale_writes_removed: int = 0
    deleted_records_removed: int = 0
    """Records of backups deleted longer ago than the retention (their data went long before)."""
    retry_after_seconds: float | None = None
    """When a later run could execute the waiting sets (None: nothing waits)."""
    skipped_reason: str | None = None
    """Why nothing was deleted (unreadable records or trees); None when the sweep ran."""

    def to_api(self) -> dict[str, int | float | str]:
        out: dict[str, int | float | str] = {
            "PacksDeleted": self.packs_deleted,
            "PacksRewritten": self.packs_rewritten,
            "BlobsRemoved": self.blobs_removed,
            "BytesFreed": self.bytes_freed,
            "PacksKeptYoung": self.packs_kept_young,
            "PacksMarked": self.packs_marked,
            "PacksWaiting": self.packs_waiting,
            "IndexObjectsReplaced": self.index_objects_replaced,
            "StaleWritesRemoved": self.stale_writes_removed,
            "DeletedRecordsRemoved": self.deleted_records_removed,
        }
        if self.retry_after_seconds is not None:
            out["RetryAfterSeconds"] = round(self.retry_after_seconds)
        if self.skipped_reason:
            out["SkippedReason"] = self.skipped_reason
        return out


@dataclass
class _Unreferenced:
    """An old pack with blobs nothing references: the blobs to keep (rewrite) and what goes."""

    used: list[PackEntry]
    blobs_removed: int
    bytes_freed: int


def collect_garbage(
    store: Store, *, grace_seconds: int, deleted_records_retention_seconds: float = DELETED_RECORDS_RETENTION_SECONDS
) -> GcResult:
    """Collect garbage in ``store``. On this host, run under the store's exclusive lock (no backup,
    copy or restore of this host using it); across hosts the store's own GC lease keeps one
    collection at a time (StoreBusy for the others) and leases keep writers safe."""
    with store.leases.acquire_exclusive(Operation.GARBAGE_COLLECTION, store.region):
        return _collect(store, grace_seconds, deleted_records_retention_seconds)


def _collect(store: Store, grace_seconds: int, deleted_records_retention_seconds: float) -> GcResult:
    result = GcResult()
    now = store.leases.store_now()  # every age below is in the store's time, never this host's
    _take_over_expired(store, store.leases.leases(), now)
    writers = [lease for lease in store.leases.live(now) if lease.writes]  # before the records: see above
    store.load_index(force=True, verify=True)  # verify: a damaged index object is found and replaced
    # A temporary file of a writer on another host may be young even with grace 0: at least an hour,
    # by the older of the two clocks (a local store's temporaries carry the writer's clock).
    stale_before = min(now, time.time()) - max(grace_seconds, STALE_WRITE_MIN_AGE_SECONDS)
    result.stale_writes_removed = store.objects.remove_stale_writes(stale_before)
    records_seen = _record_objects(store)  # a commit changes a record's key set or size (lifecycle, tree)
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
    cutoff = now - grace_seconds
    for r in records:
        if r.lifecycle in IN_PROGRESS:  # its blobs are not referenced yet: keep everything since it began
            cutoff = min(cutoff, r.creation_time.timestamp() - grace_seconds)
    sets, unreadable_sets = store.candidates.sets()
    named = frozenset().union(*(c.packs for c in sets))
    with BlobIdSet(store.scratch_dir) as referenced:
        try:
            mark_reachable(store, live, referenced)
        except ZfsbackdError as exc:
            return _skip(
                store,
                result,
                f"a live backup's directory cannot be read ({exc.message}), so what it references is unknown and "
                "nothing was deleted. Run `zfsbackd check`; delete the damaged backup to let collection proceed",
            )
        unreferenced, missing = _unreferenced_packs(store, referenced, cutoff, named, result)
    # Candidates already deleted by a collection killed before it replaced the index objects naming them.
    vanished = missing & named
    executed = [c for c in sets if _ready(c, now, grace_seconds, writers)]
    ready = frozenset().union(*(c.packs for c in executed))
    deletable = {p: u for p, u in unreferenced.items() if p in ready}
    waiting = [c for c in sets if c not in executed]
    new = {p for p in unreferenced if p not in named}
    if new:
        marked = store.candidates.write(new, store.leases.identity)
        result.packs_marked = len(new)
        log.info("gc_candidates_marked", region=store.region, key=marked.key, packs=len(new))
        if grace_seconds == 0 and _nothing_moved_since(store, marked, records_seen):
            executed.append(marked)
            deletable.update((p, unreferenced[p]) for p in new)
        else:
            waiting.append(marked)
    result.packs_waiting = len(frozenset().union(*(c.packs for c in waiting)) - ready)
    if waiting:
        result.retry_after_seconds = _retry_after(waiting, now, grace_seconds, store.leases.ttl)
    _delete(store, deletable, vanished, result)
    for c in executed:
        store.candidates.remove(c.key)
    for key in unreadable_sets:  # never executed by anyone (they cannot be read), so nothing depends on them
        store.candidates.remove(key)
    _remove_old_deleted_records(store, records, records_seen, now - deleted_records_retention_seconds, result)
    if deletable or result.index_objects_replaced:
        log.info("garbage_collected", region=store.region, **result.to_api())
    return result


def _remove_old_deleted_records(
    store: Store,
    records: list[BackupRecord],
    records_seen: dict[str, tuple[int, float]],
    deleted_before: float,
    result: GcResult,
) -> None:
    """Remove the records of backups deleted before ``deleted_before`` (store time).

    DELETED is the last lifecycle step, so a DELETED record's object was last
    written when the backup was deleted: its store time is the deletion's.
    Marking never reads DELETED records, so removing one changes nothing of
    what is referenced; it ends the answers only it gave ("already deleted",
    the backup a retried client request token made), after the retention.
    Without it a store that takes a daily backup of each file system keeps
    every day's record for ever (and every host lists them).
    """
    for record in records:
        if record.lifecycle != Lifecycle.DELETED:
            continue
        key = record_key(record.backup_id)
        seen = records_seen.get(key)
        if seen is not None and seen[1] < deleted_before:
            store.objects.delete(key)
            result.deleted_records_removed += 1
    if result.deleted_records_removed:
        log.info("deleted_records_removed", region=store.region, records=result.deleted_records_removed)


def _unreferenced_packs(
    store: Store, referenced: BlobIdSet, cutoff: float, candidates: frozenset[bytes], result: GcResult
) -> tuple[dict[bytes, _Unreferenced], set[bytes]]:
    """Old packs holding blobs nothing needs from them: unreferenced blobs, and duplicates of referenced
    ones kept in another pack (a writer that avoided a candidate stored its blobs again: that copy stays).
    Also the packs the index lists that are gone from the store."""
    sizes = {info.key: info for info in store.objects.list("data/")}
    present = {pack_id for key in sizes if (pack_id := pack_id_from_key(key)) is not None}
    found: dict[bytes, _Unreferenced] = {}
    missing: set[bytes] = set()
    stored_twice = store.index.duplicated()  # only these need the choice of the pack that keeps them
    for pack_id, entries in store.index.iter_packs():  # one pack at a time, from the on-disk index
        info = sizes.get(pack_key(pack_id))
        if info is None:
            missing.add(pack_id)  # unless collection deleted it (see vanished), `check` reports it
            continue
        if info.mtime > cutoff:
            result.packs_kept_young += 1
            continue
        in_use = referenced.present([e.blob_id for e in entries])
        used = [
            e
            for e in entries
            if e.blob_id in in_use
            and (
                e.blob_id not in stored_twice
                or store.index.keeping_pack(e.blob_id, present=present, avoid=candidates) == pack_id
            )
        ]
        if len(used) < len(entries):
            found[pack_id] = _Unreferenced(used, len(entries) - len(used), info.size - sum(e.length for e in used))
    return found, missing


def _take_over_expired(store: Store, leases: list[Lease], now: float) -> None:
    """Remove the leases of holders that stopped renewing (dead, or cut off from the store).

    A holder cut off for longer than its lease time finds its lease lapsed
    when it tries to commit, and commits nothing (HeldLease.confirm), so what
    collection does from here on cannot undo its work.
    """
    for lease in leases:
        if lease.expired(now):
            log.warning("lease_taken_over", region=store.region, lease=lease.describe(),
                        silent_seconds=round(now - lease.renewed))
            store.objects.delete(lease.key)


def _ready(c: CandidateSet, now: float, grace_seconds: int, writers: list[Lease]) -> bool:
    """May set ``c`` be executed now: old enough, and no live writer that may not have seen it?"""
    if now - c.created < grace_seconds:
        return False
    return not [w for w in writers if w.started < c.created + ORDER_MARGIN_SECONDS]


def _record_objects(store: Store) -> dict[str, tuple[int, float]]:
    return {info.key: (info.size, info.mtime) for info in store.objects.list(RECORD_PREFIX)}


def _nothing_moved_since(store: Store, marked: CandidateSet, records_seen: dict[str, tuple[int, float]]) -> bool:
    """May the set this run just wrote be executed at once (grace period 0)?

    Only if a second listing of leases shows no writer that may have missed
    it, and no record changed since the marking read them (a writer that
    committed and released between the first listing and the set would
    reference data the marking did not see; its commit adds a record or
    changes one's size, from CREATING or COPYING to AVAILABLE with a tree).
    """
    later = store.leases.store_now()
    if not _ready(marked, later, 0, [lease for lease in store.leases.live(later) if lease.writes]):
        return False
    return _record_objects(store) == records_seen


def _retry_after(waiting: list[CandidateSet], now: float, grace_seconds: int, lease_seconds: float) -> float:
    """Seconds until a waiting set could be ready: its age, or a lease renewal round."""
    ages = [c.created + grace_seconds - now for c in waiting]
    return max(min([*ages, lease_seconds]), lease_seconds / 3, 1.0)


def _delete(store: Store, deletable: dict[bytes, _Unreferenced], vanished: set[bytes], result: GcResult) -> None:
    """Rewrite the used blobs of ``deletable`` packs, index, delete them, then the superseded index objects.

    ``vanished`` packs were deleted by an earlier collection that was killed
    before it replaced the index objects naming them: only the index is fixed.
    """
    if not deletable and not vanished and not store.unreadable_indexes:
        return
    rewritten: set[bytes] = set()
    with PackWriter(store) as writer:
        for pack_id, u in deletable.items():
            result.blobs_removed += u.blobs_removed
            result.bytes_freed += u.bytes_freed
            keep = [e for e in u.used if e.blob_id not in rewritten]
            if keep:
                result.packs_rewritten += 1
            else:
                result.packs_deleted += 1
            for e in keep:  # read from the pack being deleted: it is the copy that was kept
                sealed = store.objects.get_range(pack_key(pack_id), e.offset, e.length)
                writer.add_sealed(e.blob_type, e.blob_id, sealed, e.raw_length)  # moved as-is, still sealed
                rewritten.add(e.blob_id)
        writer.flush()
    store.index.remove_packs([*deletable, *vanished])
    # Unreadable index objects go too: every pack they listed was adopted from its header.
    superseded = set(store.index_keys) | {bad.key for bad in store.unreadable_indexes}
    result.index_objects_replaced = len(superseded)
    store.write_consolidated_index()
    faults.point("gc-index-replaced")
    for pack_id in deletable:
        store.objects.delete(pack_key(pack_id))
        faults.point("gc-pack-deleted")
    for key in superseded:
        store.objects.delete(key)
        store.index_keys.discard(key)
    store.unreadable_indexes = []


def _skip(store: Store, result: GcResult, reason: str) -> GcResult:
    result.skipped_reason = reason
    log.error("garbage_collection_skipped", region=store.region, reason=reason)
    return result
