"""Backup records: the one mutable object kind in a store.

A record is written when a backup starts (``CREATING``) and rewritten as it
moves through its lifecycle; it is the only thing that makes data reachable,
so it is written ``AVAILABLE`` only after everything it points at is durable.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


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
    bytes_total: int = 0
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_uploaded: int = 0
    bytes_deduplicated: int = 0
    blobs_new: int = 0
    blobs_deduplicated: int = 0
    duration_seconds: float = 0.0


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

    def with_changes(self, **changes: Any) -> BackupRecord:
        return replace(self, **changes)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["creation_time"] = iso(self.creation_time)
        data["completion_time"] = iso(self.completion_time)
        data["format"] = 1
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BackupRecord:
        data = json.loads(raw)
        data.pop("format", None)
        data["backup_type"] = BackupType(data["backup_type"])
        data["lifecycle"] = Lifecycle(data["lifecycle"])
        data["creation_time"] = parse_iso(data["creation_time"])
        data["completion_time"] = parse_iso(data.get("completion_time"))
        data["stats"] = BackupStats(**data.get("stats", {}))
        return cls(**data)

    def to_api(self) -> dict[str, Any]:
        """The FSx-shaped object printed by the CLI (see DESIGN.md, "Command line")."""
        out: dict[str, Any] = {
            "BackupId": self.backup_id,
            "Name": self.name,
            "Lifecycle": self.lifecycle.value,
            "Type": self.backup_type.value,
            "CreationTime": iso(self.creation_time),
            "FileSystemId": self.file_system_id,
            "Region": self.region,
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(self.tags.items())],
            "ProgressPercent": self.progress_percent,
            "SizeInBytes": self.size_in_bytes,
            "Snapshot": self.snapshot,
            "Stats": {
                "Files": self.stats.files,
                "FilesRead": self.stats.files_read,
                "BytesRead": self.stats.bytes_read,
                "BytesUploaded": self.stats.bytes_uploaded,
                "BytesDeduplicated": self.stats.bytes_deduplicated,
                "SpecialFilesSkipped": self.stats.specials_skipped,
                "DurationSeconds": round(self.stats.duration_seconds, 3),
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
