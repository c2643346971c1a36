"""Backup records decoded once per version: ``state_dir/cache/<store id>/records/``.

The daemon reads every record of its stores at every tick (scheduling,
retention, copies), and so do ``describe-backups``, ``check`` and garbage
collection. A fleet's store holds tens of thousands of records after a few
years (hosts, times file systems, times days, and their DELETED tombstones): on S3 that
was one GET and one decryption per record, every time. A listing already
carries each object's version (the ETag; locally inode, mtime and size, see
``ObjectInfo.version``) for one request per 1,000 keys, so a record is fetched
and authenticated only when its version is new to this host.

An entry holds the record's authenticated plaintext, as read once from the
store; ``state_dir`` is root's (0700), like the blob index cache beside it.
An entry that cannot be read, or names another version, is simply fetched
again: the cache can be deleted at any time.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class RecordCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, backup_id: str) -> Path:
        return self.directory / backup_id

    def get(self, backup_id: str, version: str) -> bytes | None:
        """The plaintext of ``backup_id`` at ``version``, if this host read that version before."""
        if not version:
            return None
        try:
            data = self._path(backup_id).read_bytes()
        except OSError:
            return None
        stored, _, plaintext = data.partition(b"\n")
        return plaintext if stored == version.encode() else None

    def put(self, backup_id: str, version: str, plaintext: bytes) -> None:
        """Remember what ``version`` holds (best effort: a failure only costs a later fetch)."""
        if not version or "\n" in version:
            return
        temp = self.directory / f".tmp-{secrets.token_hex(6)}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp.write_bytes(version.encode() + b"\n" + plaintext)
            os.replace(temp, self._path(backup_id))
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.debug("record_cache_not_written", backup_id=backup_id, error=str(exc))

    def keep_only(self, backup_ids: set[str]) -> None:
        """Drop entries of records the store no longer has (after a complete listing)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name not in backup_ids:
                (self.directory / name).unlink(missing_ok=True)
