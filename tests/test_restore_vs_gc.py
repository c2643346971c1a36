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
from zfsbackd.engine.locks import StoreBusy
from zfsbackd.errors import IntegrityError
from zfsbackd.objectstore.base import ObjectStore

MiB = 1024 * 1024


def _two_backups(src: Path, tmp_path: Path) -> tuple[Engine, str, str, dict]:
    """B1 holds keep.bin and gone.bin in one pack; B2 only keep.bin (and new.bin)."""
    rng = random.Random(11)
    (src / "keep.bin").write_bytes(rng.randbytes(3 * MiB))
    (src / "gone.bin").write_bytes(rng.randbytes(3 * MiB))
    engine = Engine(make_config(tmp_path / "host-a", {"src": src}, grace=0))
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


def _on_first_pack_read(objects: ObjectStore, action: Callable[[], None]) -> None:
    """Run ``action`` once, just before the first read of a pack (the restore already planned)."""
    done = threading.Event()
    for name in ("get", "get_range"):
        original = getattr(objects, name)

        def wrapped(key: str, *args: object, _original: Callable = original) -> bytes:
            if key.startswith("data/") and not done.is_set():
                done.set()
                action()
            return _original(key, *args)

        setattr(objects, name, wrapped)


def test_restore_survives_collection_by_another_host(xfs_dir: Path, tmp_path: Path) -> None:
    engine, b1, b2, manifest = _two_backups(xfs_dir, tmp_path)
    other = _other_host(tmp_path)
    results = []
    _on_first_pack_read(engine.store().objects, lambda: results.append(other.delete_backup(b1)))
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(b2, target).path
    assert results, "collection ran in the middle of the restore"
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

    _on_first_pack_read(engine.store().objects, try_collect)
    target = tmp_path / "restore"
    target.mkdir()
    assert tree_manifest(engine.restore_backup(b2, target).path) == manifest
    assert len(attempts) == 1 and "garbage collection runs once it is done" in str(attempts[0])
    same_host.delete_backup(b1)  # once the restore is done, collection runs
    assert same_host.check(read_data=True).errors == []


def test_backup_deleted_while_restoring_is_a_clear_error(xfs_dir: Path, tmp_path: Path) -> None:
    engine, _b1, b2, _manifest = _two_backups(xfs_dir, tmp_path)
    other = _other_host(tmp_path)
    _on_first_pack_read(engine.store().objects, lambda: other.delete_backup(b2))
    target = tmp_path / "restore"
    target.mkdir()
    with pytest.raises(IntegrityError) as raised:
        engine.restore_backup(b2, target)
    assert "was deleted while it was being restored" in raised.value.message
    assert raised.value.exit_code == 6
