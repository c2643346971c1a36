"""Prometheus metrics: what an administrator alerts on (missed or failed backups, an unreachable store).

Counters and histograms are fed by the daemon as backups finish; gauges that
describe state (backups by lifecycle, last success, object-store counters,
store size) are computed at scrape time from the daemon's caches, so they are
never stale after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zfsbackd import __version__
from zfsbackd.objectstore.base import ObjectStoreMetrics
from zfsbackd.store.records import BackupRecord, Lifecycle


@dataclass
class StateSnapshot:
    """What the collector reads; replaced wholesale by the daemon (no partial updates seen)."""

    records: list[BackupRecord] = field(default_factory=list)
    store_metrics: dict[str, ObjectStoreMetrics] = field(default_factory=dict)
    store_sizes: dict[str, int] = field(default_factory=dict)
    store_reachable: dict[str, bool] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)  # fs id → backup id
    next_automatic: dict[str, float] = field(default_factory=dict)  # fs id → unix time
    copies_in_flight: dict[str, int] = field(default_factory=dict)
    copies_queued: dict[str, int] = field(default_factory=dict)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], StateSnapshot]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._state()
        backups = GaugeMetricFamily(
            "zfsbackd_backups",
            "Backups by file system, type and lifecycle",
            labels=["file_system_id", "type", "lifecycle"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        last_ok: dict[str, float] = {}
        last_skipped: dict[str, int] = {}  # entries the newest successful backup skipped, per file system
        for r in s.records:
            if r.lifecycle == Lifecycle.DELETED:
                continue
            key = (r.file_system_id, r.backup_type.value, r.lifecycle.value)
            counts[key] = counts.get(key, 0) + 1
            if r.lifecycle == Lifecycle.AVAILABLE and r.source_backup_id is None:
                done = (r.completion_time or r.creation_time).timestamp()
                if done >= last_ok.get(r.file_system_id, 0.0):
                    last_skipped[r.file_system_id] = r.stats.entries_skipped_with_errors
                last_ok[r.file_system_id] = max(last_ok.get(r.file_system_id, 0.0), done)
        for key, n in sorted(counts.items()):
            backups.add_metric(list(key), n)
        yield backups
        last = GaugeMetricFamily(
            "zfsbackd_last_successful_backup_timestamp_seconds",
            "Completion time of the newest AVAILABLE backup per file system",
            labels=["file_system_id"],
        )
        for fs_id, ts in sorted(last_ok.items()):
            last.add_metric([fs_id], ts)
        yield last
        # From the records, not a counter: it survives a daemon restart, and clears with the
        # next clean backup (what the ZfsbackdBackupSkippedEntries alert needs).
        skipped = GaugeMetricFamily(
            "zfsbackd_last_backup_entries_skipped",
            "Entries the newest AVAILABLE backup of the file system skipped because they could not be read",
            labels=["file_system_id"],
        )
        for fs_id, n in sorted(last_skipped.items()):
            skipped.add_metric([fs_id], n)
        yield skipped
        running = GaugeMetricFamily(
            "zfsbackd_backup_in_progress", "1 while a backup of the file system runs", labels=["file_system_id"]
        )
        for fs_id in sorted(set(s.next_automatic) | set(s.running)):
            running.add_metric([fs_id], 1 if fs_id in s.running else 0)
        yield running
        nxt = GaugeMetricFamily(
            "zfsbackd_next_automatic_backup_timestamp_seconds",
            "When the next daily automatic backup window opens",
            labels=["file_system_id"],
        )
        for fs_id, ts in sorted(s.next_automatic.items()):
            nxt.add_metric([fs_id], ts)
        yield nxt
        for name, doc, attr in (
            ("zfsbackd_object_store_requests_total", "Object-store requests by region and operation", "requests"),
            ("zfsbackd_object_store_errors_total", "Object-store requests that failed after retries", "errors"),
            ("zfsbackd_object_store_retries_total", "Object-store requests retried", "retries"),
        ):
            family = CounterMetricFamily(name, doc, labels=["region", "operation"])
            for region, m in sorted(s.store_metrics.items()):
                for op, n in sorted(getattr(m, attr).items()):
                    family.add_metric([region, op], n)
            yield family
        size = GaugeMetricFamily("zfsbackd_store_size_bytes", "Bytes of pack data in the store", labels=["region"])
        for region, n in sorted(s.store_sizes.items()):
            size.add_metric([region], n)
        yield size
        reach = GaugeMetricFamily("zfsbackd_store_reachable", "1 if the region's store answered", labels=["region"])
        for region, ok in sorted(s.store_reachable.items()):
            reach.add_metric([region], 1 if ok else 0)
        yield reach
        for name, doc, values in (
            ("zfsbackd_copies_in_flight", "Backup copies running per destination region", s.copies_in_flight),
            ("zfsbackd_copies_queued", "Backup copies PENDING per destination region", s.copies_queued),
        ):
            family = GaugeMetricFamily(name, doc, labels=["region"])
            for region, n in sorted(values.items()):
                family.add_metric([region], n)
            yield family


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
            "zfsbackd_bytes_uploaded_total", "Bytes written to the object store", ["file_system_id"], registry=r
        )
        self.bytes_deduplicated = Counter(
            "zfsbackd_bytes_deduplicated_total", "Bytes found already stored", ["file_system_id"], registry=r
        )
        self.files = Counter(
            "zfsbackd_files_processed_total", "Files in finished backups", ["file_system_id"], registry=r
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
        self.up.set(1)
        self._server: object | None = None

    def observe_backup(self, record: BackupRecord, outcome: str) -> None:
        labels = (record.file_system_id, record.backup_type.value)
        self.finished.labels(*labels, outcome).inc()
        # Created at 0 by any finished backup, so that a first skip shows as an increase.
        skipped = self.entries_skipped.labels(record.file_system_id)
        if outcome == "available":
            st = record.stats
            self.duration.labels(*labels).observe(st.duration_seconds)
            self.bytes_read.labels(record.file_system_id).inc(st.bytes_read)
            self.bytes_uploaded.labels(record.file_system_id).inc(st.bytes_uploaded)
            self.bytes_deduplicated.labels(record.file_system_id).inc(st.bytes_deduplicated)
            self.files.labels(record.file_system_id).inc(st.files)
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
