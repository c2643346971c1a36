"""The record cache: each version of a record is fetched and authenticated once per host."""

from __future__ import annotations

from pathlib import Path

from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.store.records import Lifecycle


def _gets(engine: Engine) -> int:
    return engine.store().objects.metrics.requests["get"]


def test_records_are_fetched_once_per_version(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_bytes(b"x" * 1000)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    backups = [engine.create_backup(BackupRequest("fs-src")).backup_id for _ in range(5)]
    engine.store().load_records()  # whatever the backups left uncached is read now

    fresh = Engine(make_config(tmp_path, {"src": xfs_dir}))  # a new process of the same host
    before = _gets(fresh)
    assert [r.backup_id for r in fresh.store().load_records()] == backups
    assert _gets(fresh) == before, "a record whose version this host read was fetched again"

    deleted = fresh.delete_backup(backups[0], collect=False)  # a new version of one record
    before = _gets(fresh)
    states = {r.backup_id: r.lifecycle for r in fresh.store().load_records()}
    assert states[backups[0]] == deleted.lifecycle == Lifecycle.DELETED
    assert _gets(fresh) - before == 1, "only the rewritten record is fetched"


def test_a_damaged_or_stale_cache_entry_is_fetched_again(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_bytes(b"x" * 1000)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    backup = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    store.load_records()
    assert store.record_cache is not None
    entry = store.record_cache.directory / backup.backup_id
    version, _, _plaintext = entry.read_bytes().partition(b"\n")
    entry.write_bytes(version + b"\n{not json")
    (record,) = store.load_records()
    assert record == engine.get_backup(backup.backup_id)
    entry.write_bytes(b"some-other-version\n{}")
    assert store.load_records() == [record]

    orphan = store.record_cache.directory / "backup-00000000000000000"
    orphan.write_bytes(b"v\n{}")
    store.load_records()
    assert not orphan.exists(), "entries of records the store no longer has are dropped"
