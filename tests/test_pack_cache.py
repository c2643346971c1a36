"""Planned reads (zfsbackd/store/packcache.py): packs read in bounded spans, each dropped after its last blob."""

from __future__ import annotations

import random
from pathlib import Path

from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.objectstore.memory import MemoryRegions
from zfsbackd.store import packcache
from zfsbackd.store.packcache import SPAN_BYTES, PackCache
from zfsbackd.store.tree import parse_tree

KiB, MiB = 1024, 1024 * 1024


def test_a_pack_read_in_order_is_held_one_span_at_a_time(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    contents = {f"f{i:02d}": rng.randbytes(300 * KiB) for i in range(40)}  # 12 MiB: one pack
    for name, data in contents.items():
        (src / name).write_bytes(data)
    regions = MemoryRegions()
    engine = Engine(make_config(tmp_path / "host", {"src": src}, extra_fs={"allow_copy_snapshots": True}),
                    objects=regions.open)
    record = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    (top,) = parse_tree(store.read_tree(bytes.fromhex(record.root_tree or ""), what="root"), what="root")
    nodes = parse_tree(store.read_tree(bytes.fromhex(top["subtree"]), what="top"), what="top")
    chunks = {n["name"]: [bytes.fromhex(c[2]) for c in n["chunks"]] for n in nodes}
    wanted = [blob for name in sorted(contents) for blob in chunks[name]]

    reads: list[int] = []
    original = store.objects.get_range
    store.objects.get_range = lambda key, offset, length: reads.append(length) or original(key, offset, length)  # type: ignore[method-assign]
    packs = PackCache(store, wanted)
    held = 0
    by_offset = sorted(wanted, key=lambda blob: packs.location(blob).offset)  # type: ignore[union-attr]
    plaintexts = {}
    for blob in by_offset:
        plaintexts[blob] = store.read_blob(blob, what="test", packs=packs)
        held = max(held, len(packs._loaded))
    assert b"".join(plaintexts[b] for name in sorted(contents) for b in chunks[name]) == b"".join(
        contents[name] for name in sorted(contents)
    )
    assert held == 1  # one span at a time, never the whole pack
    assert all(length <= SPAN_BYTES for length in reads)
    assert 3 <= len(reads) <= 12 * MiB // SPAN_BYTES + 2  # a few spans, not a request per blob
    assert not packs._loaded  # every span was let go after its last blob


def test_a_pack_of_which_little_is_wanted_is_read_blob_by_blob(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(packcache, "WHOLE_PACK_SHARE", 2.0)  # never enough of a pack wanted
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(100 * KiB))
    regions = MemoryRegions()
    engine = Engine(make_config(tmp_path / "host", {"src": src}, extra_fs={"allow_copy_snapshots": True}),
                    objects=regions.open)
    record = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    root = bytes.fromhex(record.root_tree or "")
    packs = PackCache(store, [root])
    assert packs._span_of == {}
    assert parse_tree(store.read_blob(root, what="root", packs=packs), what="root")
