"""``zfsbackd daemon``: the long-running service systemd supervises.

It owns time (the daily schedule, retention), concurrency (a worker pool, one
backup per file system, garbage collection only when no backup runs) and the
outside world (control socket, Prometheus, sd_notify, signals). All backup
work is the engine's. State that must survive a restart lives in the store's
records: on start, backups left CREATING are resumed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from zfsbackd import __version__
from zfsbackd.config import Config, load_config
from zfsbackd.daemon.checks import CheckScheduler
from zfsbackd.daemon.control import Action, ControlServer, Kind, Param
from zfsbackd.daemon.copies import ADOPT_EVERY_SECONDS, CopyScheduler
from zfsbackd.daemon.jobs import BackupJob, JobRunner
from zfsbackd.daemon.metrics import DaemonMetrics, StateSnapshot
from zfsbackd.daemon.schedule import automatic_backup_due, expired_backups, next_slot
from zfsbackd.daemon.sdnotify import Notifier
from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.engine.locks import SlotWaitCancelled
from zfsbackd.errors import ConfigError, HostConflict, StoreBusy, ZfsbackdError
from zfsbackd.store.leases import HeldLease
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle, utc_now
from zfsbackd.validation import validate_tags

log = structlog.get_logger(__name__)
_Listener = TypeVar("_Listener")
_T = TypeVar("_T")

DEFAULT_TICK_SECONDS = 30.0
#: record property set on copies made by a `copy_to` rule that has `retention_days`
COPY_RETENTION_PROPERTY = "CopyRetentionDays"
STORE_SIZE_EVERY_SECONDS = 300.0
#: while stopping, how often to ask systemd for more time, and what the shutdown after the checkpoints needs
STOP_EXTEND_EVERY_SECONDS = 10.0
STOP_MARGIN_SECONDS = 30.0


def _listen(key: str, address: object, bind: Callable[[], _Listener]) -> _Listener:
    """Open a listener the config names. Failing to (address in use, no such directory) is a config
    problem the admin fixes at that key, not a bug: ConfigError (exit 2) instead of a traceback."""
    try:
        return bind()
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot listen on {address}: {exc.strerror or exc}; stop what uses it, or choose another "
            "address in the config"
        ) from None


class Daemon:
    def __init__(
        self,
        config_path: Path,
        *,
        clock: Callable[[], datetime] = utc_now,
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        notifier: Notifier | None = None,
        serve: bool = True,
    ) -> None:
        """``serve=False`` runs without socket and HTTP listener (simulations drive :meth:`tick`)."""
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.notifier = notifier or Notifier()
        self.serve = serve
        self.engine = Engine(self.config, clock=clock)
        self.runner = JobRunner(
            lambda: self.engine,
            max_parallel=self.config.daemon.max_parallel_backups,
            on_finished=self._job_finished,
            on_progress=self._job_progress,
        )
        self.copies = CopyScheduler(
            lambda: self.engine, limit=self.config.copies.max_in_flight_per_region, on_finished=self._copy_finished
        )
        self.state = StateSnapshot(file_systems=[fs.id for fs in self.config.file_systems])
        self.metrics = DaemonMetrics(lambda: self.state)
        self._declare_metrics()
        self.checks = CheckScheduler(self.config.state_dir)
        self.control: ControlServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self._gc_pending: set[str] = set()  # regions to garbage-collect once no backup runs
        self._store_size_at: float | None = None  # monotonic time of the last size scan; None: scan at once
        self._ready = False
        self._daemon_lease: HeldLease | None = None
        self._copies_adopted_at = time.monotonic()  # start() adopts them; then every ADOPT_EVERY_SECONDS
        self._gc_not_before: dict[str, float] = {}  # region → monotonic time its waiting candidates may be ready

    # ------------------------------------------------------------------ control
    def handlers(self) -> dict[str, Action]:
        """The control socket's actions and the parameters each accepts.

        The socket type-checks every request against these declarations before
        a handler runs (a wrong type is BadRequest, not a TypeError deep in the
        engine); handlers get every declared key, None when not given. What a
        value means (a backup id's format, a known region) the engine checks,
        with the same words as for the CLI's in-process path.
        """
        text, required, tags = Param(Kind.TEXT), Param(Kind.TEXT, required=True), Param(Kind.TEXT_MAP)
        return {
            "CreateBackup": Action(
                self._create_backup,
                {"FileSystemId": required, "Name": text, "Tags": tags, "ClientRequestToken": text},
            ),
            "DescribeBackups": Action(
                self._describe_backups,
                {
                    "Region": text,
                    "BackupIds": Param(Kind.TEXT_LIST),
                    "Filters": Param(Kind.TEXT_LIST_MAP),
                    "MaxResults": Param(Kind.INTEGER),
                    "NextToken": text,
                    "AllHosts": Param(Kind.BOOLEAN),
                },
            ),
            "DeleteBackup": Action(self._delete_backup, {"BackupId": required, "Region": text}),
            "CopyBackup": Action(
                self._copy_backup,
                {
                    "SourceBackupId": required,
                    "SourceRegion": text,
                    "DestinationRegion": required,
                    "CopyTags": Param(Kind.BOOLEAN),
                    "Tags": tags,
                },
            ),
            "Status": Action(lambda _params: {"Daemon": self.status()}),
        }

    def _create_backup(self, params: dict[str, Any]) -> dict[str, Any]:
        request = BackupRequest(
            file_system_id=params["FileSystemId"],
            name=params["Name"],
            tags=validate_tags(params["Tags"] or {}, "--tag"),
            client_request_token=params["ClientRequestToken"],
        )
        engine = self.engine
        engine.config.file_system(request.file_system_id)
        earlier = engine.find_earlier_request(request)
        if earlier is not None:
            return {"Backup": earlier.to_api()}
        job = self.runner.submit(request)
        return {"Backup": job.wait_started().to_api()}

    def _describe_backups(self, params: dict[str, Any]) -> dict[str, Any]:
        page = self.engine.describe_backups(
            region=params.get("Region"),
            backup_ids=params.get("BackupIds") or [],
            filters=params.get("Filters") or {},
            max_results=params.get("MaxResults"),
            next_token=params.get("NextToken"),
            all_hosts=bool(params.get("AllHosts")),
        )
        running = {j.record.backup_id: j for j in self.runner.running().values() if j.record}
        result = page.to_api()
        for api in result["Backups"]:
            job = running.get(api["BackupId"])
            if job is not None:
                api["ProgressPercent"] = job.progress.percent
        return result

    def _delete_backup(self, params: dict[str, Any]) -> dict[str, Any]:
        record = self.engine.delete_backup(params["BackupId"], region=params["Region"], collect=False)
        self._gc_pending.add(record.region)  # collected when no backup runs
        self._wake.set()
        return {"BackupId": record.backup_id, "Lifecycle": record.lifecycle.value}

    def _copy_backup(self, params: dict[str, Any]) -> dict[str, Any]:
        record = self.engine.request_copy(
            params["SourceBackupId"],
            destination_region=params["DestinationRegion"],
            source_region=params["SourceRegion"],
            copy_tags=bool(params["CopyTags"]),
            tags=params["Tags"] or {},
        )
        self.copies.enqueue(record)
        return {"Backup": record.to_api()}

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "Version": __version__,
            "Ready": self._ready,
            "Config": str(self.config_path),
            "Running": {fs: (j.record.backup_id if j.record else None) for fs, j in self.runner.running().items()},
            "NextAutomaticBackups": {
                fs.id: next_slot(fs, now).isoformat() if fs.automatic_backup_retention_days else None
                for fs in self.config.file_systems
            },
        }

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Serve metrics, open the home store (retrying until it answers), then the socket; resume backups.

        Metrics come first so that an unreachable store shows (zfsbackd_ready 0,
        zfsbackd_store_reachable 0) while the daemon waits for it.
        """
        daemon = self.config.daemon
        if self.serve:
            self.metrics_address = _listen(
                "daemon.metrics_listen", daemon.metrics_listen, lambda: self.metrics.serve(daemon.metrics_listen)
            )
        delay = 1.0
        while not self._stop.is_set():
            try:
                store = self.engine.store()
                store.objects.check_reachable()
                self.state.store_reachable[store.region] = True
                # One daemon per host id and per host name in the fleet (HostConflict is fatal).
                self._daemon_lease = store.leases.register_daemon()
                break
            except HostConflict:
                raise
            except ZfsbackdError as exc:
                self.state.store_reachable[self.config.home_region] = False
                log.error("store_unreachable", region=self.config.home_region, error=exc.message)
                self.notifier.status(f"waiting for region {self.config.home_region}: {exc.message}")
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
        if self._stop.is_set():
            return
        if self.serve:
            self.control = _listen(
                "daemon.control_socket",
                daemon.control_socket,
                lambda: ControlServer(daemon.control_socket, self.handlers(), group=daemon.control_group),
            )
            self.control.start()
        self._resume_interrupted()
        self.copies.adopt_unfinished()
        self._ready = True
        self.metrics.ready.set(1)
        self.notifier.ready(self._status_line())
        log.info(
            "daemon_ready",
            version=__version__,
            file_systems=len(self.config.file_systems),
            metrics=f"{self.metrics_address[0]}:{self.metrics_address[1]}" if self.metrics_address else None,
            control_socket=str(self.config.daemon.control_socket) if self.serve else None,
        )

    def _resume_interrupted(self) -> None:
        configured = {fs.id for fs in self.config.file_systems}
        for record in self.engine.own_records():
            if record.lifecycle != Lifecycle.CREATING or record.file_system_id not in configured:
                continue
            if self.engine.locks.is_file_system_busy(record.file_system_id):
                continue  # a CLI process is running it right now
            log.info("backup_resume_scheduled", fs_id=record.file_system_id, backup_id=record.backup_id)
            self._submit(
                BackupRequest(
                    record.file_system_id,
                    record.backup_type,
                    record.name,
                    dict(record.tags),
                    record.client_request_token,
                )
            )

    def _submit(self, request: BackupRequest) -> BackupJob | None:
        try:
            return self.runner.submit(request)
        except ZfsbackdError as exc:
            log.warning("backup_not_started", fs_id=request.file_system_id, error=exc.message)
            return None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
        for sig, action in ((signal.SIGTERM, self._stop), (signal.SIGINT, self._stop), (signal.SIGHUP, self._reload)):
            signal.signal(sig, lambda _s, _f, ev=action: (ev.set(), self._wake.set()))
        self.start()
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            try:
                self.tick()
            except Exception as exc:  # keep serving: the next tick may succeed (e.g. the store came back)
                log.error("tick_failed", error=exc.message if isinstance(exc, ZfsbackdError) else repr(exc))
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            timeout = min(self.tick_seconds, self.notifier.watchdog_interval or self.tick_seconds)
            self._wake.wait(timeout)
            self._wake.clear()
        return self.stop()

    def stop(self) -> int:
        self.notifier.stopping()
        log.info("daemon_stopping", running=list(self.runner.running()))
        if self.control is not None:
            self.control.stop()
        self.runner.cancel_all()
        bound = self.config.daemon.stop_timeout_seconds
        if not self._wait_checkpoints(bound):
            log.error("daemon_stop_timeout", seconds=bound, running=list(self.runner.running()))
        self.runner.shutdown()
        self.copies.stop()
        if self._daemon_lease is not None:
            self._daemon_lease.release()
        self.metrics.close()
        log.info("daemon_stopped")
        return 0

    def _wait_checkpoints(self, bound: float) -> bool:
        """Wait up to ``bound`` seconds for running backups to checkpoint, keeping systemd's stop timeout ahead.

        ``TimeoutStopSec=`` in the unit is fixed while ``daemon.stop_timeout_seconds``
        may be up to an hour: every ``STOP_EXTEND_EVERY_SECONDS`` the daemon asks
        for a little more time (``EXTEND_TIMEOUT_USEC``), never beyond its own
        bound plus the margin the rest of the shutdown needs. Short extensions
        rather than one long one: if this thread hangs, systemd kills us soon.
        """
        deadline = time.monotonic() + bound
        while True:
            remaining = deadline - time.monotonic()
            running = sorted(self.runner.running())
            self.notifier.extend_timeout(
                min(remaining, 3 * STOP_EXTEND_EVERY_SECONDS) + STOP_MARGIN_SECONDS,
                f"stopping: checkpointing {', '.join(running) or 'nothing'} ({max(0, remaining):.0f} s left)",
            )
            if self.runner.wait_idle(max(0.0, min(remaining, STOP_EXTEND_EVERY_SECONDS))):
                return True
            if time.monotonic() >= deadline:
                return False

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def reload(self) -> None:
        """Re-read the config (SIGHUP). A reload that fails, for any reason, never stops the daemon.

        A bad file is the expected failure (ConfigError, logged with every
        problem). Anything else is a bug in reading it, but it must not take
        down the backups the running configuration still schedules, so it is
        logged with its traceback and the old configuration keeps serving.
        """
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
            engine = Engine(config, clock=self.clock)
        except ZfsbackdError as exc:
            problems = exc.errors if isinstance(exc, ConfigError) else [exc.message]
            log.error("reload_rejected", config=str(self.config_path), code=exc.code, errors=problems)
            self.notifier.ready(f"reload rejected, old configuration kept: {len(problems)} problem(s)")
            return
        except Exception as exc:
            log.exception("reload_failed", config=str(self.config_path), error=f"{type(exc).__name__}: {exc}")
            self.notifier.ready(f"reload failed ({type(exc).__name__}), old configuration kept")
            return
        old = self.config
        for what, before, after in (
            ("daemon.control_socket", old.daemon.control_socket, config.daemon.control_socket),
            ("daemon.metrics_listen", old.daemon.metrics_listen, config.daemon.metrics_listen),
            ("daemon.max_parallel_backups", old.daemon.max_parallel_backups, config.daemon.max_parallel_backups),
        ):
            if before != after:
                log.warning("reload_needs_restart", key=what, running=str(before), configured=str(after))
        self.config = config
        self.engine = engine
        self._declare_metrics()
        log.info("config_reloaded", config=str(self.config_path), file_systems=[fs.id for fs in config.file_systems])
        self.notifier.ready(self._status_line())

    # -------------------------------------------------------------------- tick
    def tick(self) -> None:
        """One round of decisions, then the metrics' state, refreshed even when a decision failed.

        A store that stops answering makes the decisions fail (they read its
        records); the refresh must still run, or ``zfsbackd_store_reachable``
        would keep saying 1 and the alert would never see the outage.
        """
        now = self.clock()
        try:
            self._decide(now)
        finally:
            self._refresh_state(now)
            self.notifier.status(self._status_line())

    def _decide(self, now: datetime) -> None:
        """Start due automatic backups, apply retention, collect garbage, start a due check."""
        engine = self.engine
        records = engine.own_records()  # never another host's backups: their retention is theirs
        running = self.runner.running()
        for fs in self.config.file_systems:
            mine = [r for r in records if r.file_system_id == fs.id]
            job = running.get(fs.id)
            if job is None:
                due = automatic_backup_due(fs, mine, now)
                if due is not None:
                    self._start_automatic(due.file_system_id, due.slot, late=due.late, first=due.first)
            elif self._past_completion_window(fs.completion_window_minutes, job):
                log.warning(
                    "backup_completion_window_passed",
                    fs_id=fs.id,
                    minutes=fs.completion_window_minutes,
                    backup_id=job.record.backup_id if job.record else None,
                )
                job.cancel.set()  # it checkpoints; the next run resumes it
            for expired in expired_backups(fs, mine, now):
                self._expire(engine, expired, fs.automatic_backup_retention_days)
        self._expire_copies(engine, now)
        if time.monotonic() >= self._copies_adopted_at + ADOPT_EVERY_SECONDS:  # reads every region's records
            self._copies_adopted_at = time.monotonic()
            self.copies.adopt_unfinished()
        if self._gc_pending and not self.runner.running() and not self.copies.counts()[0]:
            for region in sorted(self._gc_pending):
                if time.monotonic() < self._gc_not_before.get(region, 0.0):
                    continue  # its candidates are not ready yet (two-phase collection, zfsbackd.store.gc)
                try:
                    result = engine.collect_garbage(region, wait=False)
                except StoreBusy as exc:
                    log.info("garbage_collection_deferred", region=region, reason=exc.message)
                    continue  # stays pending: the next tick tries again
                if result.retry_after_seconds is not None:  # stays pending until what it marked is deleted
                    self._gc_not_before[region] = time.monotonic() + result.retry_after_seconds
                    continue
                self._gc_pending.discard(region)
                self._gc_not_before.pop(region, None)
            self._store_size_at = None
        if days := self.config.daemon.check_interval_days:
            self.checks.start_due(lambda: self.engine, list(self.config.regions), days)

    def _expire(self, engine: Engine, record: BackupRecord, days: int) -> None:
        engine.delete_backup(record.backup_id, region=record.region, collect=False)
        self.metrics.retention_deletions.labels(record.file_system_id).inc()
        log.info(
            "backup_expired",
            fs_id=record.file_system_id,
            backup_id=record.backup_id,
            region=record.region,
            retention_days=days,
        )
        self._gc_pending.add(record.region)

    def _expire_copies(self, engine: Engine, now: datetime) -> None:
        """Copies made by a `copy_to` rule with `retention_days` are deleted once older than that."""
        for region in self.config.regions:
            if region == self.config.home_region:
                continue
            for r in engine.own_records(region):
                days = r.properties.get(COPY_RETENTION_PROPERTY)
                if days and r.lifecycle == Lifecycle.AVAILABLE and r.creation_time < now - timedelta(days=int(days)):
                    self._expire(engine, r, int(days))

    @staticmethod
    def _past_completion_window(minutes: int | None, job: BackupJob) -> bool:
        if not minutes or job.cancel.is_set():
            return False
        return time.monotonic() - job.began > minutes * 60

    def _start_automatic(self, fs_id: str, slot: datetime, *, late: bool, first: bool) -> None:
        if late and not first:
            self.metrics.late_backups.labels(fs_id).inc()
        log.info("automatic_backup_starting", fs_id=fs_id, slot=slot.isoformat(), late=late and not first, first=first)
        self._submit(BackupRequest(fs_id, BackupType.AUTOMATIC))

    def _declare_metrics(self) -> None:
        """Counter series at 0 for the configured file systems and copy regions (see DaemonMetrics.declare)."""
        config = self.config
        self.metrics.declare(
            [fs.id for fs in config.file_systems], [r for r in config.regions if r != config.home_region]
        )

    def _refresh_state(self, now: datetime) -> None:
        """Rebuild what the metrics collector reads: one consistent snapshot, swapped in whole.

        Reads only stores that answered the probe just now; if one fails all
        the same, the previous value stays (the probe's log line says why).
        """
        home = self.config.home_region
        reachable = {region: self._probe(region) for region in self.config.regions}
        stores = self.engine.open_stores()
        live = {region: store for region, store in stores.items() if reachable.get(region)}
        records = self._quietly(self.engine.own_records, self.state.records) if live.get(home) else self.state.records
        sizes = dict(self.state.store_sizes)
        if self._store_size_at is None or time.monotonic() - self._store_size_at > STORE_SIZE_EVERY_SECONDS:
            self._store_size_at = time.monotonic()
            for region, store in live.items():
                sizes[region] = self._quietly(
                    lambda s=store: sum(info.size for info in s.objects.list("data/")), sizes.get(region, 0)
                )
        running = self.runner.running()
        destinations = dict.fromkeys((r for r in self.config.regions if r != home), 0)
        in_flight, queued = self.copies.counts()
        oldest_queued = {}
        for region in live:
            if region != home:
                pending = self._quietly(
                    lambda region=region: [
                        r.creation_time.timestamp()
                        for r in self.engine.own_records(region)
                        if r.lifecycle == Lifecycle.PENDING
                    ],
                    [],
                )
                if pending:
                    oldest_queued[region] = min(pending)
        self.state = StateSnapshot(
            records=records,
            file_systems=[fs.id for fs in self.config.file_systems],
            store_metrics={region: s.objects.metrics for region, s in stores.items()},
            store_sizes=sizes,
            store_reachable=reachable,
            running={fs: j.record.backup_id for fs, j in running.items() if j.record},
            backup_started={fs: j.began_at for fs, j in running.items()},
            completion_windows={
                fs.id: fs.completion_window_minutes * 60.0
                for fs in self.config.file_systems
                if fs.completion_window_minutes
            },
            copies_in_flight={**destinations, **in_flight},  # 0 for every destination: a panel, not a gap
            copies_queued={**destinations, **queued},
            oldest_queued_copy=oldest_queued,
            next_automatic={
                fs.id: next_slot(fs, now).timestamp()
                for fs in self.config.file_systems
                if fs.automatic_backup_retention_days
            },
            checks=self.checks.states(list(self.config.regions), self.config.daemon.check_interval_days),
        )

    @staticmethod
    def _quietly(read: Callable[[], _T], previous: _T) -> _T:
        """``read()``, or ``previous`` if the store fails meanwhile: metrics never stop the tick."""
        try:
            return read()
        except Exception as exc:
            log.info("metrics_read_failed", error=getattr(exc, "message", None) or repr(exc))
            return previous

    def _probe(self, region: str) -> bool:
        """Whether the region's store answers now: its ``config`` object is there and readable.

        Asked at every tick, so that ``zfsbackd_store_reachable`` turns 0 when a
        store goes away after start-up (an unmounted NAS, a dead endpoint,
        revoked credentials), not only while the daemon waits for it at start.
        """
        try:
            return self.engine.store(region).objects.head("config") is not None
        except Exception as exc:  # whatever the cause, the store did not answer; say why once per change
            if self.state.store_reachable.get(region, True):
                log.warning("store_unreachable", region=region, error=getattr(exc, "message", None) or repr(exc))
            return False

    def _status_line(self) -> str:
        running = self.runner.running()
        if not running:
            return f"idle; {len(self.config.file_systems)} file system(s) configured"
        return "backing up " + ", ".join(sorted(running))

    # ------------------------------------------------------------------ reports
    def _job_progress(self, job: BackupJob) -> None:
        self.metrics.observe_progress(job.request.file_system_id, job.progress.take_unreported())

    def _job_finished(self, job: BackupJob) -> None:
        self._job_progress(job)  # the last stretch, which on_update's throttle may have held back
        record = job.record
        if isinstance(job.error, BackupCancelled):
            log.info(
                "backup_checkpointed", fs_id=job.request.file_system_id, backup_id=record.backup_id if record else None
            )
        elif record is not None:
            if job.error is not None:
                record = record.with_changes(lifecycle=Lifecycle.FAILED)
            self.metrics.observe_backup(record, "available" if job.error is None else "failed")
            if job.error is None:
                self._copy_by_rules(record)
        self._wake.set()

    def _copy_by_rules(self, record: BackupRecord) -> None:
        """Start the automatic copies a file system's `copy_to` rules ask for."""
        try:
            fs = self.config.file_system(record.file_system_id)
        except ZfsbackdError:
            return  # removed from the config meanwhile
        for rule in fs.copy_to:
            props = {COPY_RETENTION_PROPERTY: str(rule.retention_days)} if rule.retention_days else {}
            try:
                copy = self.engine.request_copy(
                    record.backup_id, destination_region=rule.region, copy_tags=rule.copy_tags, properties=props
                )
            except ZfsbackdError as exc:
                log.error("copy_not_started", backup_id=record.backup_id, region=rule.region, error=exc.message)
                continue
            self.copies.enqueue(copy)

    def _copy_finished(self, record: BackupRecord, error: BaseException | None) -> None:
        outcome = (
            "interrupted"
            if isinstance(error, (BackupCancelled, SlotWaitCancelled))
            else ("failed" if error else "available")
        )
        self.metrics.copies_finished.labels(record.region, outcome).inc()
        self._wake.set()
