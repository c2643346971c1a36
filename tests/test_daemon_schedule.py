"""The scheduler and retention, driven through the daemon's real tick() by a simulated clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from enginekit import write_config
from fsfixtures import tree_manifest

from zfsbackd.config import FileSystemConfig
from zfsbackd.daemon.schedule import MAX_ATTEMPTS, automatic_backup_due, expired_backups
from zfsbackd.daemon.service import Daemon
from zfsbackd.engine.engine import BackupRequest
from zfsbackd.logs import configure_logging
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def _fs(**kwargs: object) -> FileSystemConfig:
    return FileSystemConfig(id="fs-a", source_path=Path("/srv/a"), source_zfs=None, **kwargs)  # type: ignore[arg-type]


def _record(
    created: dt.datetime, lifecycle: Lifecycle = Lifecycle.AVAILABLE, kind: BackupType = BackupType.AUTOMATIC
) -> BackupRecord:
    return BackupRecord("backup-0123456789abcdef0", "fs-a", "local", kind, lifecycle, created)


def test_due_on_time_late_and_satisfied() -> None:
    fs = _fs(daily_backup_start_time=dt.time(2, 30), daily_backup_window_minutes=30)
    at = dt.datetime(2026, 3, 5, 2, 40, tzinfo=dt.UTC)
    due = automatic_backup_due(fs, [_record(at - dt.timedelta(days=1))], at)
    assert due is not None and not due.late and not due.first
    assert due.slot == dt.datetime(2026, 3, 5, 2, 30, tzinfo=dt.UTC)
    late = automatic_backup_due(fs, [_record(at - dt.timedelta(days=1))], at + dt.timedelta(hours=5))
    assert late is not None and late.late
    assert automatic_backup_due(fs, [_record(at)], at + dt.timedelta(hours=5)) is None
    before_slot = dt.datetime(2026, 3, 5, 1, 0, tzinfo=dt.UTC)  # yesterday's slot is the one that counts
    assert automatic_backup_due(fs, [_record(before_slot - dt.timedelta(hours=20))], before_slot) is None
    assert automatic_backup_due(fs, [_record(at, kind=BackupType.USER_INITIATED)], at) is not None
    assert automatic_backup_due(_fs(automatic_backup_retention_days=0), [], at) is None


def test_failed_attempts_are_retried_a_bounded_number_of_times() -> None:
    fs = _fs(daily_backup_start_time=dt.time(2, 30))
    at = dt.datetime(2026, 3, 5, 2, 31, tzinfo=dt.UTC)
    failed = [_record(at, Lifecycle.FAILED)]
    assert automatic_backup_due(fs, failed, at + dt.timedelta(minutes=5)) is None  # backing off
    assert automatic_backup_due(fs, failed, at + dt.timedelta(minutes=20)) is not None
    many = [_record(at + dt.timedelta(minutes=20 * i), Lifecycle.FAILED) for i in range(MAX_ATTEMPTS)]
    assert automatic_backup_due(fs, many, at + dt.timedelta(hours=3)) is None


def test_retention_expires_only_old_automatic_backups() -> None:
    fs = _fs(automatic_backup_retention_days=3)
    now = dt.datetime(2026, 3, 10, tzinfo=dt.UTC)
    old_auto = _record(now - dt.timedelta(days=4))
    old_user = _record(now - dt.timedelta(days=40), kind=BackupType.USER_INITIATED)
    old_creating = _record(now - dt.timedelta(days=5), Lifecycle.CREATING)
    young = _record(now - dt.timedelta(days=2))
    assert expired_backups(fs, [old_auto, old_user, old_creating, young], now) == [old_auto]
    assert expired_backups(_fs(automatic_backup_retention_days=0), [old_auto], now) == []


def test_120_days_of_daily_backups_keep_exactly_the_retained_ones(xfs_fs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sources = {}
    for name in ("week", "day", "off"):
        sources[name] = xfs_fs.mountpoint / f"sim-{name}-{tmp_path.name}"
        sources[name].mkdir()
        (sources[name] / "data.txt").write_text("day 0\n")
    retention = {"fs-week": 7, "fs-day": 1, "fs-off": 0}
    config = write_config(tmp_path, sources, extra_fs={"daily_backup_start_time": "02:30"})
    text = config.read_text()
    for fs_id, days in retention.items():  # per file system retention
        text = text.replace(f"id: {fs_id}\n", f"id: {fs_id}\n  automatic_backup_retention_days: {days}\n")
    config.write_text(text)
    clock = FakeClock(START)
    daemon = Daemon(config, clock=clock, serve=False)
    assert {fs.id: fs.automatic_backup_retention_days for fs in daemon.config.file_systems} == retention
    manifests: dict[str, dict] = {}
    user_backups: list[str] = []
    down_days = {50, 51, 52}  # the daemon is down: the window is missed

    def settle() -> None:
        daemon.tick()
        assert daemon.runner.wait_idle(120)
        daemon.tick()  # retention and garbage collection after the backups finished
        for r in daemon.engine.store().load_records():
            if r.lifecycle == Lifecycle.AVAILABLE and r.backup_id not in manifests:
                manifests[r.backup_id] = tree_manifest(sources[r.file_system_id.removeprefix("fs-")])

    for day in range(120):
        for source in sources.values():
            with (source / "data.txt").open("a") as f:
                f.write(f"day {day}\n")
        if day in down_days:
            continue
        slot = START + dt.timedelta(days=day, hours=2, minutes=30)
        clock.now = slot + (dt.timedelta(hours=8) if day == 53 else dt.timedelta(minutes=1))
        settle()
        if day in (3, 40, 100):
            user = daemon.engine.create_backup(BackupRequest("fs-week", BackupType.USER_INITIATED, name=f"day {day}"))
            user_backups.append(user.backup_id)
            manifests[user.backup_id] = tree_manifest(sources["week"])
        clock.now = slot + dt.timedelta(hours=12)
        settle()

        records = [r for r in daemon.engine.store().load_records() if r.lifecycle != Lifecycle.DELETED]
        assert not [r for r in records if r.lifecycle != Lifecycle.AVAILABLE], f"day {day}: unfinished backups"
        for fs_id, days in retention.items():
            automatic = sorted(
                r.creation_time for r in records if r.file_system_id == fs_id and r.backup_type == BackupType.AUTOMATIC
            )
            if days == 0:
                assert automatic == [], f"day {day}: {fs_id} has automatic backups although retention is 0"
                continue
            taken = [
                START
                + dt.timedelta(days=d, hours=2, minutes=30)
                + dt.timedelta(hours=8 if d == 53 else 0, minutes=0 if d == 53 else 1)
                for d in range(day + 1)
                if d not in down_days
            ]
            expected = [t for t in taken if t >= clock.now - dt.timedelta(days=days)]
            assert automatic == expected, f"day {day}: {fs_id} keeps {len(automatic)} automatic backups"
        assert sorted(r.backup_id for r in records if r.backup_type == BackupType.USER_INITIATED) == sorted(
            user_backups
        )

    assert daemon.metrics.late_backups.labels("fs-week")._value.get() == 1  # day 53, after the missed days
    remaining = [r for r in daemon.engine.store().load_records() if r.lifecycle == Lifecycle.AVAILABLE]
    assert len(remaining) == 7 + 1 + len(user_backups)
    target = tmp_path / "restores"
    target.mkdir()
    for r in remaining:
        restored = daemon.engine.restore_backup(r.backup_id, target).path
        assert tree_manifest(restored) == manifests[r.backup_id], f"{r.backup_id} ({r.file_system_id}) restores wrong"
    assert daemon.engine.check(read_data=True).errors == []
    daemon.runner.shutdown()


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Only errors from the 120-day simulation; other tests get structlog's defaults back."""
    configure_logging(level=40)
    yield
    structlog.reset_defaults()
