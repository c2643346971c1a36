"""The Engine: the operations of DESIGN.md as a library (no threads of its own, no config parsing).

It takes a parsed :class:`~zfsbackd.config.Config`, opens each region's store
on first use, and enforces the cross-process rules through
:class:`~zfsbackd.engine.locks.LockManager`: one backup per file system,
garbage collection alone on a store.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from zfsbackd import faults
from zfsbackd.config import Config, FileSystemConfig
from zfsbackd.engine.archiver import Archiver, BackupCancelled
from zfsbackd.engine.copier import Copier
from zfsbackd.engine.known_stores import KnownStores
from zfsbackd.engine.locks import LockManager
from zfsbackd.engine.progress import Progress
from zfsbackd.engine.restorer import Restorer, RestoreResult, check_target
from zfsbackd.engine.shards import ShardContext
from zfsbackd.errors import (
    BackupBeingCopied,
    BackupInProgress,
    BackupNotFound,
    BackupRestoring,
    BadRequest,
    IncompatibleParameterError,
    IntegrityError,
    LeaseLost,
    RestoreError,
    SourceBackupUnavailable,
    StoreBusy,
    StoreError,
    ZfsbackdError,
)
from zfsbackd.identity import HostIdentity
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.factory import open_object_store
from zfsbackd.snapshot import find_or_take_snapshot, zfs_encryption
from zfsbackd.snapshot import zfs as zfs_snapshots
from zfsbackd.snapshot.base import PendingChanges, Snapshot
from zfsbackd.snapshot.detect import choose_provider
from zfsbackd.store.check import CheckResult, check_store
from zfsbackd.store.crypto import load_key_file
from zfsbackd.store.gc import GcResult, collect_garbage
from zfsbackd.store.leases import HeldLease, Operation
from zfsbackd.store.records import (
    IN_PROGRESS,
    BackupRecord,
    BackupType,
    Lifecycle,
    RecordFormatError,
    new_backup_id,
    utc_now,
)
from zfsbackd.store.repository import Store, UnreadableRecord
from zfsbackd.store.writer import PackWriter
from zfsbackd.validation import (
    validate_backup_id,
    validate_backup_name,
    validate_client_request_token,
    validate_tags,
)
from zfsbackd.zfs import command as zfs_command
from zfsbackd.zfs import libzfs_core as zfs_lzc
from zfsbackd.zfs.exceptions import ZFSInitializationFailed

log = structlog.get_logger(__name__)

FILTER_NAMES = ("file-system-id", "backup-type", "lifecycle", "host")
#: the values a filter can take, where they are a closed set (a typo must not look like "no backups")
FILTER_VALUES: dict[str, frozenset[str]] = {
    "backup-type": frozenset(t.value for t in BackupType),
    "lifecycle": frozenset(lc.value for lc in Lifecycle),
}
#: record properties holding the source dataset's ZFS properties (set again on a restore to a new dataset)
ZFS_PROPERTY_PREFIX = "zfs:"
READ_ONLY_AFTER_RESTORE = ("readonly",)
RECORD_SAVE_INTERVAL = 5.0


class BackupPage(NamedTuple):
    """What describe-backups returns: readable records, the token of the next page, unreadable records."""

    records: list[BackupRecord]
    next_token: str | None
    unreadable: list[UnreadableRecord]

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Backups": [r.to_api() for r in self.records]}
        if self.next_token:
            out["NextToken"] = self.next_token
        if self.unreadable:
            out["UnreadableBackups"] = [u.to_api() for u in self.unreadable]
        return out


@dataclass
class BackupRequest:
    file_system_id: str
    backup_type: BackupType = BackupType.USER_INITIATED
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    client_request_token: str | None = None

    def check_retry_of(self, file_system_id: str, name: str | None, backup_type: BackupType,
                       tags: Mapping[str, str], earlier: str) -> None:
        """Refuse this request if it reuses its client request token for other parameters.

        ``earlier`` names what the token was used for, for the message. Tags given
        replace the file system's (FSx), so they must match exactly; none given means
        "whatever the file system's were then", which cannot conflict.
        """
        same = (file_system_id, name, backup_type) == (self.file_system_id, self.name, self.backup_type)
        if not same or (self.tags and dict(tags) != dict(self.tags)):
            raise IncompatibleParameterError(
                f"--client-request-token {self.client_request_token} was already used for {earlier} with other "
                "parameters; use a new token for a new request"
            )


class Engine:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], datetime] = utc_now,
        objects: Callable[..., ObjectStore] = open_object_store,
    ) -> None:
        """``clock`` gives record times (UTC); the daemon's simulations inject their own. ``objects``
        opens a region's object store (tests: ``zfsbackd.objectstore.memory.MemoryRegions.open``)."""
        self.config = config
        self.clock = clock
        self._open_objects = objects
        self.locks = LockManager(config.state_dir)
        self._identity: HostIdentity | None = None
        self._stores: dict[str, Store] = {}
        self._stores_lock = threading.RLock()
        self._key_material: bytes | None = None
        self._key_loaded = False

    @property
    def identity(self) -> HostIdentity:
        """This host in the fleet; made on first use, so that commands which never open a store
        (``config validate``, ``key generate``) do not need a writable ``state_dir``."""
        if self._identity is None:
            self._identity = HostIdentity.of(self.config.host_name, self.config.state_dir)
        return self._identity

    # ------------------------------------------------------------------ stores
    def _key(self) -> bytes | None:
        if not self._key_loaded:
            enc = self.config.encryption
            self._key_material = None if enc.mode == "none" else load_key_file(enc.key_file)  # type: ignore[arg-type]
            self._key_loaded = True
        return self._key_material

    def store(self, region: str | None = None) -> Store:
        """The store of ``region`` (home region by default).

        A missing store is created only when the region says
        ``create_if_missing: true`` (else StoreNotInitialized: see
        :meth:`init_store`), and never when this host used a store there before
        (see :mod:`zfsbackd.engine.known_stores`).
        """
        name = self.config.region(region).name
        with self._stores_lock:
            if name not in self._stores:
                self._stores[name] = self._open_store(name, init=False)
            return self._stores[name]

    def init_store(self, region: str | None = None) -> Store:
        """Create the store of ``region`` deliberately (``zfsbackd store init``), or open the existing one.

        For a local region the directory is created too. The store is
        accepted as this host's store of the region from now on, also when it
        replaces one used before (logged). ``Store.created`` says whether it was
        created now.
        """
        name = self.config.region(region).name
        with self._stores_lock:
            store = self._open_store(name, init=True)
            self._stores[name] = store
            return store

    def _open_store(self, name: str, *, init: bool) -> Store:
        region = self.config.region(name)
        identity = self.identity  # first: an unusable state_dir is the error to report, not the store's
        # A region's new store takes the home region's id key (so blob ids compare) and chunker seed (so
        # the same data makes the same blobs); stores made before the seed was shared keep their own.
        home = self.config.home_region
        like = None if name == home else self.store(home).keys
        id_key = like.id_key if like else None
        known = KnownStores(self.config.state_dir)
        used_before = known.store_id(name)
        store = Store.open(
            self._open_objects(region, create_root=init),
            region=name,
            key_material=self._key(),
            create=init or region.create_if_missing,
            like=like,
            used_before=None if init else used_before,
        )
        store.use_identity(identity, lease_seconds=self.config.garbage_collection.lease_seconds)
        store.use_index_cache(self.config.state_dir)  # the blob index persists in state_dir/cache/<store id>
        store.use_tree_cache(self.config.state_dir)  # parent trees are read locally, verified by their ids
        store.use_record_cache(self.config.state_dir)  # records fetched only when their version is new
        store.use_listing_cache(self.config.state_dir)  # unchanged directories compared all at once
        if id_key is not None and store.keys.id_key != id_key:
            raise StoreError(
                f"the store in region {name} ({store.objects.location}) belongs to another deployment "
                f"(its blob-id key differs from region {home}'s); point regions.{name} at an empty "
                f"location and create a store there with `zfsbackd store init --region {name}`, or at this "
                "deployment's store"
            )
        if used_before != store.store_id:
            if used_before is not None:
                log.warning("store_replaced", region=name, store_id=store.store_id, previous_store_id=used_before)
            known.remember(name, store.store_id, store.objects.location)
        return store

    def open_stores(self) -> dict[str, Store]:
        """The stores opened so far, by region (for metrics; opening none)."""
        with self._stores_lock:
            return dict(self._stores)

    # ----------------------------------------------------------------- backups
    def create_backup(
        self,
        request: BackupRequest,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_record: Callable[[BackupRecord], None] | None = None,
    ) -> BackupRecord:
        """Snapshot the file system and back it up incrementally; returns the final record.

        A backup of the same file system left CREATING by a process that died
        is resumed (same id, every uploaded blob reused), not started over.
        """
        fs = self.config.file_system(request.file_system_id)
        if request.name is not None:
            validate_backup_name(request.name)
        tags = dict(fs.tags) if fs.copy_tags_to_backups else {}
        tags = validate_tags(request.tags, "--tag") or tags  # as FSx: given tags replace the file system's
        earlier = self.find_earlier_request(request)
        if earlier is not None:
            return earlier
        with (
            self.locks.file_system(fs.id),
            self.locks.store(self.config.home_region, exclusive=False),
            self.store().writing(Operation.BACKUP, fs.id) as lease,
        ):
            store = self.store()
            store.load_index()  # after the lease: see Store.writing
            records = [r for r in self.own_records() if r.file_system_id == fs.id]
            record = next((r for r in records if r.lifecycle == Lifecycle.CREATING), None)
            if record is not None:
                log.info("backup_resuming", fs_id=fs.id, backup_id=record.backup_id, region=store.region)
                store.load_index(force=True, adopt=True)  # the packs it uploaded before it stopped
            else:
                record = BackupRecord(
                    backup_id=new_backup_id(),
                    file_system_id=fs.id,
                    region=store.region,
                    backup_type=request.backup_type,
                    lifecycle=Lifecycle.CREATING,
                    creation_time=self.clock(),
                    name=request.name,
                    tags=tags,
                    source=fs.source_description,
                    client_request_token=request.client_request_token,
                    host_name=self.config.host_name,
                )
                store.save_record(record)
                log.info("backup_creating", fs_id=fs.id, backup_id=record.backup_id, region=store.region)
            if on_record:
                on_record(record)
            parent = self._newest_available(records)
            return self._run_backup(store, fs, record, parent, progress, cancel, lease)

    def find_earlier_request(self, request: BackupRequest) -> BackupRecord | None:
        """The backup an identical earlier request (same client request token) made, if any.

        Checked before taking the file-system lock, so a retried request for a
        backup that is still running gets that backup back, not BackupInProgress.
        A CREATING one whose process died is resumed instead (returns None).
        """
        token = request.client_request_token
        if token is None:
            return None
        validate_client_request_token(token)
        for r in self.own_records():  # a token names one host's request: hosts may reuse each other's
            if r.client_request_token != token or r.lifecycle == Lifecycle.FAILED:
                continue
            request.check_retry_of(r.file_system_id, r.name, r.backup_type, r.tags, f"backup {r.backup_id}")
            if r.lifecycle == Lifecycle.CREATING and not self.locks.is_file_system_busy(r.file_system_id):
                return None
            return r
        return None

    def _record_failure(self, store: Store, record: BackupRecord, exc: Exception) -> BackupRecord:
        """Save the record FAILED with a reason a person can act on (the error's own message)."""
        message = exc.message if isinstance(exc, ZfsbackdError) else f"{type(exc).__name__}: {exc}"
        record = record.with_changes(lifecycle=Lifecycle.FAILED, failure_message=message, completion_time=self.clock())
        store.save_record(record)
        return record

    @staticmethod
    def _newest_available(records: Sequence[BackupRecord]) -> BackupRecord | None:
        available = [r for r in records if r.lifecycle == Lifecycle.AVAILABLE and r.root_tree]
        return max(available, key=lambda r: r.creation_time) if available else None

    def _run_backup(
        self,
        store: Store,
        fs: FileSystemConfig,
        record: BackupRecord,
        parent: BackupRecord | None,
        progress: Progress | None,
        cancel: threading.Event | None,
        lease: HeldLease,
    ) -> BackupRecord:
        started = time.monotonic()
        progress = progress or Progress()
        progress.total_bytes = parent.stats.bytes_total if parent else 0
        last_save = [time.monotonic()]
        user_callback = progress.on_update

        def on_update(p: Progress) -> None:
            if user_callback:
                user_callback(p)
            if time.monotonic() - last_save[0] >= RECORD_SAVE_INTERVAL:
                last_save[0] = time.monotonic()
                store.save_record(record.with_changes(progress_percent=p.percent))

        progress.on_update = on_update
        snapshot = None
        changes = None
        try:
            provider = choose_provider(fs, self.config.state_dir)  # type: ignore[arg-type]
            # Hooks run around a snapshot taken now, not around one a resumed attempt finds again.
            snapshot = find_or_take_snapshot(fs, record.backup_id, provider)  # type: ignore[arg-type]
            # Worked out from now on, while the record is written and then while the walk runs; the walk
            # uses it from the moment it is ready (a ZFS send stream: what an incremental waits for first).
            changes = PendingChanges(snapshot, parent.snapshot) if parent else None
            record = record.with_changes(
                snapshot=snapshot.describe(),
                parent_backup_id=parent.backup_id if parent else None,
                properties={
                    **record.properties,
                    **{ZFS_PROPERTY_PREFIX + k: v for k, v in snapshot.source_properties().items()},
                },
            )
            store.save_record(record)
            with PackWriter(store, on_uploaded=progress.uploaded) as writer:
                archiver = Archiver(
                    store,
                    writer,
                    snapshot,
                    parent.root_tree if parent else None,
                    progress=progress,
                    cancel=cancel,
                    changes=changes,
                    on_entry_error=fs.on_entry_error,
                    fs_id=fs.id,
                    backup_id=record.backup_id,
                    shards=self._shard_context(store, fs, record, snapshot),
                )
                try:
                    root_tree, stats = archiver.run()
                finally:
                    if changes is not None:
                        changes.stop()
                    # Packs, then the index: durable before the record names them. On an
                    # interruption this checkpoints what was read, so the resumed run reuses it.
                    writer.flush()
                    store.flush_caches()  # the next incremental finds this backup's trees and listings locally
            faults.point("backup-data-durable")
            ws = writer.stats
            stats.bytes_new, stats.blobs_new = ws.bytes_new, ws.blobs_new
            stats.bytes_uploaded, stats.bytes_deduplicated = ws.bytes_uploaded, ws.bytes_deduplicated
            stats.blobs_deduplicated = ws.blobs_deduplicated
            stats.duration_seconds = time.monotonic() - started
            lease.confirm()  # a lapsed lease may have let another host's collection delete what this used
            record = record.with_changes(
                lifecycle=Lifecycle.AVAILABLE,
                root_tree=root_tree,
                stats=stats,
                progress_percent=100,
                size_in_bytes=stats.bytes_total,
                completion_time=self.clock(),
            )
            store.save_record(record)
            log.info(
                "backup_available",
                fs_id=record.file_system_id,
                backup_id=record.backup_id,
                region=store.region,
                duration_seconds=round(stats.duration_seconds, 3),
                files=stats.files,
                bytes_read=stats.bytes_read,
                bytes_uploaded=stats.bytes_uploaded,
                entries_skipped_with_errors=stats.entries_skipped_with_errors,
                files_vanished=stats.files_vanished,
            )
        except (BackupCancelled, KeyboardInterrupt):
            log.warning("backup_interrupted", fs_id=record.file_system_id, backup_id=record.backup_id)
            raise
        except LeaseLost as exc:  # stays CREATING (and keeps its snapshot): the next run resumes it
            log.error(
                "backup_not_committed", fs_id=record.file_system_id, backup_id=record.backup_id, error=exc.message
            )
            raise
        except Exception as exc:
            record = self._record_failure(store, record, exc)
            log.error(
                "backup_failed", fs_id=record.file_system_id, backup_id=record.backup_id, error=record.failure_message
            )
            raise
        finally:
            if changes is not None:
                changes.stop()  # (already stopped unless the backup failed before its walk ended)
            if snapshot is not None:
                # An interrupted backup keeps its snapshot, so the resumed run reads the same point in time.
                if record.lifecycle == Lifecycle.CREATING:
                    snapshot.close()
                elif record.lifecycle == Lifecycle.AVAILABLE:
                    snapshot.commit()
                else:
                    snapshot.release()
        return record

    def _shard_context(
        self, store: Store, fs: FileSystemConfig, record: BackupRecord, snapshot: Snapshot
    ) -> ShardContext | None:
        """What archive worker processes need to help with this backup; None when they cannot (see
        _config_for_workers; a ZFS snapshot is walked in one process)."""
        config = self._config_for_workers()
        if config is None or not snapshot.parallel_walk:
            return None
        return ShardContext(config, store.region, snapshot, fs.id, record.backup_id, fs.on_entry_error)

    def _config_for_workers(self) -> Config | None:
        """The config a worker process opens this engine's stores with; None when it cannot: a store opened
        by an injected opener (tests' in-memory regions) exists in this process only."""
        return self.config if self._open_objects is open_object_store else None

    # ---------------------------------------------------------------- describe
    def describe_backups(
        self,
        *,
        region: str | None = None,
        backup_ids: Sequence[str] = (),
        filters: dict[str, list[str]] | None = None,
        max_results: int | None = None,
        next_token: str | None = None,
        all_hosts: bool = False,
    ) -> BackupPage:
        """One page of backups, and the records that could not be read (DESIGN invariant 7).

        Only this host's backups unless ``all_hosts`` or a ``host`` filter asks for others
        (asking by backup id finds any host's backup).
        """
        store = self.store(region)
        for bid in backup_ids:
            validate_backup_id(bid)
        filters = filters or {}
        for name, values in filters.items():
            if name not in FILTER_NAMES:
                raise BadRequest(f"--filter {name}: unknown filter; use one of {', '.join(FILTER_NAMES)}")
            allowed = FILTER_VALUES.get(name)
            wrong = [v for v in values if allowed is not None and v not in allowed]
            if wrong:
                raise BadRequest(f"--filter {name}={wrong[0]}: unknown value; use one of {', '.join(sorted(allowed))}")
        unreadable: list[UnreadableRecord] = []
        if backup_ids:
            records = []
            for bid in backup_ids:
                try:
                    records.append(store.load_record(bid))
                except (IntegrityError, RecordFormatError) as exc:
                    unreadable.append(UnreadableRecord(bid, exc))
        else:
            records, unreadable = store.load_records_checked()
            if "lifecycle" not in filters:
                records = [r for r in records if r.lifecycle != Lifecycle.DELETED]
        if not all_hosts and not backup_ids and "host" not in filters:
            filters = {**filters, "host": [self.config.host_name]}
        selectors = {
            "host": lambda r: r.host_name,
            "file-system-id": lambda r: r.file_system_id,
            "backup-type": lambda r: r.backup_type.value,
            "lifecycle": lambda r: r.lifecycle.value,
        }
        for name, values in filters.items():
            records = [r for r in records if selectors[name](r) in values]
        start = 0
        if next_token:
            try:
                start = int(base64.urlsafe_b64decode(next_token.encode()).decode())
                if start < 1:
                    raise ValueError(start)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(f"--next-token {next_token!r} is not a token this command returned") from None
        if max_results is not None and max_results < 1:
            raise BadRequest("--max-results must be at least 1")
        end = len(records) if max_results is None else start + max_results
        token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(records) else None
        # Unreadable records are reported on the first page only, whatever the filters: nobody can
        # tell which file system they belong to, and a damaged backup must not go unnoticed.
        return BackupPage(records[start:end], token, unreadable if start == 0 else [])

    def get_backup(self, backup_id: str, region: str | None = None) -> BackupRecord:
        validate_backup_id(backup_id)
        return self.store(region).load_record(backup_id)

    # ------------------------------------------------------------------ delete
    def delete_backup(self, backup_id: str, *, region: str | None = None, collect: bool = True) -> BackupRecord:
        store = self.store(region)
        try:
            record = self.get_backup(backup_id, region)
        except IntegrityError as exc:
            record = self._tombstone(store, backup_id, exc)
            if collect:
                self._collect_after_delete(store.region)
            return record
        if record.lifecycle == Lifecycle.DELETED:
            raise BackupNotFound(f"backup {backup_id} is already deleted")
        if record.lifecycle in IN_PROGRESS and (
            self.locks.is_file_system_busy(record.file_system_id) or self.locks.is_copy_busy(backup_id)
        ):
            raise BackupInProgress(f"backup {backup_id} is still being created; wait for it to finish, then delete it")
        copies = self.copies_in_progress(backup_id, store.region)
        if copies:
            raise BackupBeingCopied(
                f"backup {backup_id} is being copied ({', '.join(f'{c.backup_id} to {c.region}' for c in copies)}); "
                "delete it once the copies are AVAILABLE"
            )
        record = record.with_changes(lifecycle=Lifecycle.DELETED)
        store.save_record(record)
        faults.point("record-deleted")
        log.info("backup_deleted", fs_id=record.file_system_id, backup_id=backup_id, region=store.region)
        if collect:
            self._collect_after_delete(store.region)
        return record

    def _collect_after_delete(self, region: str) -> None:
        """Free a deleted backup's data now if no other host is collecting; if one is, its next run will."""
        try:
            self.collect_garbage(region)
        except StoreBusy as exc:
            log.info("garbage_collection_deferred", region=region, reason=exc.message)

    def _tombstone(self, store: Store, backup_id: str, exc: IntegrityError) -> BackupRecord:
        """Replace a record that cannot be read with a DELETED one, so garbage collection can run again.

        Deleting is the one thing left to do with a damaged record: nothing can be
        restored from it, and while it stays unreadable collection keeps every pack.
        """
        record = BackupRecord(
            backup_id=backup_id,
            file_system_id="",
            region=store.region,
            backup_type=BackupType.USER_INITIATED,
            lifecycle=Lifecycle.DELETED,
            creation_time=self.clock(),
            failure_message=f"deleted while its record was unreadable: {exc.message}",
            completion_time=self.clock(),
        )
        store.save_record(record)
        log.warning("backup_record_replaced", backup_id=backup_id, region=store.region, error=exc.message)
        return record

    def own_records(self, region: str | None = None) -> list[BackupRecord]:
        """The readable records of ``region`` that this host made, oldest first.

        Several hosts may share a store and each may have an ``fs-home``: what a
        host schedules, resumes, retains and copies by rule is its own work only.
        """
        return [r for r in self.store(region).load_records() if r.host_name == self.config.host_name]

    # ------------------------------------------------------------------ copies
    def copies_in_progress(
        self, source_backup_id: str | None = None, source_region: str | None = None, *, own: bool = False
    ) -> list[BackupRecord]:
        """PENDING and COPYING copies in every region, oldest first (optionally of one source backup;
        with ``own``, only the copies this host requested)."""
        found = []
        for region in self.config.regions:
            for r in self.own_records(region) if own else self.store(region).load_records():
                if r.lifecycle not in (Lifecycle.PENDING, Lifecycle.COPYING) or r.source_backup_id is None:
                    continue
                if source_backup_id is None or (r.source_backup_id, r.source_region) == (
                    source_backup_id,
                    source_region,
                ):
                    found.append(r)
        return sorted(found, key=lambda r: (r.creation_time, r.backup_id))

    def request_copy(
        self,
        source_backup_id: str,
        *,
        destination_region: str,
        source_region: str | None = None,
        copy_tags: bool = False,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
    ) -> BackupRecord:
        """Record a copy as PENDING in the destination (durable: a restarted daemon finds it)."""
        source_region = self.config.region(source_region).name
        destination_region = self.config.region(destination_region).name
        source = self.get_backup(source_backup_id, source_region)
        if source.lifecycle != Lifecycle.AVAILABLE:
            raise SourceBackupUnavailable(
                f"backup {source_backup_id} in region {source_region} is {source.lifecycle.value}; only AVAILABLE "
                "backups can be copied"
            )
        merged = dict(source.tags) if copy_tags else {}
        merged.update(validate_tags(tags or {}, "--tag"))
        record = BackupRecord(
            backup_id=new_backup_id(),
            file_system_id=source.file_system_id,
            region=destination_region,
            backup_type=BackupType.USER_INITIATED,
            lifecycle=Lifecycle.PENDING,
            creation_time=self.clock(),
            name=source.name,
            tags=merged,
            source=source.source,
            snapshot=source.snapshot,
            size_in_bytes=source.size_in_bytes,
            source_backup_id=source.backup_id,
            source_region=source_region,
            properties=dict(properties or {}),
            host_name=self.config.host_name,
        )
        self.store(destination_region).save_record(record)
        log.info(
            "copy_pending",
            backup_id=record.backup_id,
            source_backup_id=source_backup_id,
            source_region=source_region,
            region=destination_region,
        )
        return record

    def run_copy(self, record: BackupRecord, *, cancel: threading.Event | None = None) -> BackupRecord:
        """Do a PENDING (or interrupted COPYING) copy; the caller holds a copy slot of its region."""
        started = time.monotonic()
        assert record.source_backup_id and record.source_region
        with (
            self.locks.copy_job(record.backup_id),
            self.locks.store(record.source_region, exclusive=False),
            self.locks.store(record.region, exclusive=False),
            self.store(record.region).writing(Operation.COPY, record.backup_id) as lease,
        ):
            destination = self.store(record.region)
            record = destination.load_record(record.backup_id)
            if record.lifecycle not in (Lifecycle.PENDING, Lifecycle.COPYING):
                return record  # done (or deleted) meanwhile
            try:
                source_record = self.get_backup(record.source_backup_id, record.source_region)
            except BackupNotFound as exc:  # deleted after the request: retrying cannot help
                self._copy_failed(destination, record, exc)
                raise
            record = record.with_changes(lifecycle=Lifecycle.COPYING)
            destination.save_record(record)
            log.info(
                "copy_started",
                backup_id=record.backup_id,
                region=record.region,
                source_backup_id=record.source_backup_id,
            )
            try:
                stats = Copier(self.store(record.source_region), destination, source_record, cancel=cancel).run()
            except (BackupCancelled, KeyboardInterrupt):
                log.warning("copy_interrupted", backup_id=record.backup_id, region=record.region)
                raise
            except Exception as exc:
                self._copy_failed(destination, record, exc)
                raise
            record = record.with_changes(
                lifecycle=Lifecycle.AVAILABLE,
                root_tree=source_record.root_tree,
                progress_percent=100,
                completion_time=self.clock(),
                stats=replace(
                    source_record.stats,
                    bytes_read=stats.bytes_copied,
                    bytes_uploaded=stats.bytes_uploaded,
                    bytes_new=stats.bytes_copied,
                    blobs_new=stats.blobs_copied,
                    duration_seconds=time.monotonic() - started,
                ),
            )
            try:
                lease.confirm()  # as for backups: a lapsed lease commits nothing
            except LeaseLost as exc:  # stays COPYING: resumed with a new lease
                log.error("copy_not_committed", backup_id=record.backup_id, region=record.region, error=exc.message)
                raise
            destination.save_record(record)
            log.info(
                "copy_available",
                backup_id=record.backup_id,
                region=record.region,
                bytes_uploaded=stats.bytes_uploaded,
                blobs_copied=stats.blobs_copied,
            )
            return record

    def _copy_failed(self, destination: Store, record: BackupRecord, exc: Exception) -> None:
        record = self._record_failure(destination, record, exc)
        log.error("copy_failed", backup_id=record.backup_id, region=record.region, error=record.failure_message)

    def copy_backup(
        self, source_backup_id: str, *, destination_region: str, cancel: threading.Event | None = None, **kwargs: object
    ) -> BackupRecord:
        """Request a copy and do it in this process, waiting for a slot of the destination region."""
        record = self.request_copy(source_backup_id, destination_region=destination_region, **kwargs)  # type: ignore[arg-type]
        with self.locks.copy_slot(record.region, self.config.copies.max_in_flight_per_region, cancel=cancel):
            return self.run_copy(record, cancel=cancel)

    def collect_garbage(
        self, region: str | None = None, *, grace_seconds: int | None = None, wait: bool = True
    ) -> GcResult:
        """Collect garbage in ``region``; ``wait=False`` raises StoreBusy when a backup, copy,
        restore or check of this host uses the store, instead of waiting for it."""
        store = self.store(region)
        gc = self.config.garbage_collection
        grace = gc.grace_period_seconds if grace_seconds is None else grace_seconds
        with self.locks.store(store.region, exclusive=True, wait=wait):
            return collect_garbage(
                store, grace_seconds=grace, deleted_records_retention_seconds=gc.deleted_records_retention_days * 86400
            )

    # ----------------------------------------------------------------- restore
    def restore_backup(
        self,
        backup_id: str,
        target: Path | None,
        *,
        target_dataset: str | None = None,
        encryption: zfs_encryption.TargetEncryption | None = None,
        paths: Sequence[str] = (),
        region: str | None = None,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """Restore into a new directory below ``target``, or into the new ZFS dataset ``target_dataset``
        (created with the recorded properties and, per ``encryption``, encrypted)."""
        encryption = encryption or zfs_encryption.TargetEncryption()
        encryption.check(target_dataset)
        if target_dataset is None:
            check_target(target)  # a symlink, missing or unusable --target fails before the store is read
        record = self.get_backup(backup_id, region)
        if record.lifecycle != Lifecycle.AVAILABLE:
            raise BackupRestoring(
                f"backup {backup_id} is {record.lifecycle.value}; only AVAILABLE backups can be restored"
            )
        # A new dataset is checked (its key too) before the index is read, and before anything is created.
        new_dataset = self._plan_dataset_target(record, target_dataset, encryption) if target_dataset else None
        store = self.store(region)
        if progress is not None:
            progress.total_bytes = record.size_in_bytes
        # Shared with backups and copies, exclusive to garbage collection on this host; a pack
        # moved by collection elsewhere is found again by Store.read_blob.
        with self.locks.store(store.region, exclusive=False):
            store.load_index(record_adopted=False)
            restorer = Restorer(
                store,
                record,
                target or Path("/"),
                list(paths),
                progress=progress,
                config_for_workers=self._config_for_workers(),
            )
            try:
                result = self._restore_to_dataset(restorer, record, *new_dataset) if new_dataset else restorer.run()
            except IntegrityError as exc:
                raise self._explain_restore_failure(store, record, exc) from None
        log.info("backup_restored", backup_id=backup_id, region=store.region, path=str(result.path), files=result.files)
        return result

    @staticmethod
    def _explain_restore_failure(store: Store, record: BackupRecord, exc: IntegrityError) -> IntegrityError:
        """Say so when the backup was deleted while it was being restored (its data may be collected)."""
        try:
            now = store.load_record(record.backup_id)
        except ZfsbackdError:
            return exc
        if now.lifecycle != Lifecycle.DELETED:
            return exc
        return IntegrityError(
            f"backup {record.backup_id} was deleted while it was being restored, and garbage collection "
            f"removed data the restore still needed: {exc.message}"
        )

    @staticmethod
    def _plan_dataset_target(
        record: BackupRecord, dataset: str, encryption: zfs_encryption.TargetEncryption
    ) -> tuple[str, dict[str, str], str | None]:
        """``dataset`` with the properties that encrypt it and a note (see ``target_properties``), once it
        is clear that it can be created."""
        try:
            encrypt, note = zfs_encryption.target_properties(record.snapshot, dataset, encryption)
            exists = zfs_lzc.lzc_exists(dataset.encode())
        except ZFSInitializationFailed as exc:  # no ZFS on this host (or its module is not loaded)
            raise RestoreError(f"--target-dataset {dataset}: {exc}; or restore with --target DIR") from exc
        if exists:
            raise RestoreError(
                f"--target-dataset {dataset} already exists; a backup restores to a new dataset: give a new name"
            )
        return dataset, encrypt, note

    @staticmethod
    def _restore_to_dataset(
        restorer: Restorer, record: BackupRecord, dataset: str, encryption: dict[str, str], note: str | None
    ) -> RestoreResult:
        """Create ``dataset`` (children too, for a recursive backup) with the recorded properties and the
        ``encryption`` properties, and restore into it (the FSx way: a backup restores to a new file system).
        ``note`` says how the new dataset is encrypted when that is not what was asked for explicitly."""
        props = {
            k[len(ZFS_PROPERTY_PREFIX) :]: v for k, v in record.properties.items() if k.startswith(ZFS_PROPERTY_PREFIX)
        }
        children = list(record.snapshot.get("Children") or [])
        # readonly is set once the data is in; the children inherit the new dataset's encryption
        create_props = {k: v for k, v in props.items() if k not in READ_ONLY_AFTER_RESTORE} | encryption
        try:
            mnt, child_mounts = zfs_snapshots.create_restore_target(dataset, create_props, children)
            result = restorer.run_into(mnt, child_mounts)
        except BaseException:
            if zfs_lzc.lzc_exists(dataset.encode()):
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
                failed = f"{dataset.rsplit('/', 1)[0]}/zfsbackd-failed-restore_{stamp}"
                zfs_command.rename(dataset, failed)
                log.error("restore_failed", backup_id=record.backup_id, dataset=failed)
            raise
        zfs_snapshots.finish_restore_target(dataset, props, children)
        result.encryption = zfs_encryption.describe_target(dataset, note)
        if note is not None:
            log.info("restore_target_inherits_encryption", backup_id=record.backup_id, dataset=dataset)
        return result

    # ------------------------------------------------------------------- check
    def check(self, *, region: str | None = None, read_data: bool = False) -> CheckResult:
        store = self.store(region)
        with self.locks.store(store.region, exclusive=False):
            return check_store(store, read_data=read_data)
