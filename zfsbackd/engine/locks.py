"""Cross-process locks in ``state_dir``: the rules hold whoever does the work (daemon or CLI).

``flock`` locks belong to an open file and vanish when the process dies, so a
SIGKILLed backup never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zfsbackd.errors import BackupInProgress


class LockManager:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "locks"

    def _open(self, name: str) -> int:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(self.directory / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def file_system(self, fs_id: str) -> Iterator[None]:
        """One backup per file system at a time; a second one gets BackupInProgress at once."""
        fd = self._open(f"fs-backup-{fs_id}")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupInProgress(
                    f"a backup of {fs_id} is already running; wait for it to finish "
                    f"(`zfsbackd describe-backups --filter file-system-id={fs_id}`)"
                ) from None
            yield
        finally:
            os.close(fd)

    def is_file_system_busy(self, fs_id: str) -> bool:
        fd = self._open(f"fs-backup-{fs_id}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextmanager
    def store(self, region: str, *, exclusive: bool) -> Iterator[None]:
        """Writers (backups, copies) share a region's store; garbage collection has it alone."""
        fd = self._open(f"store-{region}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)
