"""Backup records: the one mutable object kind in a store.

A record is written when a backup starts (``CREATING``) and rewritten as it
moves through its lifecycle; it is the only thing that makes data reachable,
so it is written ``AVAILABLE`` only after everything it points at is durable.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from zfsbackd.errors import EXIT_CONFLICT, IntegrityError, ZfsbackdError


class BackupType(StrEnum):
    AUTOMATIC = "AUTOMATIC"
    USER_INITIATED = "USER_INITIATED"


class Lifecycle(StrEnum):
    PENDING = "PENDING"
    CREATING = "CREATING"
    COPYING = "COPYING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    DELETED = "DELETED"


IN_PROGRESS = frozenset({Lifecycle.PENDING, Lifecycle.CREATING, Lifecycle.COPYING})
RECORD_PREFIX = "backups/"
#: The major format of backup records this code writes and reads. Within one major format a
#: reader ignores fields it does not know (and writes them back unchanged when it rewrites the
#: record), so a newer zfsbackd may add fields; a newer *major* format is refused, per record,
#: with :class:`RecordFormatError` (see zfsbackd/store/FORMAT.md, "backups/").
RECORD_FORMAT = 1


class RecordFormatError(ZfsbackdError):
    """A record written in a newer major format: readable only by a newer zfsbackd."""

    code = "UnsupportedRecordFormat"
    exit_code = EXIT_CONFLICT


def new_backup_id() -> str:
    return "backup-" + secrets.token_hex(9)[:17]


def record_key(backup_id: str) -> str:
    return RECORD_PREFIX + backup_id


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if ts else None


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass
class BackupStats:
    """What a backup did; the counters the tests and the metrics read."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    other: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    specials_skipped: int = 0
    files_changed_while_read: int = 0
    entries_not_examined: int = 0
    """Entries (files or whole directories) taken from the parent backup without even a stat,
    because the change list (``zfs diff``) said they did not change."""
    directories_listed_as_before: int = 0
    """Directories whose listing (names, and each entry's mode, inode, ctime, mtime and size) was the one
    their parent backup's tree was made from: their entries were taken all at once (the listing cache,
    zfsbackd.store.listingcache), not compared one by one. Absent from older records."""
    entries_skipped_with_errors: int = 0
    """Entries left out (a directory with its subtree) because they could not be read
    (EACCES, EIO, a path longer than PATH_MAX, …) under ``on_entry_error: skip``."""
    files_vanished: int = 0
    """Entries (files, directories, links) that went away between being listed and being
    read: a live tree changing under a reflink or copy snapshot, not an error."""
    skipped_entries: list[dict[str, str]] = field(default_factory=list)
    """The first skipped entries (``archiver.SKIPPED_ENTRIES_KEPT``), each ``{"path", "errno",
    "reason"}`` with the path relative to the file system's root. Absent from older records."""
    bytes_total: int = 0
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_uploaded: int = 0
    bytes_deduplicated: int = 0
    blobs_new: int = 0
    blobs_deduplicated: int = 0
    duration_seconds: float = 0.0

    def add(self, other: BackupStats, *, entries_kept: int) -> None:
        """Count in another process's share of the same backup (an archive worker's); of the skipped
        entries' details, the first *entries_kept* are kept in all."""
        for f in fields(self):
            value = getattr(other, f.name)
            if isinstance(value, list):
                mine = getattr(self, f.name)
                mine.extend(value[: max(0, entries_kept - len(mine))])
            else:
                setattr(self, f.name, getattr(self, f.name) + value)


@dataclass
class BackupRecord:
    backup_id: str
    file_system_id: str
    region: str
    backup_type: BackupType
    lifecycle: Lifecycle
    creation_time: datetime
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""
    parent_backup_id: str | None = None
    root_tree: str | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)
    stats: BackupStats = field(default_factory=BackupStats)
    progress_percent: int = 0
    size_in_bytes: int = 0
    failure_message: str | None = None
    completion_time: datetime | None = None
    source_backup_id: str | None = None
    source_region: str | None = None
    client_request_token: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    host_name: str = ""
    """The host whose zfsbackd made the backup (or requested the copy): several hosts may share one
    store, and file system ids are per host. Its retention and resumption concern only its own records."""
    #: fields of a newer minor version this reader does not know; written back as they were
    unknown_fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def with_changes(self, **changes: Any) -> BackupRecord:
        return replace(self, **changes)

    def to_json(self) -> bytes:
        data = asdict(self)
        unknown = data.pop("unknown_fields")
        data["creation_time"] = iso(self.creation_time)
        data["completion_time"] = iso(self.completion_time)
        data["format"] = RECORD_FORMAT
        return json.dumps({**unknown, **data}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, what: str = "backup record") -> BackupRecord:
        """Parse an authenticated record; ``what`` names it in errors.

        Raises :class:`RecordFormatError` for a newer major format and
        :class:`~zfsbackd.errors.IntegrityError` for a record that authenticated
        but does not make sense (a writer's bug): both are per-record errors
        that never stop the listing of the other records.
        """
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            version = data.pop("format", RECORD_FORMAT)
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError(f"format {version!r} is not a number")
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{what} is malformed ({exc})") from None
        if version > RECORD_FORMAT:
            raise RecordFormatError(
                f"{what} has record format {version}; this zfsbackd reads format {RECORD_FORMAT} and older. "
                "It was written by a newer zfsbackd: upgrade zfsbackd on this host to read it"
            )
        known = {f.name for f in fields(cls)} - {"unknown_fields"}
        unknown = {k: v for k, v in data.items() if k not in known}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["backup_type"] = BackupType(values["backup_type"])
            values["lifecycle"] = Lifecycle(values["lifecycle"])
            values["creation_time"] = parse_iso(values["creation_time"])
            values["completion_time"] = parse_iso(values.get("completion_time"))
            stats = values.get("stats") or {}
            stat_names = {f.name for f in fields(BackupStats)}
            values["stats"] = BackupStats(**{k: v for k, v in stats.items() if k in stat_names})
            record = cls(**values, unknown_fields=unknown)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{what} is malformed ({type(exc).__name__}: {exc})") from None
        if record.creation_time is None:
            raise IntegrityError(f"{what} is malformed (no creation_time)")
        return record

    def to_api(self) -> dict[str, Any]:
        """The FSx-shaped object printed by the CLI (see DESIGN.md, "Command line")."""
        out: dict[str, Any] = {
            "BackupId": self.backup_id,
            "Name": self.name,
            "Lifecycle": self.lifecycle.value,
            "Type": self.backup_type.value,
            "CreationTime": iso(self.creation_time),
            "FileSystemId": self.file_system_id,
            "HostName": self.host_name,
            "Region": self.region,
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(self.tags.items())],
            "ProgressPercent": self.progress_percent,
            "SizeInBytes": self.size_in_bytes,
            "Snapshot": self.snapshot,
            "Stats": {
                "Files": self.stats.files,
                "FilesRead": self.stats.files_read,
                "FilesUnchanged": self.stats.files_unchanged,
                "DirectoriesListedAsBefore": self.stats.directories_listed_as_before,
                "BytesRead": self.stats.bytes_read,
                "BytesUploaded": self.stats.bytes_uploaded,
                "BytesDeduplicated": self.stats.bytes_deduplicated,
                "SpecialFilesSkipped": self.stats.specials_skipped,
                "EntriesSkippedWithErrors": self.stats.entries_skipped_with_errors,
                "FilesVanished": self.stats.files_vanished,
                "DurationSeconds": round(self.stats.duration_seconds, 3),
                **(
                    {
                        "SkippedEntries": [
                            {"Path": e.get("path"), "Errno": e.get("errno"), "Reason": e.get("reason")}
                            for e in self.stats.skipped_entries
                        ]
                    }
                    if self.stats.skipped_entries
                    else {}
                ),
            },
        }
        if self.parent_backup_id:
            out["ParentBackupId"] = self.parent_backup_id
        if self.completion_time:
            out["CompletionTime"] = iso(self.completion_time)
        if self.source_backup_id:
            out["SourceBackupId"] = self.source_backup_id
            out["SourceBackupRegion"] = self.source_region
        if self.failure_message:
            out["FailureDetails"] = {"Message": self.failure_message}
        return out
