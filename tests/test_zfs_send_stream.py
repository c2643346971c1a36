"""The send-stream parser and the object map, on synthetic streams and maps (no ZFS, no root).

The real streams of OpenZFS 2.1 and 2.3 are parsed in tests/zfsvm/test_zfs_send_stream_vm.py;
here every record type, payload rule and refusal is checked byte by byte.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from zfsbackd.snapshot import zfs as zfs_snapshot
from zfsbackd.snapshot import zfs_objmap
from zfsbackd.snapshot.zfs_objmap import ObjectMap
from zfsbackd.zfs import sendstream as ss

TOGUID, FROMGUID = 0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321


def record(kind: int, fields: dict[int, tuple[str, int]], payload: bytes = b"") -> bytes:
    """One 312-byte record with ``fields`` {offset: (struct format, value)} set, then its payload."""
    buf = bytearray(ss.RECORD_SIZE)
    struct.pack_into("<I", buf, 0, kind)
    for offset, (fmt, value) in fields.items():
        struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(buf) + payload


def begin(fromguid: int = FROMGUID, versioninfo: int = 1 | (1 << 24) << 2, nvlist: bytes = b"") -> bytes:
    fields = {8: ("Q", ss.DMU_BACKUP_MAGIC), 16: ("Q", versioninfo), 40: ("Q", TOGUID), 48: ("Q", fromguid)}
    if nvlist:
        fields[4] = ("I", len(nvlist))
    return record(ss.DRR_BEGIN, fields, nvlist)


def obj(number: int, bonuslen: int = 0, raw_bonuslen: int = 0) -> bytes:
    size = raw_bonuslen or (bonuslen + 7) & ~7
    fields = {8: ("Q", number), 28: ("I", bonuslen), 36: ("I", raw_bonuslen), 40: ("Q", TOGUID)}
    return record(ss.DRR_OBJECT, fields, b"b" * size)


def write(number: int, logical: int, compressed: int = 0) -> bytes:
    fields = {8: ("Q", number), 32: ("Q", logical), 40: ("Q", TOGUID)}
    if compressed:
        fields.update({50: ("B", 2), 96: ("Q", compressed)})
    return record(ss.DRR_WRITE, fields, b"w" * (compressed or logical))


def end() -> bytes:
    return record(ss.DRR_END, {40: ("Q", TOGUID)})


def parse(stream: bytes, batch_objects: int = 1000) -> tuple[list[ss.ObjectBatch], ss.StreamSummary]:
    read_fd, write_fd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_fd, stream) if stream else None, os.close(write_fd)))
    writer.start()
    try:
        reader = ss.StreamReader(read_fd)
        return list(reader.batches(batch_objects)), reader.summary
    finally:
        os.close(read_fd)
        writer.join()


def sa_bonus(mode: int, size: int, uid: int, gid: int, mtime: tuple[int, int], ctime: tuple[int, int], links: int,
             layout: int = 2, lengths: int = 1) -> bytes:
    """A system-attribute bonus buffer in zfs_mknode's order, with ``lengths`` variable-length sizes in its header."""
    header_size = (8 + 2 * (lengths - 1) + 7) & ~7
    header = struct.pack("<IH", ss.SA_MAGIC, layout | (header_size >> 3) << 10).ljust(header_size, b"\0")
    attrs = struct.pack("<16Q", mode, size, 7, uid, gid, 34, 0, 1, 2, *mtime, *ctime, 5, 6, links)
    return header + attrs + b"acl-bytes"


def sa_obj(number: int, bonus: bytes, raw: bool = False) -> bytes:
    fields = {8: ("Q", number), 20: ("I", ss.DMU_OT_SA), 28: ("I", len(bonus)), 40: ("Q", TOGUID)}
    if raw:
        fields[36] = ("I", 320)
        bonus = bonus.ljust(320, b"x")
    return record(ss.DRR_OBJECT, fields, bonus.ljust((len(bonus) + 7) & ~7, b"\0"))


def test_every_record_type_and_payload_rule() -> None:
    stream = b"".join(
        [
            begin(nvlist=b"n" * 24),
            obj(7, bonuslen=13),  # payload rounded up to 16
            obj(8, bonuslen=168, raw_bonuslen=320),  # raw: the whole bonus area
            record(ss.DRR_FREEOBJECTS, {8: ("Q", 9), 16: ("Q", 3), 24: ("Q", TOGUID)}),
            write(7, 131072),
            write(10, 131072, compressed=4096),
            record(ss.DRR_FREE, {8: ("Q", 11), 32: ("Q", TOGUID)}),
            record(ss.DRR_SPILL, {8: ("Q", 12), 16: ("Q", 512), 24: ("Q", TOGUID)}, b"s" * 512),
            record(ss.DRR_SPILL, {8: ("Q", 13), 16: ("Q", 512), 24: ("Q", TOGUID), 40: ("Q", 24)}, b"s" * 24),
            record(ss.DRR_WRITE_EMBEDDED, {8: ("Q", 14), 32: ("Q", TOGUID), 52: ("I", 37)}, b"e" * 40),
            record(ss.DRR_OBJECT_RANGE, {8: ("Q", 0), 16: ("Q", 32), 24: ("Q", TOGUID)}),
            end(),
        ]
    )
    (batch,), summary = parse(stream)
    assert batch.objects == {7, 8, 10, 12, 13, 14}, "FREE, FREEOBJECTS and OBJECT_RANGE name no changed object"
    assert batch.data_objects == {7, 10, 12, 13, 14}
    assert batch.attributes == {}, "no SA bonus buffer here"
    assert summary.objects == 6
    assert summary.records == {
        "BEGIN": 1, "OBJECT": 2, "FREEOBJECTS": 1, "WRITE": 2, "FREE": 1, "SPILL": 2, "WRITE_EMBEDDED": 1,
        "OBJECT_RANGE": 1, "END": 1,
    }  # fmt: skip
    assert summary.stream_bytes == len(stream)
    assert (summary.toguid, summary.fromguid, summary.features) == (TOGUID, FROMGUID, 1 << 24)


def test_large_payloads_are_skipped_through_a_small_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ss, "READ_BUFFER", 1024)
    stream = begin() + write(5, 3 * 1024 * 1024) + obj(6, bonuslen=200) + end()
    (batch,), _ = parse(stream)
    assert batch.objects == {5, 6}


def test_records_and_bonus_buffers_straddling_refills_parse_as_with_a_big_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parser reads OBJECT and WRITE records in place in its buffer: a record or a bonus buffer that
    crosses a refill gives the same objects and attributes as with a buffer that holds the whole stream."""
    stream = begin() + b"".join(
        sa_obj(n, sa_bonus(0o100644, n, 0, 0, (n, 1), (n, 2), 1)) + write(n, 700 + n) for n in range(1, 60)
    )
    stream += end()
    (big,), _ = parse(stream)
    monkeypatch.setattr(ss, "READ_BUFFER", 1000)  # a multiple of nothing here: records straddle every refill
    (small,), summary = parse(stream)
    assert small == big and len(big.attributes) == 59 and big.data_objects == set(range(1, 60))
    assert big.attributes[7].ctime_ns == 7 * 10**9 + 2 and summary.stream_bytes == len(stream)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"", "empty stream"),
        (obj(1) + end(), "not BEGIN"),
        (begin(fromguid=0) + end(), "full stream"),
        (begin(versioninfo=2) + end(), "compound stream"),
        (record(ss.DRR_BEGIN, {8: ("Q", 0x0CABAC5B2F000000), 48: ("Q", 1)}) + end(), "bad magic"),
        (begin() + obj(1), "without an END"),
        (begin() + record(42, {}) + end(), "record type 42"),
        (begin() + record(ss.DRR_OBJECT, {8: ("Q", 1), 40: ("Q", 99)}) + end(), "out of place"),
        (begin() + write(5, 4096)[:-100], "inside a payload"),
        (begin() + obj(1)[:200], "truncated"),
        (begin() + end() + end(), "after the END"),
    ],
)
def test_anything_unexpected_is_refused_not_half_read(stream: bytes, message: str) -> None:
    with pytest.raises(ss.StreamFormatError, match=message):
        parse(stream)


def test_objects_come_in_bounded_batches() -> None:
    stream = begin() + b"".join(obj(n) for n in range(1, 26)) + end()
    batches, summary = parse(stream, batch_objects=10)
    assert [len(b.objects) for b in batches] == [10, 10, 5]
    assert set().union(*(b.objects for b in batches)) == set(range(1, 26)) and summary.objects == 25


def test_zpl_bonus_buffers_are_decoded_and_raw_ones_are_not() -> None:
    bonus = sa_bonus(0o100644, 4096, 1000, 100, (1700000000, 5), (1700000100, 999999999), 2, lengths=3)
    stream = begin() + sa_obj(40, bonus) + sa_obj(41, bonus, raw=True) + end()
    (batch,), _ = parse(stream)
    assert batch.objects == {40, 41}
    assert batch.attributes == {
        40: ss.ZplAttributes(2, 0o100644, 4096, 1000, 100, 1700000000_000000005, 1700000100_999999999, 2)
    }, "the header's size is honoured; an encrypted (raw) bonus is not read"


def test_changed_directories_are_those_the_map_found_changed_with_ids_a_stat_gives() -> None:
    """``ChangeSet.directories``: the trusted attributes of the changed directories only; not those of files,
    of unchanged neighbours in the same dnode block, or with a FUID of a domain as owner (a stat maps it)."""
    attributes = ss.ZplAttributes(2, 0o040755, 3, 1000, 100, 5, 6, 2)
    trusted = {
        10: attributes,
        11: attributes,  # (sent with 10: not changed)
        12: attributes._replace(mode=0o100644),
        13: attributes._replace(uid=1 << 32 | 1000),
        14: attributes._replace(gid=1 << 32 | 100),
    }
    assert zfs_snapshot._changed_directories(trusted, [10, 12, 13, 14, 15]) == {10: attributes}


@pytest.mark.parametrize(
    "bonus",
    [
        b"",  # none
        b"\0" * 200,  # not SA_MAGIC
        struct.pack("<IH", ss.SA_MAGIC, 2 | 1 << 10).ljust(60, b"\0"),  # too short for the attributes
        struct.pack("<IH", ss.SA_MAGIC, 2).ljust(200, b"\0"),  # a header size of 0
    ],
)
def test_bonus_buffers_that_are_not_zpl_attributes_are_left_alone(bonus: bytes) -> None:
    assert ss.zpl_attributes(memoryview(bonus)) is None


def test_stop_abandons_the_parse() -> None:
    stop = threading.Event()
    stop.set()
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(ss.StreamAbandoned):
            list(ss.StreamReader(read_fd, stop).batches())
    finally:
        os.close(read_fd)
        os.close(write_fd)


# ------------------------------------------------------------------ the object map


def entries(*pairs: tuple[str, int]) -> list[tuple[bytes, int, int]]:
    return [(name.encode(), number, number * 10) for name, number in pairs]


def test_paths_follow_parents_and_every_hard_link(tmp_path: Path) -> None:
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("pool/fs", 0, entries(("a", 2), ("link", 9)))
    objmap.archived("pool/fs", 2, entries(("b", 3), ("file", 4)))
    objmap.archived("pool/fs", 3, entries(("deep", 5), ("other-link", 9)))
    objmap.archived("pool/fs/child", 0, entries(("a", 2)))  # another dataset: its own object numbers
    assert not objmap.describes("snap-1"), "nothing is visible before the commit"
    objmap.commit("snap-1")
    assert objmap.describes("snap-1") and not objmap.describes("snap-2")
    assert objmap.paths("pool/fs", [5, 9, 4, 77]) == {b"a/b/deep", b"link", b"a/b/other-link", b"a/file"}
    assert objmap.paths("pool/fs/child", [2]) == {b"a"}


def test_objects_with_the_ctime_of_the_map_are_unchanged(tmp_path: Path) -> None:
    """Compared with the stream's ctimes: unchanged when every row of the object has the ctime known (a hard
    link whose rows disagree is changed, with all its names); the same object number in another dataset
    is another object."""
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("fs", 0, [*entries(("a", 2), ("b", 3), ("c", 4)), (b"h1", 5, 50), (b"h2", 5, 51)])
    objmap.archived("other", 0, [(b"a", 2, 99)])
    objmap.commit("s")
    paths, changed, names = objmap.changes("fs", [2, 3, 4, 5, 9], {2: 20, 3: 31, 5: 50, 9: 90})
    assert paths == {b"b", b"c", b"h1", b"h2"}
    assert changed == {3, 4, 5, 9}  # 9 is new: no name in the map, but changed all the same
    assert names == {3: [b"b"], 4: [b"c"], 5: [b"h1", b"h2"]}
    assert objmap.changes("other", [2], {2: 99}) == (set(), set(), {})


def test_a_listing_replaces_the_directory_and_orphans_resolve_nowhere(tmp_path: Path) -> None:
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("fs", 0, entries(("d", 2), ("e", 3)))
    objmap.archived("fs", 2, entries(("x", 10), ("y", 11)))
    objmap.commit("s1")
    objmap.archived("fs", 0, entries(("e", 3)))  # d removed (with x and y moved out first)
    objmap.archived("fs", 3, entries(("x", 10)))
    objmap.commit("s2")
    assert objmap.paths("fs", [10, 11, 2]) == {b"e/x"}, "rows below a vanished directory name nothing"


def test_an_uncommitted_backup_leaves_the_map_of_the_base(tmp_path: Path) -> None:
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("fs", 0, entries(("a", 2)))
    objmap.commit("s1")
    objmap.archived("fs", 0, entries(("b", 2)))
    assert objmap.paths("fs", [2]) == {b"a"}, "readers see the committed map while a backup writes"
    objmap.rollback()
    assert objmap.describes("s1") and objmap.paths("fs", [2]) == {b"a"}
    objmap.commit(None)  # a backup whose walk could not list a directory
    assert not objmap.describes("s1")


@pytest.mark.parametrize("batch", [2, zfs_objmap.WRITE_BATCH])
def test_changed_directories_are_written_in_batches_and_only_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Rows of changed directories are written together, a batch at a time (2: one after nearly each
    directory) or at the commit; a directory listed whole after them sees them; a rollback drops them."""
    monkeypatch.setattr(zfs_objmap, "WRITE_BATCH", batch)
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("fs", 0, entries(("d", 2), ("e", 3)))
    objmap.archived("fs", 2, entries(("x", 10), ("y", 11)))
    objmap.commit("s1")
    objmap.changed("fs", 2, entries(("z", 12), ("y", 13)), {b"x"})  # x deleted, z new, y replaced
    objmap.changed("fs", 0, entries(("f", 4)), set())
    objmap.archived("fs", 3, entries(("w", 14)))  # written after the rows kept so far
    assert objmap.paths("fs", [12]) == set(), "nothing is visible before the commit"
    objmap.commit("s2")
    assert objmap.paths("fs", [10, 11, 12, 13, 4, 14]) == {b"d/z", b"d/y", b"f", b"e/w"}
    objmap.changed("fs", 0, entries(("g", 5)), {b"f"})
    objmap.rollback()
    objmap.commit("s3")
    assert objmap.paths("fs", [4, 5]) == {b"f"}, "the rolled-back backup's rows were never written"


def test_a_parent_cycle_resolves_nowhere(tmp_path: Path) -> None:
    objmap = ObjectMap(tmp_path / "m")
    objmap.archived("fs", 2, entries(("x", 3)))
    objmap.archived("fs", 3, entries(("y", 2), ("f", 4)))
    objmap.commit("s")
    assert objmap.paths("fs", [4]) == set()


def test_a_corrupt_map_is_discarded_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "m"
    objmap = ObjectMap(path)
    objmap.archived("fs", 0, entries(("a", 2)))
    objmap.commit("s")
    path.write_bytes(b"not a database" * 100)
    again = ObjectMap(path)
    assert not again.describes("s")
    assert not path.exists(), "deleted, so the next full walk builds a new one"
    again.archived("fs", 0, entries(("a", 2)))
    again.commit("s2")
    assert not again.describes("s2"), "this process no longer writes a map it found broken"
