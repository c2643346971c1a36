"""Directory listings from microzap blocks as a send stream carries them (no ZFS, no root).

Real directories' blocks, from real streams of OpenZFS 2.1 and 2.3, are compared with
``readdir`` in tests/zfsvm/test_zfs_send_stream_vm.py; here the block format, the
decompression and every refusal are checked byte by byte, and the parser's keeping of
directory blocks from a stream.
"""

from __future__ import annotations

import struct

import lz4.block
import pytest

from tests.test_zfs_send_stream import TOGUID, begin, end, parse, record
from zfsbackd.zfs import sendstream as ss
from zfsbackd.zfs import zap

DT_DIR, DT_REG, DT_LNK = 4, 8, 10
NOT_RAW = 1 | (1 << 22) << 2  # a compressed stream, not raw


def microzap(entries: list[tuple[bytes, int, int]], size: int = 1024, block_type: int = zap.ZBT_MICRO) -> bytes:
    """A microzap block of *size* bytes with (name, object, d_type) entries, free slots between them."""
    block = bytearray(size)
    struct.pack_into("<QQQ", block, 0, block_type, 0x5A17, 0)
    slot = 1
    for name, number, dtype in entries:
        struct.pack_into("<QIH50s", block, slot * 64, number | dtype << 60, 0, 0, name)
        slot += 2  # a free slot after each entry
    return bytes(block)


def lz4_zfs(data: bytes, pad_to: int = 512) -> bytes:
    """*data* compressed as ZFS stores an LZ4 block: its length, 4 bytes big-endian, first; padded to a sector."""
    packed = lz4.block.compress(data, store_size=False)
    out = struct.pack(">I", len(packed)) + packed
    return out.ljust(-(-len(out) // pad_to) * pad_to, b"\0")


ENTRIES = [(b"f000001.dat", 129, DT_REG), (b"sub", 7, DT_DIR), (b"report 1 \xc3\xa9.txt", 2**47 + 5, DT_LNK),
           (b"x" * 49, 300, DT_REG)]


@pytest.mark.parametrize("compression", ["none", "off", "lz4"])
def test_a_microzap_block_is_the_directory_listing(compression: str) -> None:
    data = microzap(ENTRIES)
    block = {
        "none": zap.DirectoryBlock(zap.ZIO_COMPRESS_NONE, len(data), data),
        "off": zap.DirectoryBlock(zap.ZIO_COMPRESS_OFF, len(data), data),
        "lz4": zap.DirectoryBlock(zap.ZIO_COMPRESS_LZ4, len(data), lz4_zfs(data)),
    }[compression]
    found = zap.directory_entries(block)
    assert found is not None
    assert sorted(found) == sorted(zap.DirectoryEntry(name, number, dtype) for name, number, dtype in ENTRIES)
    assert sorted(zap.StreamDirectories({9: block}).entries(9) or []) == sorted((n, o) for n, o, _t in ENTRIES)
    assert zap.StreamDirectories({9: block}).entries(10) is None


def test_an_empty_directory_has_no_entries() -> None:
    assert zap.microzap_entries(microzap([], size=512)) == []


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (microzap(ENTRIES, block_type=(1 << 63) + 1), "a fat ZAP's header block"),
        (microzap(ENTRIES, block_type=(1 << 63)), "a fat ZAP's leaf block"),
        (microzap(ENTRIES)[:-1], "not whole entries"),
        (microzap([])[:64], "a header alone"),
        (microzap([(b"a", 5, DT_REG), (b"a", 6, DT_REG)]), "a name twice"),
        (microzap([(b"a", 0, DT_REG)]), "object 0"),
        (microzap([(b"y" * 50, 5, DT_REG)]), "a name without its NUL"),
    ],
)
def test_anything_but_a_whole_microzap_is_refused(data: bytes, why: str) -> None:
    assert zap.microzap_entries(data) is None, why


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (zap.DirectoryBlock(3, 1024, b"\0" * 512), "LZJB: not decoded here"),
        (zap.DirectoryBlock(16, 1024, b"\0" * 512), "ZSTD: not decoded here"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_LZ4, 1024, b"\0\0\2\0" + b"\0" * 60), "a length past the payload"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_LZ4, 1024, b"\0\0"), "no length"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_LZ4, 1024, b"\0\0\0\x10" + b"\xff" * 16), "not LZ4"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_LZ4, 2048, lz4_zfs(microzap(ENTRIES))), "another logical size"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_NONE, 1024, microzap(ENTRIES, size=512)), "a short payload"),
        (zap.DirectoryBlock(zap.ZIO_COMPRESS_NONE, 256 * 1024, bytes(256 * 1024)), "larger than a microzap"),
    ],
)
def test_blocks_that_cannot_be_decoded_give_no_listing(block: zap.DirectoryBlock, why: str) -> None:
    assert zap.directory_entries(block) is None, why


def directory_write(number: int, data: bytes, offset: int = 0, dmu_type: int = zap.DMU_OT_DIRECTORY_CONTENTS,
                    compressed: bytes | None = None) -> bytes:
    fields = {8: ("Q", number), 16: ("I", dmu_type), 24: ("Q", offset), 32: ("Q", len(data)), 40: ("Q", TOGUID)}
    if compressed is not None:
        fields.update({50: ("B", zap.ZIO_COMPRESS_LZ4), 96: ("Q", len(compressed))})
    return record(ss.DRR_WRITE, fields, data if compressed is None else compressed)


def object_of_type(number: int, dmu_type: int) -> bytes:
    return record(ss.DRR_OBJECT, {8: ("Q", number), 16: ("I", dmu_type), 40: ("Q", TOGUID)})


def embedded(number: int, data: bytes, etype: int = ss.BP_EMBEDDED_TYPE_DATA) -> bytes:
    """A WRITE_EMBEDDED record: the block's LZ4 payload (at most 112 bytes) from its block pointer."""
    payload = lz4_zfs(data, pad_to=8)
    fields = {8: ("Q", number), 24: ("Q", len(data)), 32: ("Q", TOGUID), 40: ("B", zap.ZIO_COMPRESS_LZ4),
              41: ("B", etype), 48: ("I", len(data)), 52: ("I", len(payload))}
    return record(ss.DRR_WRITE_EMBEDDED, fields, payload)


def test_the_stream_keeps_block_0_of_changed_directories_only() -> None:
    listing, small = microzap(ENTRIES), microzap(ENTRIES[:1], size=512)
    stream = b"".join([
        begin(versioninfo=NOT_RAW),
        directory_write(5, listing),
        directory_write(6, listing, compressed=lz4_zfs(listing)),
        directory_write(7, listing, offset=16384),  # a fat ZAP's later block
        directory_write(8, listing, dmu_type=19),  # a plain file's data
        object_of_type(9, zap.DMU_OT_DIRECTORY_CONTENTS),
        embedded(9, small),  # a small directory's block, embedded in its block pointer
        object_of_type(10, 19),
        embedded(10, small),  # a plain file's embedded block
        object_of_type(11, zap.DMU_OT_DIRECTORY_CONTENTS),
        embedded(11, small, etype=1),  # not data (a redacted block's kind)
        end(),
    ])
    batches, _summary = parse(stream)
    kept = {number: block for batch in batches for number, block in batch.directories.items()}
    assert sorted(kept) == [5, 6, 9]
    assert sorted(batches[0].data_objects) == [5, 6, 7, 8, 9, 10, 11]
    assert zap.directory_entries(kept[9]) == [zap.DirectoryEntry(*ENTRIES[0])]
    for number in (5, 6):
        assert sorted(zap.directory_entries(kept[number]) or []) == sorted(zap.DirectoryEntry(*e) for e in ENTRIES)


def test_a_raw_stream_of_an_encrypted_dataset_keeps_no_directory_block() -> None:
    stream = begin(versioninfo=1 | (ss.DMU_BACKUP_FEATURE_RAW << 2)) + directory_write(5, microzap(ENTRIES)) + end()
    batches, _summary = parse(stream)
    assert batches[0].data_objects == {5}
    assert not batches[0].directories


def test_directory_blocks_past_the_budget_are_skipped_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    listing = microzap(ENTRIES)
    monkeypatch.setattr(ss, "MAX_DIRECTORY_BYTES", 2 * len(listing))
    stream = b"".join([begin(versioninfo=NOT_RAW), *(directory_write(n, listing) for n in (5, 6, 7)), end()])
    batches, _summary = parse(stream)
    assert sorted(batches[0].directories) == [5, 6]
    assert batches[0].objects == {5, 6, 7}
