"""Cross-region copies: incremental, re-encrypted, resumable, limited to N in flight per region."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
from daemonkit import DaemonProcess
from enginekit import make_config, run_cli, store_bytes, write_config
from fsfixtures import assert_trees_identical, populate_sample_tree

from zfsbackd import faults
from zfsbackd.daemon.client import DaemonClient
from zfsbackd.daemon.copies import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, CopyScheduler
from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import BackupBeingCopied, BackupNotFound, InvalidRegion, SourceBackupUnavailable, StoreError
from zfsbackd.store.records import BackupRecord, Lifecycle, record_key

MiB = 1024 * 1024


def _engine(tmp_path: Path, source: Path, **kwargs: object) -> Engine:
    return Engine(make_config(tmp_path, {"src": source}, extra_regions={"eu": tmp_path / "store-eu"}, **kwargs))


def _restore(engine: Engine, backup_id: str, region: str, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    return engine.restore_backup(backup_id, target, region=region).path


def test_copy_is_incremental_reencrypted_and_restores(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    bulk = xfs_dir / "bulk"
    bulk.mkdir()
    rng = random.Random(4)
    for i in range(20):
        (bulk / f"f{i}.bin").write_bytes(rng.randbytes(2 * MiB))
    engine = _engine(tmp_path, xfs_dir)
    first = engine.create_backup(BackupRequest("fs-src", name="base", tags={"team": "storage"}))

    copy1 = engine.copy_backup(first.backup_id, destination_region="eu", copy_tags=True, tags={"site": "dr"})
    assert copy1.lifecycle == Lifecycle.AVAILABLE and copy1.region == "eu"
    assert (copy1.source_backup_id, copy1.source_region) == (first.backup_id, "local")
    assert copy1.tags == {"team": "storage", "site": "dr"}
    assert copy1.stats.bytes_uploaded >= first.stats.bytes_uploaded * 0.95  # the first copy is full
    home, eu = engine.store("local"), engine.store("eu")
    assert home.keys.data_key != eu.keys.data_key and home.keys.id_key == eu.keys.id_key

    with (bulk / "f3.bin").open("r+b") as f:  # ~1% churn: one chunk edited, one small file added
        f.seek(MiB)
        f.write(b"x" * 1000)
    (xfs_dir / "new.txt").write_text("new\n" * 100)
    second = engine.create_backup(BackupRequest("fs-src"))
    copy2 = engine.copy_backup(second.backup_id, destination_region="eu")
    full = copy1.stats.bytes_uploaded
    assert copy2.stats.bytes_uploaded <= 0.1 * full, (copy2.stats.bytes_uploaded, full)
    assert copy2.stats.bytes_uploaded <= second.stats.bytes_uploaded * 1.2  # what the backup itself sent

    assert_trees_identical(xfs_dir, _restore(engine, copy2.backup_id, "eu", tmp_path, "r2"))
    assert engine.check(region="eu", read_data=True).errors == []
    listed = run_cli(
        write_config(tmp_path, {"src": xfs_dir}, extra_regions={"eu": tmp_path / "store-eu"}),
        "describe-backups",
        "--region",
        "eu",
    ).json["Backups"]
    assert [b["BackupId"] for b in listed] == [copy1.backup_id, copy2.backup_id]
    assert listed[0]["SourceBackupId"] == first.backup_id and listed[0]["SourceBackupRegion"] == "local"


def test_copy_rules_errors(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    engine = _engine(tmp_path, xfs_dir)
    record = engine.create_backup(BackupRequest("fs-src"))
    with pytest.raises(InvalidRegion, match="mars"):
        engine.request_copy(record.backup_id, destination_region="mars")
    pending = engine.request_copy(record.backup_id, destination_region="eu")
    assert pending.lifecycle == Lifecycle.PENDING
    with pytest.raises(BackupBeingCopied, match=pending.backup_id):
        engine.delete_backup(record.backup_id)
    with pytest.raises(SourceBackupUnavailable):
        engine.request_copy(pending.backup_id, source_region="eu", destination_region="local")
    done = engine.run_copy(pending)
    assert done.lifecycle == Lifecycle.AVAILABLE
    assert engine.delete_backup(record.backup_id).lifecycle == Lifecycle.DELETED
    # The copy stands alone once its source is gone.
    assert (_restore(engine, done.backup_id, "eu", tmp_path, "r") / "f").read_text() == "x"


def test_interrupted_copy_resumes_without_resending(xfs_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(9)
    for i in range(10):
        (xfs_dir / f"big{i}.bin").write_bytes(rng.randbytes(16 * MiB))
    engine = _engine(tmp_path, xfs_dir)
    record = engine.create_backup(BackupRequest("fs-src"))
    pending = engine.request_copy(record.backup_id, destination_region="eu")
    cancel = threading.Event()
    # Stop the copy right after its first pack reached the destination (a fault
    # point, not a watch on the store's size: that raced the writer's renames).
    with faults.hooked("pack-uploaded", lambda hit: cancel.set()), pytest.raises(BackupCancelled):
        engine.run_copy(pending, cancel=cancel)
    interrupted = engine.get_backup(pending.backup_id, "eu")
    assert interrupted.lifecycle == Lifecycle.COPYING and interrupted.root_tree is None
    already = store_bytes(tmp_path / "store-eu")
    assert already >= 16 * MiB

    done = engine.run_copy(interrupted)
    assert done.lifecycle == Lifecycle.AVAILABLE
    total = store_bytes(tmp_path / "store-eu")
    assert done.stats.bytes_uploaded <= total - already + MiB  # only the rest was sent
    assert engine.check(region="eu", read_data=True).errors == []


def _many_backups(engine: Engine, source: Path, count: int, size: int) -> list[str]:
    rng = random.Random(12)
    ids = []
    for i in range(count):
        for old in source.glob("unique-*.bin"):
            old.unlink()  # each backup holds only its own data, so each copy has its own bytes to move
        (source / f"unique-{i:02d}.bin").write_bytes(rng.randbytes(size))
        ids.append(engine.create_backup(BackupRequest("fs-src")).backup_id)
    return ids


def test_daemon_keeps_at_most_five_copies_in_flight_in_order(xfs_dir: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"src": xfs_dir},
        extra_regions={"eu": tmp_path / "store-eu"},
        extra_fs={"automatic_backup_retention_days": 0},
    )
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, extra_regions={"eu": tmp_path / "store-eu"}))
    sources = _many_backups(engine, xfs_dir, 12, 24 * MiB)
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()
        daemon.wait_ready()
        observed: dict[str, float] = {}  # copy id → first time seen COPYING
        counts: list[int] = []
        eu = engine.store("eu")
        done = threading.Event()

        def watch() -> None:  # observe the limit, don't assume it
            while not done.is_set():
                records = eu.load_records()
                copying = [r.backup_id for r in records if r.lifecycle == Lifecycle.COPYING]
                counts.append(len(copying))
                for b in copying:
                    observed.setdefault(b, time.monotonic())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        first = run_cli(config, "copy-backup", "--source-backup-id", sources[0], "--destination-region", "eu")
        assert first.returncode == 0, first.stderr
        assert first.json["Backup"]["Lifecycle"] == "PENDING"
        copies = [first.json["Backup"]["BackupId"]]
        with DaemonClient(tmp_path / "control.sock") as client:  # the CLI's protocol, without a process per call
            for bid in sources[1:]:
                reply = client.call("CopyBackup", SourceBackupId=bid, DestinationRegion="eu")
                copies.append(reply["Backup"]["BackupId"])
        deadline = time.monotonic() + 300
        while True:
            records = {r.backup_id: r for r in eu.load_records()}
            if all(records[b].lifecycle == Lifecycle.AVAILABLE for b in copies):
                break
            assert not [b for b in copies if records[b].lifecycle == Lifecycle.FAILED]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        done.set()
        watcher.join()
        max_copying = max(counts)
        assert 2 <= max_copying <= 5, max_copying
        # Request order: copy k waits for a slot, so it never starts before copy k-5 did. (Two workers
        # that free up together may write their COPYING records milliseconds apart in either order.)
        for k in range(5, len(copies)):
            if copies[k] in observed and copies[k - 5] in observed:
                assert observed[copies[k - 5]] <= observed[copies[k]], f"copy {k} started before copy {k - 5}"
        for b in copies:
            assert records[b].root_tree == engine.get_backup(records[b].source_backup_id).root_tree
    finally:
        daemon.close()


def test_queued_copies_survive_a_daemon_kill(xfs_dir: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"src": xfs_dir},
        extra_regions={"eu": tmp_path / "store-eu"},
        extra_fs={"automatic_backup_retention_days": 0},
        max_copies=1,
    )
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, extra_regions={"eu": tmp_path / "store-eu"}))
    sources = _many_backups(engine, xfs_dir, 6, 32 * MiB)
    first = DaemonProcess(config, tmp_path)
    second = DaemonProcess(config, tmp_path)
    try:
        first.start()
        first.wait_ready()
        with DaemonClient(tmp_path / "control.sock") as client:
            copies = [
                client.call("CopyBackup", SourceBackupId=b, DestinationRegion="eu")["Backup"]["BackupId"]
                for b in sources
            ]
        first.signal(signal.SIGKILL)
        first.wait_exit(10)
        states = {r.backup_id: r.lifecycle for r in engine.store("eu").load_records()}
        assert any(states[c] != Lifecycle.AVAILABLE for c in copies), "kill came too late to test anything"
        second.start()
        second.wait_ready()
        deadline = time.monotonic() + 300
        while True:
            records = [engine.get_backup(c, "eu") for c in copies]
            if all(r.lifecycle == Lifecycle.AVAILABLE for r in records):
                break
            failed = [(r.backup_id, r.failure_message) for r in records if r.lifecycle == Lifecycle.FAILED]
            assert not failed, (failed, second.log_text()[-5000:])
            assert time.monotonic() < deadline, ([r.lifecycle for r in records], second.log_text()[-5000:])
            time.sleep(0.2)
        assert engine.check(region="eu", read_data=True).errors == []
    finally:
        first.close()
        second.close()


def test_a_copy_stopped_by_an_unanswering_store_is_tried_again_after_a_pause(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copy waits for a daemon restart: one whose attempt ended without an outcome is re-queued."""
    engine = _engine(tmp_path, xfs_dir)
    (xfs_dir / "f").write_bytes(b"copy me")
    source = engine.create_backup(BackupRequest("fs-src"))
    copy = engine.request_copy(source.backup_id, destination_region="eu")
    real_run_copy = engine.run_copy
    attempts: list[str] = []

    def run_copy_once_unreachable(record: BackupRecord, **kwargs: object) -> BackupRecord:
        attempts.append(record.backup_id)
        if len(attempts) == 1:
            raise StoreError("store of region eu did not answer")  # before anything was recorded
        return real_run_copy(record, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "run_copy", run_copy_once_unreachable)
    finished: list[tuple[str, BaseException | None]] = []
    done = threading.Event()
    scheduler = CopyScheduler(
        lambda: engine, limit=1, on_finished=lambda r, e: (finished.append((r.backup_id, e)), done.set())
    )
    try:
        scheduler.enqueue(copy)
        assert done.wait(30)
        assert isinstance(finished[0][1], StoreError)
        assert engine.get_backup(copy.backup_id, "eu").lifecycle == Lifecycle.PENDING
        assert scheduler.adopt_unfinished(now=time.monotonic() + 5) == 0, "retried before the pause"
        done.clear()
        assert scheduler.adopt_unfinished(now=time.monotonic() + RETRY_FIRST_SECONDS + 1) == 1
        assert done.wait(30)
        assert finished[1] == (copy.backup_id, None)
        assert engine.get_backup(copy.backup_id, "eu").lifecycle == Lifecycle.AVAILABLE
        assert scheduler.adopt_unfinished(now=time.monotonic() + 10 * RETRY_MAX_SECONDS) == 0
    finally:
        scheduler.stop()


def test_a_copy_whose_source_was_deleted_fails_instead_of_waiting(xfs_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tmp_path, xfs_dir)
    (xfs_dir / "f").write_bytes(b"copy me")
    source = engine.create_backup(BackupRequest("fs-src"))
    copy = engine.request_copy(source.backup_id, destination_region="eu")
    engine.store().objects.delete(record_key(source.backup_id))  # gone entirely, as after a purge by hand
    with pytest.raises(BackupNotFound):
        engine.run_copy(copy)
    failed = engine.get_backup(copy.backup_id, "eu")
    assert failed.lifecycle == Lifecycle.FAILED
    assert source.backup_id in (failed.failure_message or "")
