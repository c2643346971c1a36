"""Progress reporting shared by backup and restore (the CLI renders it; the daemon stores it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class Unreported(NamedTuple):
    files: int
    nbytes: int  # file bytes walked (read, or found unchanged)
    uploaded: int  # bytes written to the object store


@dataclass
class Progress:
    """Counters updated by the engine; ``on_update`` is called at most every ``interval`` seconds."""

    total_bytes: int = 0  # estimate (0 = unknown)
    files: int = 0
    bytes_done: int = 0
    bytes_uploaded: int = 0  # written to the object store so far (packs, as each one lands)
    started: float = field(default_factory=time.monotonic)
    on_update: Callable[[Progress], None] | None = None
    interval: float = 0.5
    _last: float = 0.0
    _reported: Unreported = field(default_factory=lambda: Unreported(0, 0, 0))  # at the last take_unreported()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, *, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files += files
            self.bytes_done += nbytes
            now = time.monotonic()
            due = self.on_update is not None and now - self._last >= self.interval
            if due:
                self._last = now
        if due and self.on_update is not None:
            self.on_update(self)

    def uploaded(self, nbytes: int) -> None:
        """A pack of ``nbytes`` reached the object store (called from upload threads)."""
        with self._lock:
            self.bytes_uploaded += nbytes

    def take_unreported(self) -> Unreported:
        """What advanced since the previous call: what a counter (Prometheus) has not seen yet.

        Each advance is handed out exactly once whoever calls, so the daemon
        can report from ``on_update`` while the backup runs and once more when
        it ends without counting anything twice or losing the last stretch.
        """
        with self._lock:
            now = Unreported(self.files, self.bytes_done, self.bytes_uploaded)
            before, self._reported = self._reported, now
            return Unreported(now.files - before.files, now.nbytes - before.nbytes, now.uploaded - before.uploaded)

    @property
    def percent(self) -> int:
        if self.total_bytes <= 0:
            return 0
        return min(99, int(100 * self.bytes_done / self.total_bytes))

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.total_bytes <= 0 or self.rate <= 0 or self.bytes_done >= self.total_bytes:
            return None
        return (self.total_bytes - self.bytes_done) / self.rate
