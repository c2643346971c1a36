"""When automatic backups are due and which ones have expired — pure functions of time and records.

Kept free of threads and I/O so the daemon's real decisions can be driven by
a simulated clock (the 120-day retention test does exactly that).

Rules:

* A file system's *slot* is its ``daily_backup_start_time`` (UTC) each day.
  The most recent slot at or before now is satisfied by an AUTOMATIC backup
  created at or after it that is AVAILABLE or still in progress. Until then
  the backup is due: on time inside the window, *late* after it (the daemon
  was down or busy) — a missed day is made up once, never skipped silently.
* A FAILED attempt does not satisfy the slot; it is retried after
  ``RETRY_AFTER``, at most ``MAX_ATTEMPTS`` times per slot.
* Retention: AUTOMATIC backups older than ``automatic_backup_retention_days``
  expire. USER_INITIATED backups never do. Retention 0 turns automatic backups
  off and leaves existing ones alone (deleting them is a person's decision).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from zfsbackd.config import FileSystemConfig
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle

RETRY_AFTER = dt.timedelta(minutes=15)
MAX_ATTEMPTS = 3
_SATISFIES = frozenset({Lifecycle.AVAILABLE, Lifecycle.CREATING})


@dataclass(frozen=True)
class Due:
    file_system_id: str
    slot: dt.datetime
    late: bool  # the start window had passed
    first: bool  # the file system has never had an automatic backup


def slot_at_or_before(fs: FileSystemConfig, now: dt.datetime) -> dt.datetime:
    slot = dt.datetime.combine(now.date(), fs.daily_backup_start_time, tzinfo=dt.UTC)
    return slot if slot <= now else slot - dt.timedelta(days=1)


def next_slot(fs: FileSystemConfig, now: dt.datetime) -> dt.datetime:
    return slot_at_or_before(fs, now) + dt.timedelta(days=1)


def automatic_backup_due(fs: FileSystemConfig, records: Iterable[BackupRecord], now: dt.datetime) -> Due | None:
    """The automatic backup ``fs`` needs now, if any (``records``: this file system's backups)."""
    if fs.automatic_backup_retention_days == 0:
        return None
    slot = slot_at_or_before(fs, now)
    automatic = [r for r in records if r.backup_type == BackupType.AUTOMATIC]
    this_slot = [r for r in automatic if r.creation_time >= slot]
    if any(r.lifecycle in _SATISFIES for r in this_slot):
        return None
    failed = [r for r in this_slot if r.lifecycle == Lifecycle.FAILED]
    if len(failed) >= MAX_ATTEMPTS:
        return None
    if failed and now - max(r.creation_time for r in failed) < RETRY_AFTER:
        return None
    window = dt.timedelta(minutes=fs.daily_backup_window_minutes)
    return Due(fs.id, slot, late=now >= slot + window, first=not automatic)


def expired_backups(fs: FileSystemConfig, records: Iterable[BackupRecord], now: dt.datetime) -> list[BackupRecord]:
    """AUTOMATIC backups of ``fs`` past their retention (never user backups, never in-progress ones)."""
    days = fs.automatic_backup_retention_days
    if days == 0:
        return []
    cutoff = now - dt.timedelta(days=days)
    return [
        r
        for r in records
        if r.backup_type == BackupType.AUTOMATIC
        and r.lifecycle in (Lifecycle.AVAILABLE, Lifecycle.FAILED)
        and r.creation_time < cutoff
    ]
