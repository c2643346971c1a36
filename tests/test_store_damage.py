"""Damage stays local (DESIGN invariants 3, 4, 7, 8): each kind of store object, damaged each way.

One template store holds two backups of one source: B1 (``a/`` with ``a.bin`` and
``a/only1.bin``) and B2 (``a/a.bin`` again, plus ``b/b.bin``; ``only1.bin`` removed),
and a second store (another key) supplies "another store's object". Every case
copies the template, damages one object — flipped byte, truncated, deleted,
swapped for another object of the same store, replaced by another store's
object — and asserts the exact error class / exit code, that what the damage
does not touch still restores identical, that ``check`` names the damage, and
that garbage collection never deletes more because of it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from enginekit import make_config, run_cli, store_bytes, write_config
from fsfixtures import LoopFs, remove_tree, tree_manifest

from zfsbackd.config import load_config
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import EXIT_INTEGRITY, IntegrityError
from zfsbackd.store.index import INDEX_PREFIX, Location
from zfsbackd.store.indexcache import BlobIndex
from zfsbackd.store.packs import pack_key
from zfsbackd.store.records import RECORD_FORMAT, BackupRecord, RecordFormatError, record_key
from zfsbackd.store.tree import node_name, parse_tree

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Template:
    root: Path
    b1: str
    b2: str
    manifest1: dict
    manifest2: dict
    other_store: Path


@pytest.fixture(scope="module")
def template(xfs_fs: LoopFs, tmp_path_factory: pytest.TempPathFactory) -> Template:
    root = tmp_path_factory.mktemp("damage-template")
    src = xfs_fs.mountpoint / "damage-src"
    if src.exists():
        remove_tree(src)
    (src / "a").mkdir(parents=True)
    rng = random.Random(7)
    (src / "a" / "a.bin").write_bytes(rng.randbytes(300 * KiB))
    (src / "a" / "only1.bin").write_bytes(rng.randbytes(1 * MiB))
    engine = Engine(make_config(root, {"src": src}, grace=0))
    b1 = engine.create_backup(BackupRequest("fs-src"))
    manifest1 = tree_manifest(src)
    (src / "a" / "only1.bin").unlink()
    (src / "b").mkdir()
    (src / "b" / "b.bin").write_bytes(rng.randbytes(2 * MiB))
    b2 = engine.create_backup(BackupRequest("fs-src"))
    manifest2 = tree_manifest(src)

    other_root = tmp_path_factory.mktemp("damage-other")
    Engine(make_config(other_root, {"src": src}, grace=0)).create_backup(BackupRequest("fs-src"))
    remove_tree(src)
    return Template(root, b1.backup_id, b2.backup_id, manifest1, manifest2, other_root / "store")


@dataclass
class Case:
    """A copy of the template store with its own config and state directory."""

    engine: Engine
    config: Path
    store: Path
    tmp: Path
    t: Template

    def restore(self, backup_id: str, name: str) -> dict:
        target = self.tmp / name
        target.mkdir()
        return tree_manifest(self.engine.restore_backup(backup_id, target).path)

    def objects(self, prefix: str) -> list[Path]:
        base = self.store / prefix
        return sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))

    def pack_of_file(self, backup_id: str, *path: bytes) -> Path:
        """The pack holding the first chunk of file ``path`` in ``backup_id``."""
        return self.store / pack_key(self.first_chunk(backup_id, *path).pack_id)

    def first_chunk(self, backup_id: str, *path: bytes) -> Location:
        node = self.node(backup_id, *path)
        loc = self.engine.store().index.get(bytes.fromhex(node["chunks"][0][2]))
        assert loc is not None
        return loc

    def node(self, backup_id: str, *path: bytes) -> dict:
        store = self.engine.store()
        store.load_index()
        record = store.load_record(backup_id)
        nodes = parse_tree(store.read_blob(bytes.fromhex(record.root_tree or ""), what="root"), what="root")
        tree = nodes[0]["subtree"]
        node: dict = {}
        for part in path:
            nodes = parse_tree(store.read_blob(bytes.fromhex(tree), what="t"), what="t")
            (node,) = [n for n in nodes if node_name(n) == part]
            tree = node.get("subtree", "")
        return node


@pytest.fixture
def case(template: Template, tmp_path: Path) -> Case:
    shutil.copy2(template.root / "store.key", tmp_path / "store.key")
    shutil.copytree(template.root / "store", tmp_path / "store")
    config = write_config(tmp_path, {"src": tmp_path / "no-source"}, grace=0)
    return Case(Engine(load_config(config)), config, tmp_path / "store", tmp_path, template)


def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(3).randbytes(path.stat().st_size))


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": flip, "truncate": truncate, "garbage": garbage}


# --------------------------------------------------------------------- index objects
@pytest.mark.parametrize("how", ["flip", "truncate", "garbage", "other-store", "delete"])
def test_damaged_index_object_costs_nothing(case: Case, how: str) -> None:
    indexes = case.objects(INDEX_PREFIX)
    assert indexes
    for index in indexes:
        if how == "delete":
            index.unlink()
        elif how == "other-store":
            (other,) = list((case.t.other_store / INDEX_PREFIX).iterdir())[:1]
            shutil.copyfile(other, index)
        else:
            DAMAGE[how](index)

    # Every backup restores identical: the packs are re-read from their own headers.
    assert case.restore(case.t.b1, "r1") == case.t.manifest1
    assert case.restore(case.t.b2, "r2") == case.t.manifest2
    # Reading wrote nothing into the store (restore and check are read-only).
    assert case.objects(INDEX_PREFIX) == ([] if how == "delete" else indexes)

    errors = case.engine.check(read_data=True).errors
    if how == "delete":
        assert errors == []
    else:
        assert len(errors) == len(indexes)
        assert all("index object" in e and "gc" in e for e in errors), errors

    # Collection replaces the damaged objects and frees nothing that is needed.
    result = case.engine.collect_garbage()
    assert result.skipped_reason is None
    assert case.engine.check(read_data=True).errors == []
    assert case.restore(case.t.b2, "r2-after-gc") == case.t.manifest2


# --------------------------------------------------------------------- backup records
def _damage_record(case: Case, how: str) -> None:
    path = case.store / record_key(case.t.b2)
    if how == "swap":  # B1's record stored under B2's key: sealed to another key, must not open
        shutil.copyfile(case.store / record_key(case.t.b1), path)
    elif how == "other-store":
        (other,) = list((case.t.other_store / "backups").iterdir())[:1]
        shutil.copyfile(other, path)
    else:
        DAMAGE[how](path)


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage", "swap", "other-store"])
def test_damaged_record_is_listed_as_an_error_and_the_rest_is_served(case: Case, how: str) -> None:
    _damage_record(case, how)
    size = store_bytes(case.store)

    page = case.engine.describe_backups()
    assert [r.backup_id for r in page.records] == [case.t.b1]
    assert [(u.backup_id, u.error.code) for u in page.unreadable] == [(case.t.b2, "IntegrityError")]
    assert case.restore(case.t.b1, "r1") == case.t.manifest1
    with pytest.raises(IntegrityError):
        case.engine.restore_backup(case.t.b2, case.tmp)

    errors = case.engine.check().errors
    assert len(errors) == 1 and case.t.b2 in errors[0], errors

    # B1's unique data (only1.bin) may be referenced by the unreadable record: nothing is collected.
    case.engine.delete_backup(case.t.b1)
    assert case.engine.collect_garbage().skipped_reason is not None
    assert store_bytes(case.store) == size

    # Deleting the damaged record replaces it with a tombstone, and collection runs again.
    assert case.engine.delete_backup(case.t.b2).lifecycle.value == "DELETED"
    assert case.engine.describe_backups().unreadable == []
    assert store_bytes(case.store) < size - MiB
    assert case.engine.check(read_data=True).errors == []


def test_damaged_record_through_the_cli(case: Case) -> None:
    _damage_record(case, "flip")
    listing = run_cli(case.config, "describe-backups")
    assert listing.returncode == 0, listing.stderr
    doc = listing.json
    assert [b["BackupId"] for b in doc["Backups"]] == [case.t.b1]
    (bad,) = doc["UnreadableBackups"]
    assert bad["BackupId"] == case.t.b2 and bad["Error"]["Code"] == "IntegrityError"

    check = run_cli(case.config, "check")
    assert check.returncode == EXIT_INTEGRITY
    assert any(case.t.b2 in e for e in check.json["Check"]["Errors"])

    restore = run_cli(case.config, "restore-backup", "--backup-id", case.t.b2, "--target", str(case.tmp))
    assert restore.returncode == EXIT_INTEGRITY, restore.stderr
    assert restore.error["Code"] == "IntegrityError" and case.t.b2 in restore.error["Message"]


def _rewrite_record(case: Case, backup_id: str, change: Callable[[dict], None]) -> None:
    store = case.engine.store()
    key = record_key(backup_id)
    data = json.loads(store.sealer.open((case.store / key).read_bytes(), key.encode(), what=key))
    change(data)
    store.objects.put(key, store.sealer.seal(json.dumps(data).encode(), key.encode()))


def test_newer_major_record_format_is_refused_per_record(case: Case) -> None:
    _rewrite_record(case, case.t.b2, lambda d: d.update(format=RECORD_FORMAT + 1, new_thing={"x": 1}))
    page = case.engine.describe_backups()
    assert [r.backup_id for r in page.records] == [case.t.b1]
    (bad,) = page.unreadable
    assert isinstance(bad.error, RecordFormatError) and bad.error.code == "UnsupportedRecordFormat"
    assert "upgrade zfsbackd" in bad.error.message
    assert case.engine.collect_garbage().skipped_reason is not None
    # A newer record is not damage: deleting it is refused, not turned into a tombstone.
    with pytest.raises(RecordFormatError):
        case.engine.delete_backup(case.t.b2)


def test_older_reader_keeps_unknown_fields_of_a_newer_minor_version(case: Case) -> None:
    _rewrite_record(
        case,
        case.t.b2,
        lambda d: d.update(future_field={"nested": [1, 2]}, stats={**d["stats"], "future_counter": 5}),
    )
    (_b1, b2) = case.engine.describe_backups().records
    assert b2.backup_id == case.t.b2 and b2.unknown_fields == {"future_field": {"nested": [1, 2]}}
    assert case.restore(case.t.b2, "r2") == case.t.manifest2
    case.engine.delete_backup(case.t.b2, collect=False)  # rewrites the record
    store = case.engine.store()
    key = record_key(case.t.b2)
    rewritten = json.loads(store.sealer.open((case.store / key).read_bytes(), key.encode(), what=key))
    assert rewritten["future_field"] == {"nested": [1, 2]} and rewritten["lifecycle"] == "DELETED"
    assert BackupRecord.from_json(json.dumps(rewritten).encode()).backup_id == case.t.b2


# --------------------------------------------------------------------------- packs
@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "swap", "other-store"])
def test_damaged_pack_costs_only_the_backups_that_need_it(case: Case, how: str) -> None:
    pack = case.pack_of_file(case.t.b2, b"b", b"b.bin")
    shared = case.pack_of_file(case.t.b1, b"a", b"a.bin")
    assert pack != shared
    if how == "delete":
        pack.unlink()
    elif how == "swap":
        shutil.copyfile(shared, pack)
    elif how == "other-store":
        others = [p for p in (case.t.other_store / "data").rglob("*") if p.is_file()]
        other = max(others, key=lambda p: p.stat().st_size)
        shutil.copyfile(other, pack)
    elif how == "flip":
        loc = case.first_chunk(case.t.b2, b"b", b"b.bin")
        flip(pack, offset=loc.offset + loc.length // 2)
    else:
        truncate(pack)

    assert case.restore(case.t.b1, "r1") == case.t.manifest1
    with pytest.raises(IntegrityError) as raised:
        case.engine.restore_backup(case.t.b2, case.tmp)
    message = raised.value.message
    assert case.t.b2 in message, message
    if how == "flip":  # only b.bin's chunk is damaged: the error names the file
        assert "/b/b.bin" in message, message
    # The failed restore was renamed, so it cannot be mistaken for a good one.
    assert not list(case.tmp.glob("zfsbackd-restore_*"))
    assert len(list(case.tmp.glob("zfsbackd-failed-restore_*"))) == 1

    errors = case.engine.check(read_data=True).errors
    assert errors and any(pack.name in e for e in errors), errors
    if how == "flip":  # the damaged blob's error names the backup and file that use it
        assert any(e.startswith(f"backup {case.t.b2}: /b/b.bin: ") for e in errors), errors
    size = store_bytes(case.store)
    case.engine.collect_garbage()
    assert store_bytes(case.store) <= size  # never grows; B1 stays whole
    assert case.restore(case.t.b1, "r1-after-gc") == case.t.manifest1


def test_damaged_pack_through_the_cli(case: Case) -> None:
    loc = case.first_chunk(case.t.b2, b"b", b"b.bin")
    flip(case.pack_of_file(case.t.b2, b"b", b"b.bin"), offset=loc.offset + loc.length // 2)
    ok = run_cli(case.config, "restore-backup", "--backup-id", case.t.b1, "--target", str(case.tmp))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli(case.config, "restore-backup", "--backup-id", case.t.b2, "--target", str(case.tmp))
    assert bad.returncode == EXIT_INTEGRITY, bad.stderr
    assert bad.error["Code"] == "IntegrityError" and "b/b.bin" in bad.error["Message"]
    check = run_cli(case.config, "check", "--read-data")
    assert check.returncode == EXIT_INTEGRITY
    assert any(case.t.b2 in e and "b/b.bin" in e for e in check.json["Check"]["Errors"])


# --------------------------------------------------------------------------- trees
def test_damaged_directory_tree_costs_only_its_backup(case: Case) -> None:
    store = case.engine.store()
    store.load_index()
    tree_id = bytes.fromhex(case.node(case.t.b2, b"b")["subtree"])
    loc = store.index.get(tree_id)
    assert loc is not None
    flip(case.store / pack_key(loc.pack_id), offset=loc.offset + loc.length // 2)

    assert case.restore(case.t.b1, "r1") == case.t.manifest1
    with pytest.raises(IntegrityError) as raised:
        case.engine.restore_backup(case.t.b2, case.tmp)
    assert case.t.b2 in raised.value.message
    errors = case.engine.check().errors
    assert any(case.t.b2 in e and "/b" in e for e in errors), errors
    # What the damaged tree references is unknown: collection deletes nothing until it is resolved.
    size = store_bytes(case.store)
    case.engine.delete_backup(case.t.b1)
    assert case.engine.collect_garbage().skipped_reason is not None
    assert store_bytes(case.store) == size


# ------------------------------------------------------------ leftovers of killed writers
def test_temporary_files_of_a_killed_writer_are_reported_and_collected(case: Case) -> None:
    pack_dir = case.pack_of_file(case.t.b2, b"b", b"b.bin").parent
    stale = pack_dir / ".tmp-0123456789abcdef"
    stale.write_bytes(b"half a pack")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    fresh = pack_dir / ".tmp-fedcba9876543210"  # a live writer's: left alone
    fresh.write_bytes(b"being written")

    result = case.engine.check()
    assert result.errors == []
    assert len(result.warnings) == 1 and stale.name in result.warnings[0]
    assert case.engine.collect_garbage(grace_seconds=3600).stale_writes_removed == 1
    assert not stale.exists() and fresh.exists()
    assert case.engine.check().warnings == []


def test_check_reports_every_kind_of_damage_in_one_run(case: Case) -> None:
    loc = case.first_chunk(case.t.b2, b"b", b"b.bin")
    pack = case.store / pack_key(loc.pack_id)
    flip(pack, offset=loc.offset + loc.length // 2)
    indexes = case.objects(INDEX_PREFIX)
    flip(indexes[0])
    _damage_record(case, "truncate")  # B2's record

    errors = case.engine.check(read_data=True).errors
    assert any("index object" in e for e in errors), errors
    assert any(case.t.b2 in e and "backup record" in e for e in errors), errors
    assert any(pack.name in e for e in errors), errors
    # And B1, which none of it touches, still restores identical.
    assert case.restore(case.t.b1, "r1") == case.t.manifest1


def test_check_names_the_file_of_a_blob_the_index_lacks(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """A referenced blob no index object and no pack header lists (a store damaged beyond its packs) is
    reported with the backup and file that use it, found by a second walk, not by holding a path per blob."""
    lost = bytes.fromhex(case.node(case.t.b2, b"b", b"b.bin")["chunks"][0][2])
    present = BlobIndex.present
    monkeypatch.setattr(BlobIndex, "present", lambda self, ids: present(self, ids) - {lost})
    errors = case.engine.check().errors
    assert f"backup {case.t.b2}: /b/b.bin: blob {lost.hex()} is missing from the store" in errors, errors
