"""Prometheus metrics: what an administrator alerts on (missed or failed backups, an unreachable store).

Counters and histograms are fed by the daemon as backups run and finish;
gauges that describe state (backups by lifecycle, last success and failure,
object-store counters, store size, checks) are computed at scrape time from
the daemon's caches, so they are never stale after a restart.

Every labelled counter is created at 0 for each configured file system, type,
outcome and region when the daemon starts and on each reload
(:meth:`DaemonMetrics.declare`): Prometheus's ``increase()`` needs a sample
before the first increment, or the first failure after a start is invisible.
Per-file-system gauges cover the configured file systems only, so that one
removed from the config (its backups stay) raises no alert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zfsbackd import __version__
from zfsbackd.daemon.checks import CheckState
from zfsbackd.engine.progress import Unreported
from zfsbackd.objectstore.base import ObjectStoreMetrics
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle

#: outcomes of zfsbackd_backups_finished_total and zfsbackd_copies_finished_total
BACKUP_OUTCOMES = ("available", "failed")
COPY_OUTCOMES = ("available", "failed", "interrupted")


@dataclass
class StateSnapshot:
    """What the collector reads; replaced wholesale by the daemon (no partial updates seen)."""

    records: list[BackupRecord] = field(default_factory=list)
    file_systems: list[str] = field(default_factory=list)  # configured ids: the per-file-system gauges cover these
    store_metrics: dict[str, ObjectStoreMetrics] = field(default_factory=dict)
    store_sizes: dict[str, int] = field(default_factory=dict)
    store_reachable: dict[str, bool] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)  # fs id → backup id
    next_automatic: dict[str, float] = field(default_factory=dict)  # fs id → unix time
    copies_in_flight: dict[str, int] = field(default_factory=dict)
    copies_queued: dict[str, int] = field(default_factory=dict)
    oldest_queued_copy: dict[str, float] = field(default_factory=dict)  # region → creation of oldest PENDING copy
    backup_started: dict[str, float] = field(default_factory=dict)  # fs id → unix time its running backup started
    completion_windows: dict[str, float] = field(default_factory=dict)  # fs id → completion window in seconds
    checks: dict[str, CheckState] = field(default_factory=dict)  # region → scheduled check


def _gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    """A gauge with one label, one sample per key (sorted: stable output)."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], StateSnapshot]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._state()
        yield from self._backups(s)
        fs_ids = set(s.file_systems)
        yield _gauge(
            "zfsbackd_backup_in_progress",
            "1 while a backup of the file system runs; one series per configured file system",
            "file_system_id",
            {fs_id: 1 if fs_id in s.running else 0 for fs_id in fs_ids | set(s.running)},
        )
        yield _gauge(
            "zfsbackd_backup_started_timestamp_seconds",
            "When the running backup of the file system started (this run: a resumed backup counts from its resume)",
            "file_system_id",
            s.backup_started,
        )
        yield _gauge(
            "zfsbackd_backup_completion_window_seconds",
            "completion_window_minutes of the file system, in seconds (only where set)",
            "file_system_id",
            s.completion_windows,
        )
        yield _gauge(
            "zfsbackd_next_automatic_backup_timestamp_seconds",
            "When the next daily automatic backup window opens (file systems with automatic backups only)",
            "file_system_id",
            s.next_automatic,
        )
        yield from self._stores(s)
        for name, doc, values in (
            ("zfsbackd_copies_in_flight", "Backup copies running per destination region", s.copies_in_flight),
            ("zfsbackd_copies_queued", "Backup copies PENDING per destination region", s.copies_queued),
            (
                "zfsbackd_oldest_queued_copy_timestamp_seconds",
                "Creation time of the oldest copy still PENDING, per destination region",
                s.oldest_queued_copy,
            ),
        ):
            yield _gauge(name, doc, "region", values)
        yield from self._checks(s)

    @staticmethod
    def _backups(s: StateSnapshot) -> Iterator[GaugeMetricFamily]:
        """Backups by lifecycle, and the newest success and failure of each configured file system."""
        backups = GaugeMetricFamily(
            "zfsbackd_backups",
            "Backups by file system, type and lifecycle",
            labels=["file_system_id", "type", "lifecycle"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        last_ok: dict[str, float] = {}
        last_failed: dict[str, float] = {}
        last_skipped: dict[str, int] = {}  # entries the newest successful backup skipped, per file system
        configured = set(s.file_systems)
        for r in s.records:
            if r.lifecycle == Lifecycle.DELETED:
                continue
            key = (r.file_system_id, r.backup_type.value, r.lifecycle.value)
            counts[key] = counts.get(key, 0) + 1
            if r.source_backup_id is not None or r.file_system_id not in configured:
                continue
            done = (r.completion_time or r.creation_time).timestamp()
            if r.lifecycle == Lifecycle.AVAILABLE:
                if done >= last_ok.get(r.file_system_id, 0.0):
                    last_skipped[r.file_system_id] = r.stats.entries_skipped_with_errors
                last_ok[r.file_system_id] = max(last_ok.get(r.file_system_id, 0.0), done)
            elif r.lifecycle == Lifecycle.FAILED:
                last_failed[r.file_system_id] = max(last_failed.get(r.file_system_id, 0.0), done)
        for key, n in sorted(counts.items()):
            backups.add_metric(list(key), n)
        yield backups
        yield _gauge(
            "zfsbackd_last_successful_backup_timestamp_seconds",
            "Completion time of the newest AVAILABLE backup per configured file system (absent: none yet)",
            "file_system_id",
            last_ok,
        )
        yield _gauge(
            "zfsbackd_last_failed_backup_timestamp_seconds",
            "Time the newest FAILED backup per configured file system failed (absent: none)",
            "file_system_id",
            last_failed,
        )
        # From the records, not a counter: it survives a daemon restart, and clears with the
        # next clean backup (what the ZfsbackdBackupSkippedEntries alert needs).
        yield _gauge(
            "zfsbackd_last_backup_entries_skipped",
            "Entries the newest AVAILABLE backup of the file system skipped because they could not be read",
            "file_system_id",
            last_skipped,
        )

    @staticmethod
    def _stores(s: StateSnapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        for name, doc, attr in (
            ("zfsbackd_object_store_requests_total", "Object-store requests by region and operation", "requests"),
            ("zfsbackd_object_store_errors_total", "Object-store requests that failed after retries", "errors"),
            ("zfsbackd_object_store_retries_total", "Object-store requests retried", "retries"),
        ):
            family = CounterMetricFamily(name, doc, labels=["region", "operation"])
            for region, m in sorted(s.store_metrics.items()):
                counts = getattr(m, attr)
                # Errors and retries at 0 for every operation made, so that rate() sees the first one.
                for op in sorted(set(m.requests) | set(counts)):
                    family.add_metric([region, op], counts.get(op, 0))
            yield family
        for name, doc, attr in (
            (
                "zfsbackd_object_store_written_bytes",
                "Bytes written to the object store, as it happens",
                "bytes_written",
            ),
            ("zfsbackd_object_store_read_bytes", "Bytes read from the object store", "bytes_read"),
        ):
            family = CounterMetricFamily(name, doc, labels=["region"])
            for region, m in sorted(s.store_metrics.items()):
                family.add_metric([region], getattr(m, attr))
            yield family
        yield _gauge("zfsbackd_store_size_bytes", "Bytes of pack data in the store", "region", s.store_sizes)
        yield _gauge(
            "zfsbackd_store_reachable",
            "1 if the region's store answered the last probe, 0 if not; one series per configured region",
            "region",
            {region: 1 if ok else 0 for region, ok in s.store_reachable.items()},
        )

    @staticmethod
    def _checks(s: StateSnapshot) -> Iterator[GaugeMetricFamily]:
        yield _gauge(
            "zfsbackd_check_due_timestamp_seconds",
            "When the next scheduled check of the region's store is due (daemon.check_interval_days)",
            "region",
            {region: c.due for region, c in s.checks.items()},
        )
        ran = {region: c for region, c in s.checks.items() if c.last_run is not None}
        for name, doc, attr in (
            ("zfsbackd_check_last_run_timestamp_seconds", "When the last scheduled check ended", "last_run"),
            ("zfsbackd_check_errors", "Errors the last scheduled check found in the store (0: clean)", "errors"),
            ("zfsbackd_check_duration_seconds", "Wall time of the last scheduled check", "duration_seconds"),
        ):
            yield _gauge(name, doc, "region", {region: getattr(c, attr) or 0 for region, c in ran.items()})


class DaemonMetrics:
    def __init__(self, state: Callable[[], StateSnapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("zfsbackd_build", "zfsbackd version", registry=r).info({"version": __version__})
        self.up = Gauge("zfsbackd_up", "1 while the daemon runs", registry=r)
        self.ready = Gauge("zfsbackd_ready", "1 once the config is loaded and the home store answers", registry=r)
        labels = ["file_system_id", "type"]
        self.duration = Histogram(
            "zfsbackd_backup_duration_seconds",
            "Wall time of finished backups",
            labels,
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
            registry=r,
        )
        self.finished = Counter(
            "zfsbackd_backups_finished_total", "Backups that ended, by outcome", [*labels, "outcome"], registry=r
        )
        self.bytes_read = Counter("zfsbackd_bytes_read_total", "File bytes read", ["file_system_id"], registry=r)
        self.bytes_uploaded = Counter(
            "zfsbackd_bytes_uploaded_total", "Bytes written to the object store by backups, as each pack lands",
            ["file_system_id"], registry=r,
        )
        self.bytes_deduplicated = Counter(
            "zfsbackd_bytes_deduplicated_total", "Bytes found already stored", ["file_system_id"], registry=r
        )
        self.files = Counter(
            "zfsbackd_files_processed_total",
            "Files walked by backups (read, or found unchanged), counted while the backup runs",
            ["file_system_id"],
            registry=r,
        )
        self.bytes_processed = Counter(
            "zfsbackd_bytes_processed_total",
            "File bytes walked by backups (read, or found unchanged), counted while the backup runs",
            ["file_system_id"],
            registry=r,
        )
        self.entries_skipped = Counter(
            "zfsbackd_entries_skipped_total",
            "Entries left out of finished backups because they could not be read (on_entry_error: skip)",
            ["file_system_id"],
            registry=r,
        )
        self.retention_deletions = Counter(
            "zfsbackd_retention_deletions_total",
            "Automatic backups deleted by retention",
            ["file_system_id"],
            registry=r,
        )
        self.late_backups = Counter(
            "zfsbackd_late_backups_total",
            "Automatic backups started after their window",
            ["file_system_id"],
            registry=r,
        )
        self.copies_finished = Counter(
            "zfsbackd_copies_finished_total", "Backup copies that ended, by outcome", ["region", "outcome"], registry=r
        )
        r.register(_StateCollector(state))
        # process_resident_memory_bytes, process_start_time_seconds, …: read from /proc at each scrape.
        ProcessCollector(registry=r)
        self.up.set(1)
        self._server: object | None = None

    def declare(self, file_systems: list[str], copy_regions: list[str]) -> None:
        """Create every counter series of the configured file systems and copy destinations at 0.

        Called at start and on each reload. A series that appears only with its
        first increment has no earlier sample, so ``increase()`` and ``rate()``
        cannot see that increment: the first failed backup after a start would
        raise no alert. A removed file system's series stay until the restart.
        """
        for fs_id in file_systems:
            for counter in (
                self.bytes_read,
                self.bytes_uploaded,
                self.bytes_deduplicated,
                self.files,
                self.bytes_processed,
                self.entries_skipped,
                self.retention_deletions,
                self.late_backups,
            ):
                counter.labels(fs_id)
            for backup_type in BackupType:
                self.duration.labels(fs_id, backup_type.value)
                for outcome in BACKUP_OUTCOMES:
                    self.finished.labels(fs_id, backup_type.value, outcome)
        for region in copy_regions:
            for outcome in COPY_OUTCOMES:
                self.copies_finished.labels(region, outcome)

    def observe_progress(self, fs_id: str, progress: Unreported) -> None:
        """Files and bytes a running backup walked and uploaded since its last report (throughput while
        it runs; uploads count also for a backup that then fails or is interrupted: they were made)."""
        self.files.labels(fs_id).inc(progress.files)
        self.bytes_processed.labels(fs_id).inc(progress.nbytes)
        self.bytes_uploaded.labels(fs_id).inc(progress.uploaded)

    def observe_backup(self, record: BackupRecord, outcome: str) -> None:
        """A backup ended: its outcome, and for a success the statistics known only at the end.

        Files and bytes walked and uploaded were counted while it ran (:meth:`observe_progress`).
        """
        labels = (record.file_system_id, record.backup_type.value)
        self.finished.labels(*labels, outcome).inc()
        # Created at 0 by any finished backup, so that a first skip shows as an increase.
        skipped = self.entries_skipped.labels(record.file_system_id)
        if outcome == "available":
            st = record.stats
            self.duration.labels(*labels).observe(st.duration_seconds)
            self.bytes_read.labels(record.file_system_id).inc(st.bytes_read)
            self.bytes_deduplicated.labels(record.file_system_id).inc(st.bytes_deduplicated)
            skipped.inc(st.entries_skipped_with_errors)

    def serve(self, listen: str) -> tuple[str, int]:
        """Start the HTTP listener; returns the bound (host, port) (port 0 picks a free one)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server = server
        return host, server.server_port

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None
