"""A ZFS directory's entries read from its ZAP block, as an incremental send stream carries it.

A ZPL directory is a ZAP object (``DMU_OT_DIRECTORY_CONTENTS``) mapping each name to a
directory entry: the object number in the low 48 bits, the file type (``IFTODT`` of the
mode, as ``d_type``) in the top 4 (``ZFS_DIRENT_OBJ`` / ``ZFS_DIRENT_TYPE``,
``include/sys/zfs_znode.h``). While a directory has at most a block's worth of entries
and every name is shorter than 50 bytes, the ZAP is a *microzap*: one block, all of it
(``include/sys/zap_impl.h``)::

    mzap_phys_t       64 bytes: mz_block_type = ZBT_MICRO, mz_salt, mz_normflags, mz_pad[5]
    mzap_ent_phys_t   64 bytes each, to the end of the block:
                      mze_value u64, mze_cd u32, mze_pad u16, mze_name[50] (NUL-terminated; empty: a free slot)

A send stream sends that block whole whenever an entry was added, removed or renamed,
so a microzap directory's block in the stream is its complete listing in the new
snapshot — what ``readdir`` would return, without listing it through ``.zfs/snapshot``.
Anything else (a fat ZAP's header or leaf block, a compression this module does not
decode, an encrypted block, a block that does not parse exactly) gives None, and the
caller lists the directory as before.
"""

from __future__ import annotations

import functools
import itertools
import operator
import struct
from typing import NamedTuple

import lz4.block

#: mz_block_type of a microzap's only block (ZBT_MICRO = (1ULL << 63) + 3)
ZBT_MICRO = (1 << 63) + 3
MZAP_ENTRY_SIZE = 64
MZAP_HEADER_SIZE = 64
#: DMU_OT_DIRECTORY_CONTENTS: the object type of a ZPL directory (and of an xattr directory)
DMU_OT_DIRECTORY_CONTENTS = 20
#: drr_compressiontype / drr_compression values decoded here (enum zio_compress); 0: sent as it is
ZIO_COMPRESS_NONE = 0
ZIO_COMPRESS_OFF = 2
ZIO_COMPRESS_LZ4 = 15
#: the largest microzap block (MZAP_MAX_BLKSZ = SPA_OLD_MAXBLOCKSIZE)
MZAP_MAX_BLOCK = 128 * 1024
_OBJECT_BITS = (1 << 48) - 1
_LE64 = struct.Struct("<Q")
_BE32 = struct.Struct(">I")


class DirectoryBlock(NamedTuple):
    """Block 0 of a directory object as a send stream's record carries it (the payload as sent)."""

    compression: int
    logical_size: int
    payload: bytes


class DirectoryEntry(NamedTuple):
    """One name of a directory, as ``readdir`` gives it: the object (= inode) number and ``d_type``."""

    name: bytes
    inode: int
    dtype: int


def block_data(block: DirectoryBlock) -> bytes | None:
    """The block's logical content, decompressed; None for a compression not decoded here or a bad payload.

    ZFS's LZ4 blocks start with the compressed length, 4 bytes big-endian (``lz4_compress_zfs``);
    the payload is padded to the sector size after it.
    """
    if not 0 < block.logical_size <= MZAP_MAX_BLOCK:
        return None
    if block.compression in (ZIO_COMPRESS_NONE, ZIO_COMPRESS_OFF):
        data = block.payload
    elif block.compression == ZIO_COMPRESS_LZ4:
        if len(block.payload) < 4:
            return None
        length = _BE32.unpack_from(block.payload)[0]
        if length + 4 > len(block.payload):
            return None
        try:
            data = lz4.block.decompress(block.payload[4 : 4 + length], uncompressed_size=block.logical_size)
        except lz4.block.LZ4BlockError:
            return None
    else:
        return None
    return data if len(data) == block.logical_size else None


def microzap_entries(data: bytes) -> list[DirectoryEntry] | None:
    """The entries of a microzap block, in no particular order; None if *data* is not exactly one.

    Checked: the block type, a whole number of 64-byte entries, every used name NUL-terminated
    inside its 50 bytes, no name twice, no object number 0.
    """
    used = _microzap_used(data)
    if used is None:
        return None
    return [DirectoryEntry(name, value & _OBJECT_BITS, value >> 60) for name, value in used]


def microzap_names(data: bytes) -> list[tuple[bytes, int]] | None:
    """:func:`microzap_entries` as (name, object number) pairs, without a ``DirectoryEntry`` each."""
    used = _microzap_used(data)
    return None if used is None else [(name, value & _OBJECT_BITS) for name, value in used]


def _microzap_used(data: bytes) -> list[tuple[bytes, int]] | None:
    """(name, mze_value) of each used slot of a microzap block (see :func:`microzap_entries`).

    All slots are unpacked by one ``struct`` call and each used one costs one comprehension step:
    a directory's listing is read for every directory a backup splices (a few hundred per backup).
    """
    if len(data) < 2 * MZAP_HEADER_SIZE or len(data) % MZAP_HEADER_SIZE:
        return None
    if _LE64.unpack_from(data)[0] != ZBT_MICRO:
        return None
    flat = _slots(len(data) // MZAP_ENTRY_SIZE - 1).unpack_from(data, MZAP_HEADER_SIZE)
    try:
        used = [(raw[: raw.index(0)], value) for value, raw in zip(flat[0::2], flat[1::2], strict=True) if raw[0]]
    except ValueError:  # a name without its NUL
        return None
    objects = map(operator.and_, map(_VALUE, used), itertools.repeat(_OBJECT_BITS))  # (checked in C, not per step)
    if 0 in objects or len(set(map(_NAME, used))) != len(used):
        return None
    return used


_NAME, _VALUE = operator.itemgetter(0), operator.itemgetter(1)


@functools.lru_cache(maxsize=16)
def _slots(count: int) -> struct.Struct:
    """``count`` entries' (mze_value, mze_name) at once (a block has 2**n / 64 - 1 of them)."""
    return struct.Struct("<" + "Q6x50s" * count)


def directory_entries(block: DirectoryBlock) -> list[DirectoryEntry] | None:
    """A directory's complete listing from its block 0 as sent, when that block is a microzap; else None."""
    data = block_data(block)
    return None if data is None else microzap_entries(data)


class StreamDirectories:
    """The directories whose block 0 an incremental stream carried, by object number: each one's
    complete listing, when that block is a microzap (:class:`zfsbackd.snapshot.base.DirectoryListings`)."""

    def __init__(self, blocks: dict[int, DirectoryBlock]) -> None:
        self._blocks = blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def entries(self, inode: int) -> list[tuple[bytes, int]] | None:
        """The (name, inode) of every entry of directory *inode* in the stream's snapshot, in no order;
        None when the stream did not carry its listing."""
        block = self._blocks.get(inode)
        data = None if block is None else block_data(block)
        return None if data is None else microzap_names(data)
