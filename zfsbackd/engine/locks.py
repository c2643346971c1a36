"""Cross-process locks in ``state_dir``: the rules hold whoever does the work (daemon or CLI).

``flock`` locks belong to an open file and vanish when the process dies, so a
SIGKILLed backup or copy never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from zfsbackd.errors import BackupInProgress, StoreBusy
from zfsbackd.statedir import unusable

SLOT_POLL_SECONDS = 0.2


class SlotWaitCancelled(Exception):
    """Stopped while waiting for a copy slot; the copy stays PENDING."""


class LockManager:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.directory = state_dir / "locks"

    def _open(self, name: str) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            return os.open(self.directory / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # another user's state_dir, a read-only or full file system
            raise unusable(self.state_dir, exc) from exc

    def _try(self, name: str) -> int | None:
        """An fd holding ``name`` exclusively, or None if someone else holds it."""
        fd = self._open(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _busy(self, name: str) -> bool:
        fd = self._try(name)
        if fd is None:
            return True
        os.close(fd)
        return False

    @contextmanager
    def _exclusive(self, name: str, busy_message: str) -> Iterator[None]:
        fd = self._try(name)
        if fd is None:
            raise BackupInProgress(busy_message)
        try:
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------- backups
    def file_system(self, fs_id: str) -> AbstractContextManager[None]:
        """One backup per file system at a time; a second one gets BackupInProgress at once."""
        return self._exclusive(
            f"fs-backup-{fs_id}",
            f"a backup of {fs_id} is already running; wait for it to finish "
            f"(`zfsbackd describe-backups --filter file-system-id={fs_id}`)",
        )

    def is_file_system_busy(self, fs_id: str) -> bool:
        return self._busy(f"fs-backup-{fs_id}")

    # -------------------------------------------------------------- copies
    def copy_job(self, backup_id: str) -> AbstractContextManager[None]:
        """Held by whoever works on a copy, so others can tell a live copy from an orphaned one."""
        return self._exclusive(f"copy-{backup_id}", f"copy {backup_id} is already being worked on")

    def is_copy_busy(self, backup_id: str) -> bool:
        return self._busy(f"copy-{backup_id}")

    @contextmanager
    def copy_slot(self, region: str, limit: int, *, cancel: threading.Event | None = None) -> Iterator[int]:
        """One of ``limit`` copy slots of a destination region, waiting for one to free up.

        The slots are lock files, so the limit holds across the daemon and any
        CLI process copying to the same region.
        """
        while True:
            for slot in range(limit):
                fd = self._try(f"copy-slot-{region}-{slot}")
                if fd is not None:
                    try:
                        yield slot
                    finally:
                        os.close(fd)
                    return
            if cancel is not None and cancel.wait(SLOT_POLL_SECONDS):
                raise SlotWaitCancelled()
            if cancel is None:
                time.sleep(SLOT_POLL_SECONDS)

    # --------------------------------------------------------------- stores
    @contextmanager
    def store(self, region: str, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """Writers and readers (backups, copies, restores, check) share a region's store; garbage
        collection has it alone, so it never deletes a pack a restore on this host is about to read.

        ``wait=False`` raises :class:`StoreBusy` instead of waiting: the daemon's main loop must
        not stall behind a long restore run by the CLI.
        """
        fd = self._open(f"store-{region}")
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(
                    f"the store of region {region} is in use by another process on this host "
                    "(a backup, copy, restore or check); garbage collection runs once it is done"
                ) from None
            yield
        finally:
            os.close(fd)
