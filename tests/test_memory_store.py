"""The engine on an in-memory object store with a store clock the test moves: no loop device, no waiting.

The same behaviours the loopback tests prove on a directory (backup and
restore, garbage collection's grace period, a copy to another region) run
here in well under a second each, on a source in a plain temporary directory
(copy snapshots). The object-store contract is checked on the memory store
and the local directory side by side, so the memory store stays a faithful
stand-in.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import tree_manifest

from zfsbackd import errors
from zfsbackd.engine import copier as copier_module
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.local import LocalObjectStore
from zfsbackd.objectstore.memory import MemoryObjectStore, MemoryRegions
from zfsbackd.store.records import Lifecycle

MiB = 1024 * 1024
HOUR = 3600
DAY = 24 * HOUR


class StoreClock:
    """Seconds since the epoch as the object store stamps them, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _source(root: Path) -> Path:
    rng = random.Random(5)
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "keep.bin").write_bytes(rng.randbytes(2 * MiB))
    (src / "gone.bin").write_bytes(rng.randbytes(2 * MiB))
    (src / "sub" / "small.txt").write_text("small\n")
    (src / "sub" / "link").symlink_to("../keep.bin")
    return src


def _engine(tmp_path: Path, src: Path, regions: MemoryRegions, *, grace: int = 0) -> Engine:
    config = make_config(
        tmp_path / "host", {"src": src}, grace=grace, extra_fs={"allow_copy_snapshots": True},
        extra_regions={"eu": tmp_path / "unused-eu"},
    )
    return Engine(config, objects=regions.open)


def test_backup_and_restore_touch_no_disk_store(tmp_path: Path) -> None:
    src = _source(tmp_path)
    regions = MemoryRegions()
    engine = _engine(tmp_path, src, regions)
    record = engine.create_backup(BackupRequest("fs-src"))
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(record.backup_id, target).path
    assert tree_manifest(restored) == tree_manifest(src)
    assert list((tmp_path / "host" / "store").iterdir()) == [], "everything went to the memory store"
    assert any(info.key.startswith("data/") for info in regions.stores["local"].list(""))
    assert engine.check(read_data=True).errors == []


def test_grace_period_is_measured_on_the_store_clock(tmp_path: Path) -> None:
    """A deleted backup's data is marked, kept for the grace period of store time, then freed."""
    src = _source(tmp_path)
    clock = StoreClock()
    regions = MemoryRegions(clock=clock)
    engine = _engine(tmp_path, src, regions, grace=HOUR)
    first = engine.create_backup(BackupRequest("fs-src"))
    (src / "gone.bin").unlink()
    second = engine.create_backup(BackupRequest("fs-src"))
    engine.delete_backup(first.backup_id, collect=False)

    clock.now += 2 * HOUR  # the packs are older than the grace period, not yet named in a candidate set
    marked = engine.collect_garbage()
    assert marked.packs_marked > 0 and marked.packs_deleted == marked.packs_rewritten == 0
    clock.now += HOUR - 1
    early = engine.collect_garbage()
    assert early.packs_deleted == early.packs_rewritten == 0 and early.packs_waiting == marked.packs_marked
    clock.now += 1
    swept = engine.collect_garbage()
    assert swept.packs_deleted + swept.packs_rewritten == marked.packs_marked and swept.bytes_freed >= 2 * MiB

    target = tmp_path / "restore"
    target.mkdir()
    assert tree_manifest(engine.restore_backup(second.backup_id, target).path) == tree_manifest(src)
    assert engine.check(read_data=True).errors == []


def test_copy_between_two_memory_regions(tmp_path: Path) -> None:
    src = _source(tmp_path)
    regions = MemoryRegions()
    engine = _engine(tmp_path, src, regions)
    record = engine.create_backup(BackupRequest("fs-src"))
    copy = engine.copy_backup(record.backup_id, destination_region="eu")
    assert set(regions.stores) == {"local", "eu"}
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(copy.backup_id, target, region="eu").path
    assert tree_manifest(restored) == tree_manifest(src)


# ------------------------------------------------------------------ the contract
@pytest.fixture(params=["memory", "local"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "memory":
        return MemoryObjectStore()
    return LocalObjectStore(tmp_path / "objects", create=True)


def test_object_store_contract(objects: ObjectStore) -> None:
    assert objects.put_if_absent("data/ab/x", b"0123456789")
    assert not objects.put_if_absent("data/ab/x", b"other"), "never overwrites"
    assert objects.get("data/ab/x") == b"0123456789"
    assert objects.get_range("data/ab/x", 2, 3) == b"234"
    assert objects.get_range("data/ab/x", -4, 4) == b"6789"
    before = objects.head("data/ab/x")
    assert before is not None and before.size == 10
    objects.put("records/r", b"v1")
    first = objects.head("records/r")
    objects.put("records/r", b"v2!")
    second = objects.head("records/r")
    assert first is not None and second is not None and first.version != second.version and second.size == 3
    assert sorted(info.key for info in objects.list("data/")) == ["data/ab/x"]
    assert sorted(info.key for info in objects.list("")) == ["data/ab/x", "records/r"]
    objects.delete("data/ab/x")
    objects.delete("data/ab/x")  # absent: no error
    assert objects.head("data/ab/x") is None
    with pytest.raises(FileNotFoundError):
        objects.get("data/ab/x")
    with pytest.raises(FileNotFoundError):
        objects.get_range("data/ab/x", 0, 1)


def test_deleted_records_go_after_the_retention_on_the_store_clock(tmp_path: Path) -> None:
    """A daily backup for years must not leave a record per day behind: collection removes DELETED
    records once they are older than garbage_collection.deleted_records_retention_days (30)."""
    src = _source(tmp_path)
    clock = StoreClock()
    regions = MemoryRegions(clock=clock)
    engine = _engine(tmp_path, src, regions)
    old = engine.create_backup(BackupRequest("fs-src"))
    kept = engine.create_backup(BackupRequest("fs-src"))
    engine.delete_backup(old.backup_id)
    with pytest.raises(errors.BackupNotFound, match="already deleted"):
        engine.delete_backup(old.backup_id)

    clock.now += 30 * DAY - 1
    assert engine.collect_garbage().deleted_records_removed == 0
    assert engine.store().load_record(old.backup_id).lifecycle == Lifecycle.DELETED
    clock.now += 2
    assert engine.collect_garbage().deleted_records_removed == 1
    with pytest.raises(errors.BackupNotFound, match="does not exist"):
        engine.get_backup(old.backup_id)
    assert engine.get_backup(kept.backup_id).lifecycle == Lifecycle.AVAILABLE
    assert engine.collect_garbage().deleted_records_removed == 0


def test_a_copy_in_small_batches_sends_each_blob_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy walks the backup in batches (its memory must not follow the backup's size); a blob
    shared by files of different batches is still sent once, and the copy restores identical."""
    src = _source(tmp_path)
    for i in range(30):
        (src / "sub" / f"same{i:02d}.txt").write_text("the same content in every one of these files\n")
        (src / "sub" / f"own{i:02d}.txt").write_text(f"file {i}\n")
    regions = MemoryRegions()
    engine = _engine(tmp_path, src, regions)
    record = engine.create_backup(BackupRequest("fs-src"))
    monkeypatch.setattr(copier_module, "BATCH_BLOBS", 7)
    copy = engine.copy_backup(record.backup_id, destination_region="eu")
    assert copy.stats.blobs_new == record.stats.blobs_new, "every blob sent once, as many as the backup stored"
    target = tmp_path / "restore"
    target.mkdir()
    assert tree_manifest(engine.restore_backup(copy.backup_id, target, region="eu").path) == tree_manifest(src)
    assert engine.check(region="eu", read_data=True).errors == []
