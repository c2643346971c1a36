"""Objects in memory, stamped by an injectable clock: the engine's store for tests without root or disk.

Gives the same guarantees as the other backends (an object is absent or
complete, ``put_if_absent`` never overwrites, ``list`` sees every object
written before it was called) so that the engine behaves on it exactly as on
a directory or a bucket. Two things make tests quick and deterministic: no I/O
at all, and ``clock`` (seconds since the epoch, default :func:`time.time`)
stamps every write. Garbage collection's grace period, candidate sets and
leases all measure age in the store's time (object ``mtime``), never the
host's, so a test advances the clock instead of waiting.

Not a region type users can configure: it forgets everything when the
process ends. ``MemoryRegions`` hands an engine the same store for a region
name every time, across Engine instances of one test (hosts of a fleet).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

from zfsbackd.config import Region
from zfsbackd.objectstore.base import ObjectInfo, ObjectStore


class MemoryObjectStore(ObjectStore):
    def __init__(self, name: str = "memory", *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.location = f"memory store {name}"
        self.clock = clock
        self._objects: dict[str, tuple[bytes, float, str]] = {}  # key → (data, mtime, version)
        self._versions = itertools.count(1)
        self._lock = threading.Lock()

    def _stamp(self, data: bytes | memoryview) -> tuple[bytes, float, str]:
        return bytes(data), self.clock(), str(next(self._versions))

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        self.metrics.count("put", written=len(data))
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = self._stamp(data)
            return True

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.metrics.count("put", written=len(data))
        with self._lock:
            self._objects[key] = self._stamp(data)

    def _data(self, key: str) -> bytes:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise FileNotFoundError(f"{self.location}: no object {key}")
        return found[0]

    def get(self, key: str) -> bytes:
        data = self._data(key)
        self.metrics.count("get", read=len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self._data(key)
        start = max(0, len(data) + offset) if offset < 0 else offset
        part = data[start : start + length]
        self.metrics.count("get", read=len(part))
        return part

    def head(self, key: str) -> ObjectInfo | None:
        self.metrics.count("head")
        with self._lock:
            found = self._objects.get(key)
        return None if found is None else ObjectInfo(key, len(found[0]), found[1], found[2])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.metrics.count("list")
        with self._lock:
            listed = [
                ObjectInfo(key, len(data), mtime, version)
                for key, (data, mtime, version) in self._objects.items()
                if key.startswith(prefix)
            ]
        return iter(listed)

    def delete(self, key: str) -> None:
        self.metrics.count("delete")
        with self._lock:
            self._objects.pop(key, None)

    def check_reachable(self) -> None:
        """Always reachable."""

    def stale_writes(self, older_than: float) -> list[ObjectInfo]:
        return []  # every write is whole: a killed writer leaves nothing behind

    def remove_stale_writes(self, older_than: float) -> int:
        return 0


class MemoryRegions:
    """One :class:`MemoryObjectStore` per region name, all stamped by one clock.

    Pass :meth:`open` to ``Engine(objects=...)``: every engine of a test that
    names a region gets the same objects, as hosts sharing a bucket do.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.stores: dict[str, MemoryObjectStore] = {}
        self._lock = threading.Lock()

    def open(self, region: Region, *, create_root: bool = False) -> MemoryObjectStore:
        with self._lock:
            if region.name not in self.stores:
                self.stores[region.name] = MemoryObjectStore(region.name, clock=self.clock)
            return self.stores[region.name]
