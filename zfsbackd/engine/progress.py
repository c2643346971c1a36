"""Progress reporting shared by backup and restore (the CLI renders it; the daemon stores it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counters updated by the engine; ``on_update`` is called at most every ``interval`` seconds."""

    total_bytes: int = 0  # estimate (0 = unknown)
    files: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)
    on_update: Callable[[Progress], None] | None = None
    interval: float = 0.5
    _last: float = 0.0
    _reported: tuple[int, int] = (0, 0)  # files, bytes_done at the last take_unreported()
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

    def take_unreported(self) -> tuple[int, int]:
        """(files, bytes) advanced since the previous call: what a counter (Prometheus) has not seen yet.

        Each advance is handed out exactly once whoever calls, so the daemon
        can report from ``on_update`` while the backup runs and once more when
        it ends without counting anything twice or losing the last stretch.
        """
        with self._lock:
            (files, nbytes), self._reported = self._reported, (self.files, self.bytes_done)
            return self.files - files, self.bytes_done - nbytes

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
