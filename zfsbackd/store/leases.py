"""Store leases: which processes of which hosts work on a store right now, kept in the store itself.

Local lock files coordinate the processes of one host; hosts that share a
store (a fleet writing to one bucket) see each other only through the store.
Every backup, copy, garbage collection and daemon holds a lease there: a
small sealed object ``locks/<host id>-<random>`` that names the host, the
process and what it does, written create-only when the work starts, rewritten
(renewed) every third of the lease time while it runs, and deleted when it
ends. A process that dies stops renewing; once a lease has not been renewed
for the lease time it is expired and others may act as if its holder were
gone (FORMAT.md, "Leases").

Time is the object store's, never a host clock: a lease's age is the
difference between two timestamps the store assigned — its ``LastModified``
and that of a probe object the reader writes just before it looks
(``locks/clock/<host id>``). Hosts may disagree about the time by any amount;
what is assumed is only that the store's clock runs at a steady rate and that
a holder's clock measures a third of a lease time with an error well under a
fifth of it (the holder stops trusting its lease at 80 % of the lease time).

Renewing is one thread per process (:class:`LeaseKeeper`), the one place that
knows every lease the process holds.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import structlog

from zfsbackd.errors import HostConflict, IntegrityError, LeaseLost, StoreBusy, StoreError
from zfsbackd.identity import HostIdentity
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.store.crypto import Sealer

log = structlog.get_logger(__name__)

LOCKS_PREFIX = "locks/"
CLOCK_PREFIX = "locks/clock/"
LEASE_FORMAT = 1
DEFAULT_LEASE_SECONDS = 300
#: A holder stops trusting its lease when this share of the lease time passed since its last renewal began.
TRUST_SHARE = 0.8


class Operation(StrEnum):
    BACKUP = "backup"
    COPY = "copy"
    GARBAGE_COLLECTION = "gc"
    DAEMON = "daemon"


#: Operations that may deduplicate against what is already in the store.
WRITERS = frozenset({Operation.BACKUP, Operation.COPY})


@dataclass(frozen=True)
class Lease:
    """A lease as another process sees it in the store."""

    key: str
    operation: str
    subject: str
    host_name: str
    host_id: str
    boot_id: str
    pid: int
    started: float
    """Store time of the lease's first write (``LastModified``), as its holder read it back."""
    renewed: float
    """Store time of its last write (``LastModified`` in the listing)."""
    ttl: float
    readable: bool = True

    def expired(self, store_now: float) -> bool:
        return store_now - self.renewed > self.ttl

    @property
    def writes(self) -> bool:
        """Could its holder deduplicate against the store? An unreadable lease is assumed to."""
        return not self.readable or self.operation in WRITERS

    def describe(self) -> str:
        if not self.readable:
            return f"an unreadable lease {self.key} (renewed at {_iso(self.renewed)})"
        return (
            f"{self.operation} {self.subject} by host {self.host_name} (host id {self.host_id}, pid {self.pid}) "
            f"since {_iso(self.started)}"
        )


class HeldLease:
    """A lease this process holds; renewed by the :class:`LeaseKeeper` until released."""

    def __init__(self, book: LeaseBook, key: str, operation: Operation, subject: str, first_write: float) -> None:
        self.book = book
        self.key = key
        self.operation = operation
        self.subject = subject
        self.started = 0.0
        self._last_ok = first_write
        self._broken_reason: str | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # a renewal never recreates a released lease
        self._released = False

    def body(self) -> bytes:
        return self.book.body(self.operation, self.subject, self.started or None)

    def renewed(self, began: float) -> None:
        """A renewal that began at ``began`` (monotonic) was stored, just now.

        The store stamped it somewhere between ``began`` and now, and stamped
        the previous one no earlier than that one began: so the store may have
        seen the lease unrenewed for up to now minus the previous start.
        """
        with self._lock:
            gap = time.monotonic() - self._last_ok
            if gap > TRUST_SHARE * self.book.ttl and self._broken_reason is None:
                self._broken_reason = (
                    f"it was not renewed for {gap:.0f} s (lease time {self.book.ttl:.0f} s), so another host may "
                    "have taken it as expired"
                )
            self._last_ok = max(self._last_ok, began)

    def confirm(self) -> None:
        """Raise LeaseLost unless the lease was renewed without a lapse, up to now (call before committing)."""
        with self._lock:
            reason = self._broken_reason
            gap = time.monotonic() - self._last_ok
        if reason is None and gap > TRUST_SHARE * self.book.ttl:
            reason = f"the store has not taken a renewal for {gap:.0f} s (lease time {self.book.ttl:.0f} s)"
        if reason is not None:
            raise LeaseLost(
                f"the lease of {self.operation} {self.subject} in region {self.book.region} lapsed: {reason}. "
                "Nothing was committed; the work resumes on its next run (check that the store answers)"
            )

    def renew(self) -> None:
        """Rewrite the lease object (its ``LastModified`` is the renewal); failures are retried later."""
        began = time.monotonic()
        with self._write_lock:
            if self._released:
                return
            try:
                self.book.objects.put(self.key, self.book.sealer.seal(self.body(), self.key.encode()))
            except (StoreError, OSError) as exc:
                log.warning("lease_not_renewed", region=self.book.region, key=self.key, error=str(exc))
                return
        self.renewed(began)

    def due(self) -> bool:
        with self._lock:
            return time.monotonic() - self._last_ok >= self.book.ttl / 3

    def release(self) -> None:
        self.book.keeper.forget(self)
        with self._write_lock:
            self._released = True
            try:
                self.book.objects.delete(self.key)
            except (StoreError, OSError) as exc:  # it expires on its own
                log.warning("lease_not_released", region=self.book.region, key=self.key, error=str(exc))

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class LeaseBook:
    """The leases of one store, read and written by this process."""

    def __init__(
        self,
        objects: ObjectStore,
        sealer: Sealer,
        region: str,
        identity: HostIdentity,
        keeper: LeaseKeeper,
        *,
        ttl: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.objects = objects
        self.sealer = sealer
        self.region = region
        self.identity = identity
        self.keeper = keeper
        self.ttl = float(ttl)

    # ------------------------------------------------------------ time
    def store_now(self) -> float:
        """The store's current time: the ``LastModified`` of a probe object written just now."""
        key = f"{CLOCK_PREFIX}{self.identity.host_id}"
        self.objects.put(key, b"")
        info = self.objects.head(key)
        if info is None:
            raise StoreError(
                f"the store of region {self.region} did not show {key} right after it was written; "
                "zfsbackd needs read-after-write consistency (every S3 service today has it)"
            )
        return info.mtime

    # ------------------------------------------------------------ reading
    def leases(self) -> list[Lease]:
        """Every lease object (expired ones too), oldest first."""
        found = []
        for info in self.objects.list(LOCKS_PREFIX):
            if info.key.startswith(CLOCK_PREFIX):
                continue
            lease = self._read(info.key, info.mtime)
            if lease is not None:
                found.append(lease)
        return sorted(found, key=lambda lease: (lease.started, lease.key))

    def live(self, store_now: float | None = None) -> list[Lease]:
        """Leases not expired, less those of this host's crashed processes (removed at once)."""
        now = self.store_now() if store_now is None else store_now
        return [lease for lease in self.leases() if not lease.expired(now) and not self._took_over(lease)]

    def _took_over(self, lease: Lease) -> bool:
        """Remove ``lease`` if it is of this host id and boot and its process is gone (a crash here)."""
        me = self.identity
        if not lease.readable or lease.host_id != me.host_id or lease.pid == me.pid:
            return False
        if not me.predecessor_is_dead(lease.boot_id, lease.pid):
            return False
        log.info("lease_taken_over", region=self.region, lease=lease.describe(), reason="its process is gone")
        self.objects.delete(lease.key)
        return True

    def _read(self, key: str, renewed: float) -> Lease | None:
        """The lease at ``key``; None if it was released since the listing."""
        what = f"lease {key} (region {self.region})"
        try:
            data = json.loads(self.sealer.open(self.objects.get(key), key.encode(), what=what))
            return Lease(
                key=key,
                operation=str(data["operation"]),
                subject=str(data["subject"]),
                host_name=str(data["host_name"]),
                host_id=str(data["host_id"]),
                boot_id=str(data["boot_id"]),
                pid=int(data["pid"]),
                started=float(data["started"]) if data.get("started") is not None else renewed,
                renewed=renewed,
                ttl=float(data["ttl_seconds"]),
            )
        except FileNotFoundError:
            return None
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            # Not authenticated, so nothing in it is believed; but someone may be working: it counts as a
            # writer that started when it was last written, until it expires by the reader's lease time.
            log.warning("lease_unreadable", region=self.region, key=key, error=str(exc))
            return Lease(key, "", "", "", "", "", 0, renewed, renewed, self.ttl, readable=False)

    # ------------------------------------------------------------ writing
    def body(self, operation: Operation, subject: str, started: float | None) -> bytes:
        me = self.identity
        data = {
            "format": LEASE_FORMAT,
            "operation": str(operation),
            "subject": subject,
            "host_name": me.host_name,
            "host_id": me.host_id,
            "boot_id": me.boot_id,
            "pid": me.pid,
            "started": started,
            "ttl_seconds": self.ttl,
        }
        return json.dumps(data, sort_keys=True).encode()

    def acquire(self, operation: Operation, subject: str) -> HeldLease:
        """Write a new lease and start renewing it; its ``started`` is the store's time of the write."""
        key = f"{LOCKS_PREFIX}{self.identity.host_id}-{secrets.token_hex(8)}"
        began = time.monotonic()
        held = HeldLease(self, key, operation, subject, began)
        self.objects.create(key, self.sealer.seal(held.body(), key.encode()), f"lease of region {self.region}")
        info = self.objects.head(key)
        held.started = info.mtime if info is not None else self.store_now()
        self.keeper.hold(held)
        return held

    def acquire_exclusive(self, operation: Operation, subject: str) -> HeldLease:
        """A lease that at most one live holder in the whole fleet has (garbage collection).

        Everyone writes first and then looks, and backs off (StoreBusy) on
        seeing any other live lease of ``operation``: of two contenders, the
        one that looks second sees the first, so both never proceed (both may
        back off, and try again at their next run).
        """
        held = self.acquire(operation, subject)
        try:
            now = self.store_now()
            rivals = [lease for lease in self.live(now) if lease.operation == operation and lease.key != held.key]
        except BaseException:
            held.release()
            raise
        if rivals:
            held.release()
            raise StoreBusy(
                f"{rivals[0].describe()} holds the store of region {self.region}; only one host collects "
                "garbage at a time. Nothing was deleted; the next run collects it (backups and copies go on)"
            )
        return held

    def register_daemon(self) -> HeldLease:
        """The daemon's lease: refuses a second live daemon with this host id or this host name.

        A daemon lease of this host id from this boot whose process is gone is
        a crashed predecessor: taken over (deleted) at once, not after expiry
        (as every lease of a crashed process of this host is, see :meth:`live`).
        """
        held = self.acquire(Operation.DAEMON, self.identity.host_name)
        try:
            self._refuse_other_daemons(held)
        except BaseException:
            held.release()
            raise
        return held

    def _refuse_other_daemons(self, held: HeldLease) -> None:
        me = self.identity
        now = self.store_now()
        for lease in self.live(now):
            if lease.key == held.key or lease.operation != Operation.DAEMON:
                continue
            if lease.host_id == me.host_id:
                raise HostConflict(
                    f"another zfsbackd daemon with this host id already works on the store of region "
                    f"{self.region}: {lease.describe()}. Two state directories with the same `host-id` file "
                    "(a cloned machine?) would undo each other's work: stop the other daemon, or give this "
                    "host its own state_dir (a new host-id is made on first use)"
                )
            if lease.host_name == me.host_name:
                raise HostConflict(
                    f"host name {me.host_name!r} is already used on the store of region {self.region} by "
                    f"another host: {lease.describe()}. Each host's scheduling and retention act on the "
                    "backups of its name, so two hosts must not share one: set a unique `host_name` in the "
                    "config of one of them"
                )


class LeaseKeeper:
    """Renews every lease this process holds, from one thread, every third of the shortest lease time."""

    def __init__(self) -> None:
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, lease: HeldLease) -> None:
        with self._lock:
            self._held[lease.key] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="zfsbackd-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self, lease: HeldLease) -> None:
        with self._lock:
            self._held.pop(lease.key, None)

    def held(self) -> list[HeldLease]:
        with self._lock:
            return list(self._held.values())

    def _run(self) -> None:
        while True:
            leases = self.held()
            if not leases:
                with self._lock:
                    if not self._held:
                        self._thread = None
                        return
                continue
            interval = min(lease.book.ttl for lease in leases) / 3
            self._wake.wait(interval)
            self._wake.clear()
            for lease in self.held():
                if lease.due():
                    lease.renew()


PROCESS_KEEPER = LeaseKeeper()
"""The one renewing thread of this process (started with the first lease, ended with the last)."""


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
