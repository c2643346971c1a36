"""Planned reads (zfsbackd/store/packcache.py): packs read in bounded spans, each dropped after its last blob."""

from __future__ import annotations

import random
from pathlib import Path

from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.objectstore.memory import MemoryRegions
from zfsbackd.store import packcache
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.index import Location
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


def test_a_blob_with_no_wanted_neighbour_is_read_by_itself(tmp_path: Path) -> None:
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


def _loc(pack: bytes, offset: int, length: int) -> Location:
    return Location(pack, offset, length, length, BlobType.DATA)


def test_spans_bridge_gaps_up_to_the_object_stores_gap_and_no_further() -> None:
    gap = 64 * KiB
    a, b = b"a" * 32, b"b" * 32
    wanted = [
        _loc(a, 0, 100), _loc(a, 100, 100),  # touching
        _loc(a, 200 + gap, 50),  # exactly the gap further: same span
        _loc(a, 250 + 2 * gap + 1, 10),  # one byte more than the gap: alone
        _loc(b, 0, 100),  # another pack: never in a span with pack a's blobs
        *(_loc(b, 1 * MiB + i * MiB, MiB) for i in range(5)),  # 5 MiB of touching blobs: two spans (4 + 1)
    ]
    span_of = packcache._plan_spans(gap, reversed(wanted))  # the order they are wanted in does not matter
    first = (a, 0, 250 + gap)
    assert {key: span for key, span in span_of.items() if key[0] == a} == {
        (a, 0): first, (a, 100): first, (a, 200 + gap): first,
    }
    assert span_of[(b, 1 * MiB)] == span_of[(b, 4 * MiB)] == (b, 1 * MiB, 4 * MiB)
    assert (b, 5 * MiB) not in span_of  # the fifth is alone after the first span filled up
    assert (b, 0) not in span_of  # 1 MiB before the next one: further than the gap
    assert all(length <= SPAN_BYTES for _pack, _start, length in span_of.values())


def test_restoring_part_of_a_pack_reads_it_in_spans_not_blob_by_blob(tmp_path: Path) -> None:
    """One directory of five, all of them in one pack: a fifth of the pack is wanted, in runs of blobs
    written together. It is read in a few requests, not one per file (before: 200)."""
    src = tmp_path / "src"
    rng = random.Random(4)
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(200):
            (src / f"d{d}" / f"f{i:03}").write_bytes(rng.randbytes(rng.randrange(64, 4 * KiB)))
    regions = MemoryRegions()
    engine = Engine(make_config(tmp_path / "host", {"src": src}, extra_fs={"allow_copy_snapshots": True}),
                    objects=regions.open)
    record = engine.create_backup(BackupRequest("fs-src"))
    objects = regions.stores["local"]
    reads_before = objects.metrics.requests["get"]
    target = tmp_path / "restore"
    target.mkdir()
    restored = engine.restore_backup(record.backup_id, target, paths=["d2"]).path
    assert sorted(p.name for p in (restored / "d2").iterdir()) == sorted(p.name for p in (src / "d2").iterdir())
    assert all((restored / "d2" / p.name).read_bytes() == p.read_bytes() for p in (src / "d2").iterdir())
    reads = objects.metrics.requests["get"] - reads_before
    assert reads <= 20, f"{reads} reads for 200 small files"
