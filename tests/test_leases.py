"""Store leases: renewal, lapse, store time, unreadable leases, one collection at a time."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest
from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import LeaseLost, StoreBusy, StoreError
from zfsbackd.identity import HostIdentity, host_id
from zfsbackd.objectstore.local import LocalObjectStore
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.gc import collect_garbage
from zfsbackd.store.leases import CLOCK_PREFIX, TRUST_SHARE, LeaseBook, Operation
from zfsbackd.store.records import Lifecycle
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter


def _store(tmp_path: Path) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    return Store.open(LocalObjectStore(root), region="local", key_material=b"k" * 32, create=True)


def _book(store: Store, name: str, ttl: float = 300) -> LeaseBook:
    """Host ``name``'s view of ``store`` (a host id of its own)."""
    identity = HostIdentity(name, secrets.token_hex(16), "boot", os.getpid())
    return LeaseBook(store.objects, store.sealer, store.region, identity, store.leases.keeper, ttl=ttl)


def test_a_held_lease_is_renewed_in_the_store_and_deleted_when_released(tmp_path: Path) -> None:
    store = _store(tmp_path)
    book = _book(store, "host-a", ttl=3)
    with book.acquire(Operation.BACKUP, "fs-home") as held:
        (lease,) = book.live()
        assert (lease.host_name, lease.operation, lease.subject) == ("host-a", "backup", "fs-home")
        assert lease.started == held.started
        first = lease.renewed
        deadline = time.monotonic() + 10
        while book.leases()[0].renewed == first:  # the keeper rewrites it every second (ttl / 3)
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.1)
        assert book.leases()[0].started == held.started, "renewals keep the first write's store time"
        held.confirm()
    assert book.leases() == []
    assert [i.key for i in store.objects.list("locks/")] == [f"{CLOCK_PREFIX}{book.identity.host_id}"]


def test_a_lease_that_could_not_be_renewed_in_time_commits_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    held = _book(store, "host-a").acquire(Operation.COPY, "backup-1")
    try:
        held._last_ok -= TRUST_SHARE * held.book.ttl + 1  # the store took no renewal for 80 % of the lease
        with pytest.raises(LeaseLost, match="lapsed"):
            held.confirm()
        held.renew()  # a late renewal does not make it trustworthy again
        with pytest.raises(LeaseLost, match="not renewed for"):
            held.confirm()
    finally:
        held.release()


def test_expiry_is_judged_by_the_stores_clock_not_the_hosts(tmp_path: Path) -> None:
    store = _store(tmp_path)
    book = _book(store, "host-a", ttl=30)
    with book.acquire(Operation.BACKUP, "fs-home"):
        (lease,) = book.leases()
        assert not lease.expired(book.store_now())
        LocalObjectStore.clock_shift = 31.0  # the store's clock moved on; this host's did not
        try:
            assert lease.expired(book.store_now())
            assert book.live() == []
        finally:
            LocalObjectStore.clock_shift = 0.0


def test_an_unreadable_lease_holds_back_collection_like_a_writer_until_it_expires(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.objects.put("locks/forged", b"not sealed with this store's key")
    (lease,) = store.leases.live()
    assert not lease.readable and lease.writes
    with PackWriter(store) as writer:  # a pack no record references
        writer.add(BlobType.DATA, b"nobody needs this")
        writer.flush()
    held = collect_garbage(store, grace_seconds=0)
    assert (held.packs_marked, held.packs_deleted, held.packs_waiting) == (1, 0, 1), held
    LocalObjectStore.clock_shift = store.leases.ttl + 1
    try:
        freed = collect_garbage(store, grace_seconds=0)
        assert freed.packs_deleted == 1, freed
        assert store.leases.leases() == [], "the expired unreadable lease is removed"
    finally:
        LocalObjectStore.clock_shift = 0.0


def test_of_two_racing_collections_never_both_run(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with _book(store, "host-a").acquire_exclusive(Operation.GARBAGE_COLLECTION, "local"):  # looked first
        with pytest.raises(StoreBusy, match="host-a"):
            _book(store, "host-b").acquire_exclusive(Operation.GARBAGE_COLLECTION, "local")
        assert [lease.host_name for lease in store.leases.leases()] == ["host-a"], "the loser removed its lease"
    # Both wrote before either looked: both back off (and try again later), neither runs.
    a = _book(store, "host-a").acquire(Operation.GARBAGE_COLLECTION, "local")
    try:
        with pytest.raises(StoreBusy, match="host-a"):
            _book(store, "host-b").acquire_exclusive(Operation.GARBAGE_COLLECTION, "local")
    finally:
        a.release()
    with _book(store, "host-b").acquire_exclusive(Operation.GARBAGE_COLLECTION, "local"):
        pass


def test_the_host_id_is_made_once_and_kept(tmp_path: Path) -> None:
    made = host_id(tmp_path / "state")
    assert len(made) == 32 and host_id(tmp_path / "state") == made
    (tmp_path / "state" / "host-id").write_text("garbage\n")
    assert host_id(tmp_path / "state") != made, "a damaged id file is replaced"


def test_a_backup_whose_lease_lapsed_stays_creating_and_resumes(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (xfs_dir / "f").write_bytes(b"data" * 1000)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))

    def lapsed(self: object) -> None:
        raise LeaseLost("the lease of backup fs-src lapsed (test)")

    with monkeypatch.context() as patch:
        patch.setattr("zfsbackd.store.leases.HeldLease.confirm", lapsed)
        with pytest.raises(LeaseLost):
            engine.create_backup(BackupRequest("fs-src"))
    (record,) = engine.describe_backups().records
    assert record.lifecycle == Lifecycle.CREATING
    resumed = engine.create_backup(BackupRequest("fs-src"))
    assert (resumed.backup_id, resumed.lifecycle) == (record.backup_id, Lifecycle.AVAILABLE)


def test_a_lease_whose_create_answer_was_lost_is_still_ours(tmp_path: Path) -> None:
    """Found by the soak test behind the fault proxy: the create landed, its answer was lost, the retry
    found the object. Ours by content: accepted; anything else under that name: refused."""

    class LostAnswers(LocalObjectStore):
        def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
            super().put_if_absent(key, data)
            return False  # what the retried conditional PUT reports

    root = tmp_path / "store"
    root.mkdir()
    store = Store.open(LostAnswers(root), region="local", key_material=b"k" * 32, create=True)
    with store.leases.acquire(Operation.BACKUP, "fs-home") as held:
        assert [lease.key for lease in store.leases.leases()] == [held.key]
    store.objects.put("gc/candidates-taken", b"someone else's")
    with pytest.raises(StoreError, match="other content"):
        store.objects.create("gc/candidates-taken", b"mine", "test")
