"""Backup jobs: the daemon's worker pool, one backup per file system, cancellable.

A request returns as soon as the backup's record exists (CREATING, as FSx
does) or fails fast (BackupInProgress, bad request); the backup itself goes
on in the pool. Cancelling (SIGTERM, completion window) makes the archiver
stop at its next checkpoint, flush what it read, and leave the record
CREATING for the next run to resume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import BackupInProgress, DaemonBusy, ZfsbackdError
from zfsbackd.store.records import BackupRecord, Lifecycle

log = structlog.get_logger(__name__)

#: how long a request waits for its backup's record to appear
START_TIMEOUT = 120.0
#: how long a new request waits for the previous backup of its file system to finish its cleanup
#: (release its store lease, commit its snapshot) once that backup's record says it ended
FINISHING_TIMEOUT = 60.0


@dataclass
class BackupJob:
    request: BackupRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    record: BackupRecord | None = None
    error: BaseException | None = None
    future: Future[BackupRecord] | None = None
    began: float = field(default_factory=time.monotonic)
    began_at: float = field(default_factory=time.time)  # the same instant on the wall clock, for the metrics
    progress: Progress = field(default_factory=Progress)

    def wait_started(self, timeout: float = START_TIMEOUT) -> BackupRecord:
        """The CREATING record, or the error that stopped the backup before it began."""
        self.started.wait(timeout)
        if self.record is None:
            if self.error is not None:
                raise self.error
            # Every worker is busy (daemon.max_parallel_backups): an ordinary state, not a bug.
            fs_id = self.request.file_system_id
            raise DaemonBusy(
                f"the backup of {fs_id} did not start within {timeout:.0f} s because every backup worker is busy "
                f"(daemon.max_parallel_backups); it stays queued and starts when one finishes — follow it with "
                f"`zfsbackd describe-backups --filter file-system-id={fs_id}`"
            )
        return self.record


class JobRunner:
    def __init__(
        self,
        engine_of: Callable[[], Engine],
        *,
        max_parallel: int,
        on_finished: Callable[[BackupJob], None] | None = None,
        on_progress: Callable[[BackupJob], None] | None = None,
    ) -> None:
        """``on_progress`` is called from the backup's thread as it advances (at most every half second)."""
        self._engine_of = engine_of
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="zfsbackd-job")
        self._lock = threading.Lock()
        self._running: dict[str, BackupJob] = {}
        self._on_finished = on_finished
        self._on_progress = on_progress

    def running(self) -> dict[str, BackupJob]:
        with self._lock:
            return dict(self._running)

    def submit(self, request: BackupRequest) -> BackupJob:
        """Start a backup of the request's file system, or return the running one it is a retry of.

        A retry (same client request token) may arrive before the running job has a
        record, e.g. while a restarted daemon resumes the backup the request's first
        attempt made: it gets that job, not BackupInProgress.
        """
        fs_id = request.file_system_id
        job = BackupJob(request)
        if self._on_progress is not None:
            report = self._on_progress
            job.progress.on_update = lambda _progress: report(job)
        deadline = time.monotonic() + FINISHING_TIMEOUT
        while True:
            with self._lock:
                current = self._running.get(fs_id)
                if current is None:
                    self._running[fs_id] = job
                    break
            token = request.client_request_token
            if token is not None and current.request.client_request_token == token:
                earlier = current.request
                request.check_retry_of(
                    earlier.file_system_id, earlier.name, earlier.backup_type, earlier.tags, f"a backup of {fs_id}"
                )
                return current
            # A backup whose record already says AVAILABLE (or FAILED) is only cleaning up: a client that
            # saw it end and asks for the next one waits for that instead of getting BackupInProgress.
            if not self._has_ended(current) or not current.done.wait(max(0.0, deadline - time.monotonic())):
                which = current.record.backup_id if current.record else "one"
                raise BackupInProgress(
                    f"a backup of {fs_id} ({which}) is already running; wait for it to finish "
                    f"(`zfsbackd describe-backups --filter file-system-id={fs_id}`)"
                )
        job.future = self._pool.submit(self._run, job)
        return job

    def _has_ended(self, job: BackupJob) -> bool:
        """Does the store say ``job``'s backup ended (it may still release its lease and snapshot)?"""
        if job.record is None:
            return False
        try:
            stored = self._engine_of().get_backup(job.record.backup_id, job.record.region)
        except ZfsbackdError:
            return False
        return stored.lifecycle in (Lifecycle.AVAILABLE, Lifecycle.FAILED)

    def _run(self, job: BackupJob) -> BackupRecord:
        def on_record(record: BackupRecord) -> None:
            job.record = record
            job.started.set()

        try:
            record = self._engine_of().create_backup(
                job.request, progress=job.progress, cancel=job.cancel, on_record=on_record
            )
            job.record = record
            return record
        except BaseException as exc:  # incl. BackupCancelled: the record stays CREATING
            job.error = exc
            raise
        finally:
            job.started.set()
            with self._lock:
                self._running.pop(job.request.file_system_id, None)
            job.done.set()
            if self._on_finished is not None:
                try:
                    self._on_finished(job)
                except Exception:  # reporting must never take the worker down
                    log.exception("job_report_failed", fs_id=job.request.file_system_id)

    def cancel_all(self) -> None:
        for job in self.running().values():
            job.cancel.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs; False if some still do after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
