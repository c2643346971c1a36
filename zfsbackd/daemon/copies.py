"""Backup copies in the daemon: at most N in flight per destination region, the rest PENDING in order.

Each destination region has a FIFO queue served by exactly
``copies.max_in_flight_per_region`` workers; every worker also takes one of the
region's slot lock files, so CLI processes copying at the same time count
against the same limit. The queue is rebuilt from the stores' PENDING and
COPYING records at start, so copies survive restarts and crashes, and on
every tick after that: a copy that stopped without an outcome (its destination
or source store did not answer, the process copying it from the CLI died)
stays PENDING/COPYING in its store and is tried again, with a growing pause,
until it ends AVAILABLE or FAILED. Nothing is left waiting for a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.engine.engine import Engine
from zfsbackd.engine.locks import SlotWaitCancelled
from zfsbackd.errors import ZfsbackdError
from zfsbackd.store.records import BackupRecord

log = structlog.get_logger(__name__)

RETRY_FIRST_SECONDS = 30.0
"""Pause before a copy that stopped without an outcome is tried again; doubled after each try."""
RETRY_MAX_SECONDS = 1800.0
ADOPT_EVERY_SECONDS = 30.0
"""How often the daemon looks for copies nothing works on (it reads every region's records)."""


class CopyScheduler:
    def __init__(
        self,
        engine_of: Callable[[], Engine],
        *,
        limit: int,
        on_finished: Callable[[BackupRecord, BaseException | None], None] | None = None,
    ) -> None:
        self._engine_of = engine_of
        self._limit = limit
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._queued: dict[str, set[str]] = {}
        self._running: dict[str, set[str]] = {}
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._on_finished = on_finished
        self._retry_at: dict[str, tuple[float, float]] = {}  # backup id → (monotonic time, pause)

    def enqueue(self, record: BackupRecord) -> None:
        """Queue a PENDING/COPYING copy record once (enqueueing the same copy twice is a no-op)."""
        with self._lock:
            if record.backup_id in self._known:
                return
            self._known.add(record.backup_id)
            region = record.region
            pool = self._pools.get(region)
            if pool is None:
                pool = self._pools[region] = ThreadPoolExecutor(
                    max_workers=self._limit, thread_name_prefix=f"zfsbackd-copy-{region}"
                )
            self._queued.setdefault(region, set()).add(record.backup_id)
        pool.submit(self._run, record)

    def adopt_unfinished(self, now: float | None = None) -> int:
        """Queue every own PENDING/COPYING copy that nothing works on, oldest first.

        Called at start and on every tick: skips copies queued or running
        here, copies a live process (a CLI ``copy-backup``) holds, and copies
        whose retry pause has not passed.
        """
        now = time.monotonic() if now is None else now
        engine = self._engine_of()
        with self._lock:
            skip = set(self._known) | {b for b, (at, _pause) in self._retry_at.items() if at > now}
        unfinished = engine.copies_in_progress(own=True)
        with self._lock:  # forget the pauses of copies that ended (FAILED, AVAILABLE or deleted)
            ids = {r.backup_id for r in unfinished}
            self._retry_at = {b: v for b, v in self._retry_at.items() if b in ids}
        orphans = [r for r in unfinished if r.backup_id not in skip and not engine.locks.is_copy_busy(r.backup_id)]
        for record in orphans:
            log.info("copy_resume_scheduled", backup_id=record.backup_id, region=record.region)
            self.enqueue(record)
        return len(orphans)

    def _run(self, record: BackupRecord) -> None:
        region, error = record.region, None
        try:
            engine = self._engine_of()
            with engine.locks.copy_slot(region, self._limit, cancel=self._cancel):
                self._move(region, record.backup_id)
                record = engine.run_copy(record, cancel=self._cancel)
        except (BackupCancelled, SlotWaitCancelled) as exc:
            error = exc  # stays PENDING/COPYING: the next start resumes it
        except ZfsbackdError as exc:
            error = exc
            self._note_retry(record, exc.message)
        except Exception as exc:  # a bug must not kill the worker; the record says FAILED
            log.exception("copy_crashed", backup_id=record.backup_id, region=region)
            error = exc
        else:
            with self._lock:
                self._retry_at.pop(record.backup_id, None)
        finally:
            with self._lock:
                self._queued.get(region, set()).discard(record.backup_id)
                self._running.get(region, set()).discard(record.backup_id)
                self._known.discard(record.backup_id)
            if self._on_finished is not None:
                self._on_finished(record, error)

    def _note_retry(self, record: BackupRecord, message: str) -> None:
        """After an error, pause this copy's next try. A copy that ended FAILED is not tried
        again (it is no longer PENDING/COPYING); one whose store did not answer, so that
        nothing recorded an outcome, is picked up by :meth:`adopt_unfinished` after the pause."""
        with self._lock:
            _at, pause = self._retry_at.get(record.backup_id, (0.0, RETRY_FIRST_SECONDS / 2))
            pause = min(pause * 2, RETRY_MAX_SECONDS)
            self._retry_at[record.backup_id] = (time.monotonic() + pause, pause)
        log.warning("copy_attempt_failed", backup_id=record.backup_id, region=record.region, error=message)

    def _move(self, region: str, backup_id: str) -> None:
        with self._lock:
            self._queued.get(region, set()).discard(backup_id)
            self._running.setdefault(region, set()).add(backup_id)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(in flight, queued) per destination region."""
        with self._lock:
            return (
                {r: len(ids) for r, ids in self._running.items()},
                {r: len(ids) for r, ids in self._queued.items()},
            )

    def stop(self) -> None:
        self._cancel.set()
        for pool in list(self._pools.values()):
            pool.shutdown(wait=True, cancel_futures=True)
