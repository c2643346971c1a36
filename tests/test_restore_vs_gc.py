"""Restores are safe against garbage collection: on this host by the store lock, from another
host by collection's own write order (new packs and index before old ones are deleted).

"Another host" is an Engine with its own ``state_dir`` (so its locks are not ours) on the
same store; collection is triggered at an exact moment from inside the restore's first
pack read, so the race is deterministic.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from enginekit import make_config
from fsfixtures import tree_manifest

from zfsbackd.config import load_config
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import IntegrityError, StoreBusy
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.store.packs import pack_key
from zfsbackd.store.tree import node_name, parse_tree

MiB = 1024 * 1024


def _two_backups(src: Path, tmp_path: Path, **config: object) -> tuple[Engine, str, str, dict]:
    """B1 holds keep.bin and gone.bin in one pack; B2 only keep.bin (and new.bin)."""
    rng = random.Random(11)
    (src / "keep.bin").write_bytes(rng.randbytes(3 * MiB))
    (src / "gone.bin").write_bytes(rng.randbytes(3 * MiB))
    engine = Engine(make_config(tmp_path / "host-a", {"src": src}, grace=0, **config))
    b1 = engine.create_backup(BackupRequest("fs-src"))
    (src / "gone.bin").unlink()
    (src / "new.bin").write_bytes(rng.randbytes(MiB))
    b2 = engine.create_backup(BackupRequest("fs-src"))
    return engine, b1.backup_id, b2.backup_id, tree_manifest(src)


def _other_host(tmp_path: Path) -> Engine:
    """An engine on the same store and key with its own state directory (its own locks)."""
    data = yaml.safe_load((tmp_path / "host-a" / "zfsbackd.yaml").read_text())
    data["state_dir"] = str(tmp_path / "host-b-state")
    path = tmp_path / "host-b.yaml"
    path.write_text(yaml.safe_dump(data))
    return Engine(load_config(path))


def _pack_of(engine: Engine, backup_id: str, name: bytes) -> str:
    """The key of the pack holding the first chunk of top-level file ``name`` in ``backup_id``."""
    store = engine.store()
    record = store.load_record(backup_id)
    (top,) = parse_tree(store.read_tree(bytes.fromhex(record.root_tree or ""), what="root"), what="root")
    nodes = parse_tree(store.read_tree(bytes.fromhex(top["subtree"]), what="top"), what="top")
    (node,) = [n for n in nodes if node_name(n) == name]
    loc = store.index.get(bytes.fromhex(node["chunks"][0][2]))
    assert loc is not None
    return pack_key(loc.pack_id)


def _before_first_read_of(objects: ObjectStore, key: str, action: Callable[[], None]) -> None:
    """Run ``action`` once, just before the restore first reads pack ``key`` (every other read of
    that pack waits until it is done), so the race happens at the same point every run."""
    lock = threading.Lock()
    done = threading.Event()
    for name in ("get", "get_range"):
        original = getattr(objects, name)

        def wrapped(wanted: str, *args: object, _original: Callable = original) -> bytes:
            if wanted == key and not done.is_set():
                with lock:
                    if not done.is_set():
                        action()
                        done.set()
            return _original(wanted, *args)

        setattr(objects, name, wrapped)


def test_restore_survives_collection_by_another_host(xfs_dir: Path, tmp_path: Path) -> None:
    engine, b1, b2, manifest = _two_backups(xfs_dir, tmp_path)
    other = _other_host(tmp_path)
    results = []
    rewritten = _pack_of(engine, b2, b"keep.bin")  # B1 shares it (gone.bin): collection rewrites it
    _before_first_read_of(engine.store().objects, rewritten, lambda: results.append(other.delete_backup(b1)))
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(b2, target).path
    assert results, "collection ran in the middle of the restore"
    assert not (tmp_path / "host-a" / "store" / rewritten).exists(), "the pack the restore wanted was rewritten"
    assert tree_manifest(restored) == manifest
    assert other.check(read_data=True).errors == []


def test_collection_on_this_host_waits_for_a_restore(xfs_dir: Path, tmp_path: Path) -> None:
    engine, b1, b2, manifest = _two_backups(xfs_dir, tmp_path)
    same_host = Engine(engine.config)
    attempts: list[BaseException] = []

    def try_collect() -> None:
        with pytest.raises(StoreBusy) as busy:
            same_host.collect_garbage(wait=False)
        attempts.append(busy.value)

    _before_first_read_of(engine.store().objects, _pack_of(engine, b2, b"keep.bin"), try_collect)
    target = tmp_path / "restore"
    target.mkdir()
    assert tree_manifest(engine.restore_backup(b2, target).path) == manifest
    assert len(attempts) == 1 and "garbage collection runs once it is done" in str(attempts[0])
    same_host.delete_backup(b1)  # once the restore is done, collection runs
    assert same_host.check(read_data=True).errors == []


def test_backup_deleted_while_restoring_is_a_clear_error(xfs_dir: Path, tmp_path: Path) -> None:
    engine, _b1, b2, _manifest = _two_backups(xfs_dir, tmp_path)
    other = _other_host(tmp_path)
    only_b2 = _pack_of(engine, b2, b"new.bin")  # collected with B2
    _before_first_read_of(engine.store().objects, only_b2, lambda: other.delete_backup(b2))
    target = tmp_path / "restore"
    target.mkdir()
    with pytest.raises(IntegrityError) as raised:
        engine.restore_backup(b2, target)
    assert "was deleted while it was being restored" in raised.value.message
    assert raised.value.exit_code == 6


def test_copy_survives_collection_of_its_source_by_another_host(xfs_dir: Path, tmp_path: Path) -> None:
    """A copy reads its source's packs directly (to re-seal them): a pack collection moved while it
    ran is found again where its live blobs went, as a restore finds it (the fleet soak's failure)."""
    engine, b1, b2, manifest = _two_backups(xfs_dir, tmp_path, extra_regions={"eu": tmp_path / "store-eu"})
    other = _other_host(tmp_path)
    results = []
    rewritten = _pack_of(engine, b2, b"keep.bin")
    _before_first_read_of(engine.store().objects, rewritten, lambda: results.append(other.delete_backup(b1)))
    copy = engine.copy_backup(b2, destination_region="eu")
    assert results, "collection ran in the middle of the copy"
    assert not (tmp_path / "host-a" / "store" / rewritten).exists(), "the pack the copy wanted was rewritten"
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(copy.backup_id, target, region="eu").path
    assert tree_manifest(restored) == manifest
    assert engine.check(region="eu", read_data=True).errors == []
