"""``check``: prove the store is whole, and with ``read_data`` that every byte is right.

Structure: every indexed pack exists and its header agrees with the index;
every pack is indexed; every live backup's trees are readable and every blob
they reference is indexed. Data: every pack re-hashes to its id and every
blob in it authenticates and re-hashes to its blob id. Each error names the
pack and, where one uses it, the backup and file (DESIGN invariant 4).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zfsbackd import pools
from zfsbackd.errors import ZfsbackdError
from zfsbackd.store.blobidset import BlobIdSet
from zfsbackd.store.packs import PackEntry, pack_id_of, pack_key, parse_header
from zfsbackd.store.reachability import find_users, mark_reachable
from zfsbackd.store.records import BackupRecord, Lifecycle
from zfsbackd.store.repository import Store

#: temporary objects older than this belong to a writer that is gone (a live one finishes a pack in seconds)
STALE_WRITE_REPORT_SECONDS = 3600
#: referenced blob ids looked up in the index at a time
BATCH_IDS = 4096


@dataclass
class CheckResult:
    region: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Findings that are not damage (leftovers of killed writers), so they do not fail the check."""
    backups: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    read_data: bool = False

    def to_api(self) -> dict[str, object]:
        return {
            "Region": self.region,
            "Errors": self.errors,
            "Warnings": self.warnings,
            "Backups": self.backups,
            "Packs": self.packs,
            "Blobs": self.blobs,
            "BytesRead": self.bytes_read,
            "ReadData": self.read_data,
        }


def check_store(store: Store, *, read_data: bool = False, workers: int = pools.CHECK_WORKERS) -> CheckResult:
    result = CheckResult(region=store.region, read_data=read_data)
    store.load_index(force=True, record_adopted=False, verify=True)
    for bad_index in store.unreadable_indexes:
        result.errors.append(
            f"{bad_index.message}; the packs it listed were re-read from their own headers, so no data is lost. "
            "`zfsbackd gc` replaces it with a new index"
        )
    all_records, unreadable = store.load_records_checked(cached=False)  # prove the store holds them
    for bad in unreadable:
        result.errors.append(f"{bad.error.message} (until it is resolved, garbage collection deletes nothing)")
    records = [r for r in all_records if r.lifecycle == Lifecycle.AVAILABLE]
    result.backups = len(records)
    for stale in store.objects.stale_writes(time.time() - STALE_WRITE_REPORT_SECONDS):
        result.warnings.append(
            f"{stale.key}: an unfinished write of a process that was killed ({stale.size} bytes); "
            "garbage collection removes it"
        )
    indexed = store.index.pack_ids()
    present = {pid for pid in store.list_pack_ids()}
    result.packs = len(present)
    gone = indexed - present  # or deleted meanwhile by a collection on another host: looked at again below

    with BlobIdSet(store.scratch_dir) as referenced:
        mark_reachable(store, records, referenced, on_error=result.errors.append, from_store=True)
        result.blobs = len(referenced)
        # (blob id, what is wrong with it; None: missing): each error names a file that uses the blob,
        # found by a second walk when there is one
        damaged: list[tuple[bytes, str | None]] = [
            (blob_id, None)
            for batch in referenced.batches(BATCH_IDS)
            for indexed in [store.index.present(batch)]
            for blob_id in batch
            if blob_id not in indexed
        ]

    def verify(pack_id: bytes) -> list[str]:
        key = pack_key(pack_id)
        expected = {e.blob_id: e for e in store.index.pack_entries(pack_id)}
        try:
            if not read_data:
                header = store.read_pack_header(pack_id)
                return _compare_header(key, header, expected)
            data = store.objects.get(key)
            result.bytes_read += len(data)
            errors = []
            if pack_id_of(data) != pack_id:
                errors.append(f"pack {key} does not match its id: its content is damaged")
            header, _ = parse_header(data[-min(len(data), 1 << 30) :], len(data), store.sealer, what=f"pack {key}")
            errors += _compare_header(key, header, expected)
            for e in header:
                try:
                    store.codec.decode(e.blob_id, data[e.offset : e.offset + e.length], what=f"pack {key}")
                except ZfsbackdError as exc:
                    damaged.append((e.blob_id, exc.message))
            return errors
        except ZfsbackdError as exc:
            return [f"{exc.message}"]
        except FileNotFoundError:
            gone.add(pack_id)
            return []
        except OSError as exc:
            return [f"pack {key} cannot be read: {exc}"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for errors in pool.map(verify, sorted(present)):
            result.errors.extend(errors)
    result.errors.extend(_damaged_blob_errors(store, records, damaged))
    result.errors.extend(_still_missing(store, gone))
    return result


def _damaged_blob_errors(
    store: Store, records: list[BackupRecord], damaged: list[tuple[bytes, str | None]]
) -> list[str]:
    """An error per missing (problem None) or damaged blob, naming a backup and file that use it (if any does)."""
    if not damaged:
        return []
    users = find_users(store, records, {blob_id for blob_id, _ in damaged})
    errors = []
    for blob_id, problem in damaged:
        user = users.get(blob_id)
        where = f"backup {user[0]}: {user[1]}: " if user else ""
        if problem is None:
            errors.append(f"{where}blob {blob_id.hex()} is missing from the store")
        else:
            errors.append(f"{where}{problem} (blob {blob_id.hex()})")
    return errors


def _still_missing(store: Store, gone: set[bytes]) -> list[str]:
    """Errors for the packs the index named but the store did not have, unless that was a collection on
    another host at work: it writes the index without a pack before it deletes the pack, so a pack the
    re-read index no longer names was collected, not lost (its live blobs were moved first)."""
    if not gone:
        return []
    store.load_index(force=True, record_adopted=False)
    listed = store.index.pack_ids()
    present = set(store.list_pack_ids())
    return [
        f"pack {pack_key(pack_id)} is listed in the index but missing from the store"
        for pack_id in sorted(gone)
        if pack_id in listed and pack_id not in present
    ]


def _compare_header(key: str, header: list[PackEntry], expected: dict[bytes, PackEntry]) -> list[str]:
    if not expected:
        return []  # an unindexed pack: adopted on the next open, not an error
    found = {e.blob_id: e for e in header}
    errors = []
    for blob_id, entry in expected.items():
        other = found.get(blob_id)
        if other is None or (other.offset, other.length) != (entry.offset, entry.length):
            errors.append(f"pack {key}: blob {blob_id.hex()} is in the index but not where its header says")
    return errors
