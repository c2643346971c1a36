"""The object-store interface.

Kept deliberately small (put-if-absent, put, get, get-range, head, list,
delete) so that a local directory and any S3-compatible server can implement
it with the same guarantees: writes are atomic (an object is either absent or
complete), and ``put_if_absent`` never overwrites.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from zfsbackd.errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch (creation time for immutable objects)
    version: str = ""
    """Changes whenever the object is written again (S3: its ETag; local: inode, mtime in ns, size, as
    every write is a new file renamed into place); "" where unknown. Lets a cache tell a rewritten
    record from the one it holds without reading it."""


@dataclass
class ObjectStoreMetrics:
    """Request, error and retry counters by operation; read by the daemon's Prometheus exporter."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    bytes_written: int = 0
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, operation: str, *, written: int = 0, read: int = 0) -> None:
        with self._lock:
            self.requests[operation] += 1
            self.bytes_written += written
            self.bytes_read += read

    def count_retry(self, operation: str) -> None:
        with self._lock:
            self.retries[operation] += 1

    def count_error(self, operation: str) -> None:
        with self._lock:
            self.errors[operation] += 1


class ObjectStore(ABC):
    """A flat key → bytes namespace. Keys use ``/`` as a separator."""

    #: human-readable location for error messages ("local /var/lib/zfsbackd/store")
    location: str
    #: the region's config keys that choose the location, named in errors ("path"; "bucket", "prefix")
    location_settings: tuple[str, ...] = ()
    #: unwanted bytes worth reading over rather than making one more ranged read: blobs of a pack read
    #: together (a restore, a copy) are fetched in spans that bridge gaps up to this size. A local read
    #: costs an open, a ``pread`` and a close (tens of µs, about what 64 KiB of copying costs); an S3
    #: request costs a round trip (a megabyte at the bandwidths it is used with)
    span_gap_bytes: int = 64 * 1024

    def __init__(self) -> None:
        self.metrics = ObjectStoreMetrics()

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Create ``key`` atomically; return False (and write nothing) if it already exists."""

    def create(self, key: str, data: bytes | memoryview, what: str) -> None:
        """Create ``key`` (a random name of ours) with ``data``; StoreError if something else is there.

        An answer lost on the network makes the retried create find the object
        the first attempt wrote: that is success, told by its content.
        """
        if self.put_if_absent(key, data):
            return
        try:
            existing = self.get(key)
        except FileNotFoundError:
            existing = None
        if existing != bytes(data):
            raise StoreError(f"{what}: {key} already exists in {self.location} with other content")

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Create or atomically replace ``key`` (only backup records are ever replaced)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Whole object; raises FileNotFoundError if absent."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; a negative offset counts from the end."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and time of ``key``, or None."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    @abstractmethod
    def check_reachable(self) -> None:
        """Raise StoreError with a fix if the store cannot be used at all."""

    @abstractmethod
    def stale_writes(self, older_than: float) -> list[ObjectInfo]:
        """Leftovers of writes interrupted before ``older_than`` (seconds since the epoch).

        A writer killed mid-object leaves them behind (a local ``.tmp-*`` file,
        an incomplete S3 multipart upload); they are invisible to :meth:`list`
        and cost space until removed. ``key`` names the leftover itself, ``mtime``
        is when the write last made progress (local) or started (S3). Callers
        (garbage collection, ``check``) choose ``older_than`` far enough back that
        no live writer can still own one.
        """

    @abstractmethod
    def remove_stale_writes(self, older_than: float) -> int:
        """Remove what :meth:`stale_writes` lists for ``older_than``; return how many were removed."""
