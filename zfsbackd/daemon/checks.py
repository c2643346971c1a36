"""The daemon's scheduled ``check`` of every region's store (``daemon.check_interval_days``).

Why the daemon and not a cron job writing a node-exporter textfile: the daemon
already serves the metrics, knows every region and holds the locks, so the
result reaches Prometheus with no extra moving part, and an overdue check is
seen (``zfsbackd_check_due_timestamp_seconds``) even when nothing runs it.

Each region's state (when the next check is due, when the last one ran and
what it found) is kept in ``state_dir/checks/<region>.json``, so a daemon
restarted more often than the interval still checks, and the metrics say the
same after a restart. Losing the file only means a check runs soon.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from zfsbackd.engine.engine import Engine

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CheckState:
    """One region's check schedule and last result (unix seconds)."""

    due: float
    last_run: float | None = None
    errors: int | None = None
    duration_seconds: float | None = None


class CheckScheduler:
    """Runs a due ``check`` of each region, one region at a time, on its own thread (never the tick's)."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._dir = state_dir / "checks"
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._states: dict[str, CheckState] = {}

    def states(self, regions: list[str], interval_days: int) -> dict[str, CheckState]:
        """The state of every configured region; a region seen for the first time is due now."""
        if not interval_days:
            return {}
        with self._lock:
            for region in regions:
                if region not in self._states:
                    self._states[region] = self._load(region) or self._save(region, CheckState(due=self._clock()))
            return {region: self._states[region] for region in regions}

    def start_due(self, engine_of: Callable[[], Engine], regions: list[str], interval_days: int) -> None:
        """Start checking the regions that are due, unless a check runs already."""
        now = self._clock()
        due = [r for r, s in self.states(regions, interval_days).items() if s.due <= now]
        if not due or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(
            target=self._run, args=(engine_of, due, interval_days), name="zfsbackd-check", daemon=True
        )
        self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for a running check to end; False if it still runs after ``timeout`` seconds."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self, engine_of: Callable[[], Engine], regions: list[str], interval_days: int) -> None:
        for region in regions:
            started = self._clock()
            log.info("check_started", region=region)
            try:
                result = engine_of().check(region=region)
            except Exception as exc:  # the store is unreachable, busy, gone: retry in an hour, not a day
                log.error("check_not_run", region=region, error=getattr(exc, "message", None) or repr(exc))
                with self._lock:
                    self._save(region, CheckState(**{**asdict(self._states[region]), "due": started + 3600}))
                continue
            finished = self._clock()
            state = CheckState(
                due=started + interval_days * 86400,
                last_run=finished,
                errors=len(result.errors),
                duration_seconds=finished - started,
            )
            with self._lock:
                self._save(region, state)
            if result.errors:
                log.error("check_failed", region=region, errors=result.errors[:20], error_count=len(result.errors))
            else:
                log.info("check_passed", region=region, backups=result.backups, packs=result.packs)

    def _path(self, region: str) -> Path:
        return self._dir / f"{region}.json"

    def _load(self, region: str) -> CheckState | None:
        try:
            return CheckState(**json.loads(self._path(region).read_text()))
        except (OSError, ValueError, TypeError):  # missing or damaged: a cache, rebuilt by the next check
            return None

    def _save(self, region: str, state: CheckState) -> CheckState:
        """Remember ``state`` (atomically on disk; the in-memory copy even if the disk refuses)."""
        self._states[region] = state
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path(region).with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(state)))
            os.replace(tmp, self._path(region))
        except OSError as exc:
            log.warning("check_state_not_saved", region=region, error=str(exc))
        return state
