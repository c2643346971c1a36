"""The local tree cache (zfsbackd/store/treecache.py): incrementals and restores read parent trees
locally, every cached tree is verified by its id, the cache stays within its bound, and ``check``
still reads every tree from the store. Local stores on tmp_path: no root needed for most."""

from __future__ import annotations

import os
from pathlib import Path

import zstandard
from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.packs import pack_key
from zfsbackd.store.tree import parse_tree
from zfsbackd.store.treecache import TreeCache


def _source(root: Path) -> Path:
    src = root / "src"
    for d in range(20):
        (src / f"d{d:02d}").mkdir(parents=True)
        for f in range(5):
            (src / f"d{d:02d}" / f"f{f}").write_text(f"{d}/{f}\n")
    return src


def _tree_reads(engine: Engine) -> int:
    """How many ranged reads of packs the store served (trees are read that way, one per blob)."""
    return engine.store().objects.metrics.requests["get"]


def _verify(blob_id: bytes, plaintext: bytes) -> bool:
    return plaintext == b"tree:" + blob_id


def test_an_incremental_reads_its_parents_trees_locally(tmp_path: Path) -> None:
    src = _source(tmp_path)
    config = make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True})
    Engine(config).create_backup(BackupRequest("fs-src"))
    (src / "d03" / "f0").write_text("changed\n")

    fresh = Engine(config)  # a new process: only state_dir carries the cache
    before = _tree_reads(fresh)
    second = fresh.create_backup(BackupRequest("fs-src"))
    cache = fresh.store().tree_cache
    # The parent's trees it reads: the root's, the changed directory's, and the directory above it, whose
    # tree is made again (the other 19 are taken by their listings without their trees: the listing cache).
    assert cache is not None and cache.hits == 3, cache.hits
    assert cache.misses == 0
    assert second.stats.directories_listed_as_before == 20  # type: ignore[attr-defined]
    # Only the new packs' headers and records were read, no tree: far fewer gets than trees.
    assert _tree_reads(fresh) - before < 10
    assert second.stats.files == 100


def test_check_reads_trees_from_the_store_not_the_cache(tmp_path: Path) -> None:
    src = _source(tmp_path)
    config = make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True})
    engine = Engine(config)
    engine.create_backup(BackupRequest("fs-src"))
    assert engine.store().tree_cache is not None and engine.store().tree_cache.size > 0
    # Damage every tree blob in the store; the cache still has every tree.
    store = engine.store()
    store.load_index()
    for pack_id, entries in store.index.iter_packs():
        pack = tmp_path / "store" / pack_key(pack_id)
        data = bytearray(pack.read_bytes())
        for entry in entries:
            if entry.blob_type == BlobType.TREE:
                data[entry.offset + entry.length // 2] ^= 0xFF
        pack.write_bytes(bytes(data))
    assert Engine(config).check().errors, "check must notice trees the store no longer holds intact"


def test_a_damaged_or_forged_cache_entry_is_discarded_not_used(tmp_path: Path) -> None:
    cache = TreeCache(tmp_path / "trees", _verify)
    good, forged = b"\x01" * 32, b"\x02" * 32
    cache.put(good, b"tree:" + good)
    cache.put(forged, b"not what its name says")  # e.g. written by someone without the id key
    cache.flush()
    assert cache.get(good) == b"tree:" + good
    assert cache.get(forged) is None and not Path(cache._path(forged)).exists()
    Path(cache._path(good)).write_bytes(b"garbage, not zstd")
    assert cache.get(good) is None and not Path(cache._path(good)).exists()
    assert cache.get(b"\x03" * 32) is None


def test_the_cache_stays_within_its_bound_dropping_the_least_recently_used(tmp_path: Path) -> None:
    ids = [bytes([i]) * 32 for i in range(40)]
    cache = TreeCache(tmp_path / "trees", _verify, max_bytes=20_000)
    for n, blob_id in enumerate(ids):
        cache.put(blob_id, b"tree:" + blob_id + os.urandom(1000))  # incompressible: ~1 KiB each on disk
        cache.flush()
        if n == 0:
            continue
        os.utime(cache._path(ids[n - 1]), (n, n))  # a strict age order, oldest first
    assert cache.size <= 20_000
    assert not Path(cache._path(ids[0])).exists(), "the least recently used went first"
    assert Path(cache._path(ids[-1])).exists()


def test_a_hit_makes_the_tree_recently_used(tmp_path: Path) -> None:
    cache = TreeCache(tmp_path / "trees", _verify)
    blob_id = b"\x05" * 32
    cache.put(blob_id, b"tree:" + blob_id)
    cache.flush()
    os.utime(cache._path(blob_id), (1, 1))
    assert cache.get(blob_id) == b"tree:" + blob_id
    cache.flush()  # (touched by the writer thread)
    assert os.stat(cache._path(blob_id)).st_mtime > 1_000_000_000


def test_a_killed_writers_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    cache = TreeCache(tmp_path / "trees", _verify)
    blob_id = b"\x07" * 32
    cache.put(blob_id, b"tree:" + blob_id)
    cache.flush()
    stray = Path(cache._path(blob_id)).parent / ".tmp-deadbeef00000000"
    stray.write_bytes(b"half")
    reopened = TreeCache(tmp_path / "trees", _verify)
    assert not stray.exists() and reopened.get(blob_id) == b"tree:" + blob_id


def test_trees_written_by_a_backup_are_cached_as_they_are_written(tmp_path: Path) -> None:
    src = _source(tmp_path)
    config = make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True})
    engine = Engine(config)
    record = engine.create_backup(BackupRequest("fs-src"))
    cache = engine.store().tree_cache
    assert cache is not None
    root = cache.get(bytes.fromhex(record.root_tree or ""))
    assert root is not None
    (top,) = parse_tree(root, what="root")
    assert top["name"] == "." and cache.get(bytes.fromhex(top["subtree"])) is not None


def test_a_backups_new_trees_are_cached_as_compressed_for_the_store(tmp_path: Path) -> None:
    """A tree a backup writes is compressed once: the cache keeps the store's zstd frame of it as it is
    (and still verifies it by its id on every read); a tree that was already stored is cached from its
    plaintext."""
    cache = TreeCache(tmp_path / "trees", _verify)
    blob_id = b"\x05" * 32
    plaintext = b"tree:" + blob_id
    frame = zstandard.ZstdCompressor(level=1).compress(plaintext)
    cache.put(blob_id, frame, compressed=True)
    cache.flush()
    assert Path(cache._path(blob_id)).read_bytes() == frame
    assert cache.get(blob_id) == plaintext

    src = _source(tmp_path)
    engine = Engine(make_config(tmp_path, {"src": src}, extra_fs={"allow_copy_snapshots": True}))
    backup = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    assert store.tree_cache is not None
    store.tree_cache.flush()
    root = bytes.fromhex(backup.root_tree or "")
    stored = store.read_tree(root, what="root", cached=False)
    assert Path(store.tree_cache._path(root)).read_bytes() == store.codec.compress(stored).data
    assert store.read_tree(root, what="root") == stored
