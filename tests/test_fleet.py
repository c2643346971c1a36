"""Hosts sharing one store: leases, two-phase garbage collection, disaster recovery, refusals.

The reproduction of issue 12: host B deduplicates against backup X of host A
while A deletes X and collects garbage. Time is the store's: the tests move
the local store's clock ahead (``LocalObjectStore.clock_shift``) and the
engines' record clocks with it, so packs and candidate sets age by hours in
no time, with the default grace period. Live lease holders are renewed when
the clock moves, as their keeper would have done meanwhile.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from daemonkit import DaemonProcess
from enginekit import pack_files, run_cli, write_host_config
from fsfixtures import assert_trees_identical

from zfsbackd import faults
from zfsbackd.config import load_config
from zfsbackd.daemon.client import DaemonClient
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import StoreBusy
from zfsbackd.objectstore.local import LocalObjectStore
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.leases import PROCESS_KEEPER, Operation
from zfsbackd.store.packs import pack_key
from zfsbackd.store.records import BackupRecord, Lifecycle, utc_now
from zfsbackd.store.writer import PackWriter

MiB = 1024 * 1024
HOUR = 3600.0


class StoreClock:
    """The store's time (stamped on local objects) and the engines' record time, moved together."""

    def __init__(self) -> None:
        self.shift = 0.0

    def now(self) -> datetime:
        return utc_now() + timedelta(seconds=self.shift)

    def advance(self, seconds: float) -> None:
        self.shift += seconds
        LocalObjectStore.clock_shift = self.shift
        for lease in PROCESS_KEEPER.held():  # a live holder renews every third of its lease time
            lease.renew()


@pytest.fixture
def clock() -> Iterator[StoreClock]:
    clock = StoreClock()
    try:
        yield clock
    finally:
        LocalObjectStore.clock_shift = 0.0


class Fleet:
    """Host A (home store S1, and S2 as region eu) and host B on the same key file.

    ``b_home`` chooses B's home: ``"shared"`` puts it on S1 (B backs up into
    A's store), ``"eu"`` on S2 with S1 as region ``shared`` (B copies into A's
    store). Both sources hold the same 8 MiB file; B's also 40 MiB of its own.
    """

    def __init__(self, xfs_dir: Path, tmp_path: Path, clock: StoreClock, *, b_home: str = "shared") -> None:
        rng = random.Random(12)
        self.src_a, self.src_b = xfs_dir / "a", xfs_dir / "b"
        common = rng.randbytes(8 * MiB)
        for src in (self.src_a, self.src_b):
            src.mkdir()
            (src / "00-shared.bin").write_bytes(common)
        (self.src_a / "a-only.bin").write_bytes(rng.randbytes(4 * MiB))
        (self.src_b / "zz-new.bin").write_bytes(rng.randbytes(40 * MiB))
        self.s1 = tmp_path / "host-a" / "store"
        self.s2 = tmp_path / "eu-store"
        config_a = write_host_config(
            tmp_path, "host-a", {"home": self.src_a}, grace=3600, extra_regions={"eu": self.s2}
        )
        self.config_a = config_a
        self.a = Engine(load_config(config_a), clock=clock.now)
        self.a.store("eu")  # S2 is made by A, with the deployment's blob-id key
        if b_home == "shared":
            self.config_b = write_host_config(tmp_path, "host-b", {"home": self.src_b}, shared=tmp_path / "host-a",
                                              grace=3600)
        else:
            self.config_b = write_host_config(tmp_path, "host-b", {"home": self.src_b}, shared=tmp_path / "host-a",
                                              home=self.s2, grace=3600, extra_regions={"shared": self.s1})
        self.b = Engine(load_config(self.config_b), clock=clock.now)
        self.b_region_on_s1 = "local" if b_home == "shared" else "shared"

    def a_packs(self) -> set[Path]:
        return set(pack_files(self.s1))


def _restores_identical(engine: Engine, backup: BackupRecord, region: str, source: Path, target: Path) -> None:
    target.mkdir()
    restored = engine.restore_backup(backup.backup_id, target, region=region).path
    assert_trees_identical(source, restored)


@pytest.mark.parametrize("b_writes", ["backup", "copy"])
def test_a_host_deleting_what_another_host_deduplicates_against_loses_nothing(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock, b_writes: str
) -> None:
    fleet = Fleet(xfs_dir, tmp_path, clock, b_home="shared" if b_writes == "backup" else "eu")
    x = fleet.a.create_backup(BackupRequest("fs-home"))
    x_packs = fleet.a_packs()
    source = fleet.b.create_backup(BackupRequest("fs-home")) if b_writes == "copy" else None  # in S2
    clock.advance(2 * HOUR)  # X is yesterday's backup: its packs are older than the grace period

    paused, resume, done = threading.Event(), threading.Event(), threading.Event()
    result: list[BackupRecord | BaseException] = []

    def hold_at_second_pack(n: int) -> None:
        if n == 2:
            paused.set()
            assert resume.wait(120)

    def b_runs() -> None:
        try:
            if b_writes == "backup":
                result.append(fleet.b.create_backup(BackupRequest("fs-home")))
            else:
                assert source is not None
                result.append(fleet.b.copy_backup(source.backup_id, destination_region="shared"))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)
        finally:
            done.set()

    with faults.hooked("pack-uploaded", hold_at_second_pack):
        writer = threading.Thread(target=b_runs)
        writer.start()
        assert paused.wait(120), result
        # B has deduplicated against X's shared file and is still writing. A deletes X.
        fleet.a.delete_backup(x.backup_id)
        first = fleet.a.collect_garbage()
        assert first.packs_deleted == first.packs_rewritten == 0
        clock.advance(2 * HOUR)  # the candidate set is past the grace period; B's lease is renewed
        second = fleet.a.collect_garbage()
        assert (second.packs_deleted, second.packs_rewritten) == (0, 0), second
        assert second.packs_waiting > 0, "B's lease, older than the candidates, must hold them back"
        assert x_packs <= fleet.a_packs()
        resume.set()
        assert done.wait(300)
        writer.join()
    written = result[0]
    assert isinstance(written, BackupRecord), written
    assert written.lifecycle == Lifecycle.AVAILABLE
    assert written.stats.bytes_uploaded < 44 * MiB, "B did not deduplicate against X: the race was not tested"

    clock.advance(2 * HOUR)
    third = fleet.a.collect_garbage()  # B committed: X's shared data is referenced again, its own data goes
    assert third.packs_deleted + third.packs_rewritten >= 1, third
    assert third.bytes_freed >= 4 * MiB
    _restores_identical(fleet.b, written, fleet.b_region_on_s1, fleet.src_b, tmp_path / "restored-b")
    assert fleet.a.check(read_data=True).errors == []


def test_a_writer_that_starts_after_the_candidates_stores_their_data_again(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    fleet = Fleet(xfs_dir, tmp_path, clock)
    x = fleet.a.create_backup(BackupRequest("fs-home"))
    x_packs = fleet.a_packs()
    clock.advance(2 * HOUR)
    fleet.a.delete_backup(x.backup_id)  # X's packs become candidates; nothing deleted yet
    assert x_packs <= fleet.a_packs()
    b = fleet.b.create_backup(BackupRequest("fs-home"))
    assert b.stats.bytes_uploaded >= 48 * MiB, "B deduplicated against a candidate pack"
    clock.advance(2 * HOUR)
    collected = fleet.a.collect_garbage()
    assert collected.packs_deleted >= 1 and not (x_packs & fleet.a_packs()), collected
    assert collected.packs_waiting == 0
    _restores_identical(fleet.b, b, "local", fleet.src_b, tmp_path / "restored-b")
    assert fleet.a.check(read_data=True).errors == []


def test_a_killed_writers_lease_holds_collection_until_it_expires(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    """B is a real process SIGKILLed after its second pack (its lease stays); A collects with grace 0."""
    fleet = Fleet(xfs_dir, tmp_path, clock)
    x = fleet.a.create_backup(BackupRequest("fs-home"))
    x_packs = fleet.a_packs()
    env_before = os.environ.get(faults.ENV_VAR)
    os.environ[faults.ENV_VAR] = "pack-uploaded:2"
    try:
        killed = run_cli(fleet.config_b, "create-backup", "--file-system-id", "fs-home")
    finally:
        os.environ.pop(faults.ENV_VAR) if env_before is None else os.environ.__setitem__(faults.ENV_VAR, env_before)
    assert killed.returncode == -9, killed.stderr
    store = fleet.a.store()
    leases = [lease for lease in store.leases.live() if lease.host_name == "host-b"]
    assert [lease.operation for lease in leases] == [Operation.BACKUP]

    fleet.a.delete_backup(x.backup_id)
    held = fleet.a.collect_garbage(grace_seconds=0)
    assert (held.packs_deleted, held.packs_rewritten) == (0, 0) and held.packs_waiting > 0, held
    assert held.retry_after_seconds is not None
    assert x_packs <= fleet.a_packs(), "collected under a live lease"

    clock.advance(store.leases.ttl + 1)  # B renews nothing: it is dead
    taken_over = fleet.a.collect_garbage(grace_seconds=0)
    assert taken_over.packs_deleted >= 1 and not (x_packs & fleet.a_packs()), taken_over
    assert not [lease for lease in store.leases.leases() if lease.host_name == "host-b"], "expired lease kept"

    clock.advance(-clock.shift)  # B's host clock never moved: back to real time for the resumed process
    resumed = run_cli(fleet.config_b, "create-backup", "--file-system-id", "fs-home")
    assert resumed.returncode == 0, resumed.stderr
    b = fleet.b.get_backup(resumed.json["Backup"]["BackupId"])
    assert b.lifecycle == Lifecycle.AVAILABLE
    _restores_identical(fleet.b, b, "local", fleet.src_b, tmp_path / "restored-b")
    assert fleet.a.check(read_data=True).errors == []


def test_one_collection_at_a_time_in_the_fleet_and_deleting_does_not_wait_for_it(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    fleet = Fleet(xfs_dir, tmp_path, clock)
    mine = fleet.b.create_backup(BackupRequest("fs-home"))
    with fleet.a.store().leases.acquire_exclusive(Operation.GARBAGE_COLLECTION, "local"):
        with pytest.raises(StoreBusy, match="host host-a"):
            fleet.b.collect_garbage()
        deleted = fleet.b.delete_backup(mine.backup_id)  # the record is DELETED; collection comes later
        assert deleted.lifecycle == Lifecycle.DELETED
    assert fleet.b.collect_garbage(grace_seconds=0).packs_deleted >= 1


def test_a_new_host_with_only_the_key_file_restores_every_hosts_backups(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    fleet = Fleet(xfs_dir, tmp_path, clock)
    a = fleet.a.create_backup(BackupRequest("fs-home"))
    b = fleet.b.create_backup(BackupRequest("fs-home"))
    empty = xfs_dir / "nothing"
    empty.mkdir()
    config_d = write_host_config(tmp_path, "host-d", {"home": empty}, shared=tmp_path / "host-a")
    listing = run_cli(config_d, "describe-backups", "--all-hosts")
    assert listing.returncode == 0, listing.stderr
    assert {(x["BackupId"], x["HostName"]) for x in listing.json["Backups"]} == {
        (a.backup_id, "host-a"),
        (b.backup_id, "host-b"),
    }
    for backup, source in ((a, fleet.src_a), (b, fleet.src_b)):
        target = tmp_path / f"dr-{backup.host_name}"
        target.mkdir()
        restored = run_cli(config_d, "restore-backup", "--backup-id", backup.backup_id, "--target", str(target))
        assert restored.returncode == 0, restored.stderr
        assert_trees_identical(source, Path(restored.json["Restore"]["Path"]))


def _exits_refused(config: Path, workdir: Path, match: str) -> None:
    daemon = DaemonProcess(config, workdir)
    try:
        daemon.start()
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 4, daemon.log_text()[-3000:]
        assert "HostConflict" in daemon.log_text() and match in daemon.log_text(), daemon.log_text()[-3000:]
    finally:
        daemon.close()


def test_a_second_daemon_with_this_host_id_or_host_name_is_refused(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    fleet = Fleet(xfs_dir, tmp_path, clock)
    first = DaemonProcess(fleet.config_a, tmp_path / "host-a")
    try:
        first.start()
        first.wait_ready()
        same_name = write_host_config(tmp_path, "host-c", {"home": fleet.src_b}, shared=tmp_path / "host-a")
        data = yaml.safe_load(same_name.read_text())
        data["host_name"] = "host-a"
        same_name.write_text(yaml.safe_dump(data))
        _exits_refused(same_name, tmp_path / "host-c", "host name 'host-a' is already used")

        cloned = write_host_config(tmp_path, "host-e", {"home": fleet.src_b}, shared=tmp_path / "host-a")
        (tmp_path / "host-e" / "state").mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp_path / "host-a" / "state" / "host-id", tmp_path / "host-e" / "state" / "host-id")
        _exits_refused(cloned, tmp_path / "host-e", "with this host id already works")

        first.signal(signal.SIGKILL)  # its lease stays in the store ...
        first.wait_exit(10)
    finally:
        first.close()
    again = DaemonProcess(fleet.config_a, tmp_path / "host-a")
    try:
        again.start()  # ... and is taken over at once: same host id, same boot, process gone
        again.wait_ready()
        assert "lease_taken_over" in again.log_text()
        again.signal(signal.SIGTERM)
        assert again.wait_exit(60) == 0
    finally:
        again.close()
    leases = fleet.a.store().leases.leases()
    assert [lease.operation for lease in leases] == [], "a stopped daemon releases its lease"


def test_a_copy_in_a_pack_a_killed_collection_deleted_is_never_the_one_kept(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock
) -> None:
    """Found by the fleet soak test. Blobs stored twice, in packs P and K, both deletion candidates; a
    collection deleted K and was killed before it replaced the index objects naming K. The next
    collection, on another host, must keep P's copies (the only ones left), not choose K's."""
    fleet = Fleet(xfs_dir, tmp_path, clock)
    (fleet.src_a / "a-only.bin").unlink()
    keep = fleet.a.create_backup(BackupRequest("fs-home"))
    store = fleet.a.store()
    store.load_index()
    (p_file,) = fleet.a_packs()
    p = bytes.fromhex(p_file.name)
    entries = store.index.pack_entries(p)
    copies: list[Path] = []
    for filler in range(64):  # K holds P's blobs and one more; K's id above P's, so "the greatest id" is K
        with PackWriter(store) as writer:
            for e in entries:
                sealed = store.objects.get_range(pack_key(p), e.offset, e.length)
                writer.add_sealed(e.blob_type, e.blob_id, sealed, e.raw_length)
            writer.add(BlobType.DATA, f"filler {filler}".encode())
            writer.flush()
        copies = sorted(fleet.a_packs() - {p_file})
        if copies[-1].name > p_file.name and len(copies) >= 3:  # several copies gone: each is tried once
            break
    assert copies[-1].name > p_file.name
    store.candidates.write({p, *(bytes.fromhex(c.name) for c in copies)}, store.leases.identity)
    for copy in copies:
        copy.unlink()  # the killed collection's work: gone, the index objects naming them still there

    collected = fleet.b.collect_garbage(grace_seconds=0)  # another host, another cache
    assert collected.packs_deleted == 0 and p_file.exists(), collected
    again = fleet.b.collect_garbage(grace_seconds=0)
    assert again.packs_waiting == 0, again
    assert fleet.a.check(read_data=True).errors == [], ("the index still names K", collected, again)
    _restores_identical(fleet.a, keep, "local", fleet.src_a, tmp_path / "restored")


def test_check_while_another_host_collects_reports_no_false_damage(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host B's `check` has read the index when host A deletes a backup and collects its packs: the
    packs B's index names are gone, but nothing is damaged, so `check` says nothing."""
    fleet = Fleet(xfs_dir, tmp_path, clock)
    kept = fleet.a.create_backup(BackupRequest("fs-home"))
    (fleet.src_a / "a-only.bin").unlink()
    (fleet.src_a / "soon-gone.bin").write_bytes(random.Random(9).randbytes(2 * MiB))
    doomed = fleet.a.create_backup(BackupRequest("fs-home"))
    checking = fleet.b.store()
    real_listing = checking.list_pack_ids
    collected = []

    def listing_after_a_collects() -> Iterator[bytes]:
        if not collected:
            fleet.a.delete_backup(doomed.backup_id, collect=False)
            collected.append(fleet.a.collect_garbage(grace_seconds=0))
        return real_listing()

    monkeypatch.setattr(checking, "list_pack_ids", listing_after_a_collects)
    result = fleet.b.check(read_data=True)
    assert collected and collected[0].packs_deleted + collected[0].packs_rewritten >= 1, collected
    assert result.errors == [], result.errors
    assert kept.backup_id in {r.backup_id for r in fleet.b.describe_backups(all_hosts=True).records}


@pytest.mark.parametrize("b_writes", ["backup", "copy"])
def test_the_reproduction_through_a_daemon_and_the_cli(
    xfs_dir: Path, tmp_path: Path, clock: StoreClock, monkeypatch: pytest.MonkeyPatch, b_writes: str
) -> None:
    """Issue 12's reproduction with real processes and the default grace period: host B's daemon writes
    into the store (a backup, or a copy) and is held right after a pack (a fault point in pause mode)
    while host A's CLI deletes X and collects, then collects again hours later by the store's clock
    (a clock file every process reads), B's lease renewed meanwhile. B ends AVAILABLE and restores."""
    store_clock = tmp_path / "store-clock"
    store_clock.write_text("0")
    monkeypatch.setenv("ZFSBACKD_TEST_STORE_CLOCK_FILE", str(store_clock))
    fleet = Fleet(xfs_dir, tmp_path, clock, b_home="shared" if b_writes == "backup" else "eu")
    data = yaml.safe_load(fleet.config_b.read_text())
    data["garbage_collection"]["lease_seconds"] = 6  # renewed every 2 s
    data["file_systems"][0]["automatic_backup_retention_days"] = 0  # no automatic backup at start
    fleet.config_b.write_text(yaml.safe_dump(data))
    x = fleet.a.create_backup(BackupRequest("fs-home"))
    source = fleet.b.create_backup(BackupRequest("fs-home")) if b_writes == "copy" else None  # in S2
    for pack in fleet.a_packs():  # X is yesterday's backup
        os.utime(pack, (pack.stat().st_mtime - 3 * HOUR,) * 2)
    x_packs = fleet.a_packs()

    hold = tmp_path / "release-b"
    monkeypatch.setenv(faults.ENV_VAR, f"pack-uploaded:{2 if b_writes == 'backup' else 1}:pause={hold}")
    daemon_b = DaemonProcess(fleet.config_b, tmp_path / "host-b")
    daemon_b.start()
    monkeypatch.delenv(faults.ENV_VAR)
    try:
        daemon_b.wait_ready()
        with DaemonClient(tmp_path / "host-b" / "control.sock") as client:
            if b_writes == "backup":
                written = client.call("CreateBackup", FileSystemId="fs-home")["Backup"]
            else:
                assert source is not None
                written = client.call("CopyBackup", SourceBackupId=source.backup_id, DestinationRegion="shared")
                written = written["Backup"]
        deadline = time.monotonic() + 120
        while not Path(f"{hold}.paused").exists():
            assert time.monotonic() < deadline, daemon_b.log_text()[-3000:]
            time.sleep(0.05)

        deleted = run_cli(fleet.config_a, "delete-backup", "--backup-id", x.backup_id)
        assert deleted.returncode == 0, deleted.stderr
        assert x_packs <= fleet.a_packs()
        store = fleet.a.store()

        def b_renewed_after(shift: float) -> None:
            store_clock.write_text(str(shift))
            now = store.leases.store_now()
            deadline = time.monotonic() + 30
            while not [le for le in store.leases.leases() if le.host_name == "host-b" and le.renewed > now - 5]:
                assert time.monotonic() < deadline, "host-b's keeper did not renew its lease"
                time.sleep(0.2)

        b_renewed_after(2 * HOUR)  # the candidates are past the grace period; B still works
        held = run_cli(fleet.config_a, "gc")
        assert held.returncode == 0, held.stderr
        result = held.json["GarbageCollection"]
        assert (result["PacksDeleted"], result["PacksRewritten"]) == (0, 0) and result["PacksWaiting"] > 0, result
        assert x_packs <= fleet.a_packs()

        hold.touch()
        region = "local" if b_writes == "backup" else "shared"
        deadline = time.monotonic() + 300
        while (record := fleet.b.get_backup(written["BackupId"], region)).lifecycle != Lifecycle.AVAILABLE:
            assert record.lifecycle in (Lifecycle.CREATING, Lifecycle.PENDING, Lifecycle.COPYING), record
            assert time.monotonic() < deadline, daemon_b.log_text()[-3000:]
            time.sleep(0.2)
        assert record.stats.bytes_uploaded < 44 * MiB, "B did not deduplicate against X: the race was not tested"

        store_clock.write_text(str(4 * HOUR))
        freed = run_cli(fleet.config_a, "gc")
        assert freed.returncode == 0, freed.stderr
        assert freed.json["GarbageCollection"]["BytesFreed"] >= 4 * MiB, freed.json
        _restores_identical(fleet.b, record, region, fleet.src_b, tmp_path / "restored-b")
        assert fleet.a.check(read_data=True).errors == []
        daemon_b.signal(signal.SIGTERM)
        assert daemon_b.wait_exit(60) == 0
    finally:
        hold.touch()
        daemon_b.close()
