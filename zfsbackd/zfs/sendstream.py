"""Which objects an incremental ZFS send stream touches, read from its record headers alone.

``lzc_send(snap, from, fd)`` writes, in object-number order, a record for every
block born after ``from``: the dnode of every object in a changed block of the
meta-dnode (``DRR_OBJECT``, with the bonus buffer as payload), every changed data
block (``DRR_WRITE``, ``DRR_WRITE_EMBEDDED``, ``DRR_SPILL``), and what was freed
(``DRR_FREE``, ``DRR_FREEOBJECTS``). Its cost follows the changed blocks, not the
number of files, and it resolves no path: that is why it is the change list of
choice (see :meth:`zfsbackd.snapshot.zfs.ZfsSnapshot.changes_since`).

Every record is a fixed 312-byte ``dmu_replay_record_t`` (``include/sys/zfs_ioctl.h``),
followed by a payload whose length depends on the record type (the header's
``drr_payloadlen`` is only filled in for ``DRR_BEGIN``). This module reads the
headers from a pipe through a 1 MiB buffer, skips data payloads, and hands out the
object numbers in batches, with what the bonus buffer of each ZPL object says
(mode, size, owner, times, links: :class:`ZplAttributes`), which lets the caller
tell a changed object from an unchanged neighbour in the same dnode block.

It trusts nothing: every record after ``DRR_BEGIN`` must carry the stream's
``toguid`` at its type's offset (a misread length would put garbage there), the
stream must be native-endian and end with ``DRR_END``, and a record type it does
not know ends the parse with :class:`StreamFormatError` — the caller then falls
back to the walk, never to a partial list. Memory is bounded by
the batch size: the caller keeps only what it finds changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from zfsbackd.zfs import libzfs_core as lzc
from zfsbackd.zfs import zap

#: sizeof(dmu_replay_record_t): every record's header, whatever its type
RECORD_SIZE = 312
DMU_BACKUP_MAGIC = 0x2F5BACBAC
#: the stream's blocks are encrypted as on disk (a raw stream of an encrypted dataset)
DMU_BACKUP_FEATURE_RAW = 1 << 24
READ_BUFFER = 1 << 20
#: the pipe from lzc_send: big enough that the kernel writes in large steps while we parse
PIPE_SIZE = 1 << 20
#: raw: the blocks as they are on disk (no decompression, and no key needed for an encrypted dataset)
SEND_FLAGS = ("raw",)

(
    DRR_BEGIN,
    DRR_OBJECT,
    DRR_FREEOBJECTS,
    DRR_WRITE,
    DRR_FREE,
    DRR_END,
    DRR_WRITE_BYREF,
    DRR_SPILL,
    DRR_WRITE_EMBEDDED,
    DRR_OBJECT_RANGE,
    DRR_REDACT,
) = range(11)

RECORD_NAMES = {
    DRR_BEGIN: "BEGIN",
    DRR_OBJECT: "OBJECT",
    DRR_FREEOBJECTS: "FREEOBJECTS",
    DRR_WRITE: "WRITE",
    DRR_FREE: "FREE",
    DRR_END: "END",
    DRR_WRITE_BYREF: "WRITE_BYREF",
    DRR_SPILL: "SPILL",
    DRR_WRITE_EMBEDDED: "WRITE_EMBEDDED",
    DRR_OBJECT_RANGE: "OBJECT_RANGE",
    DRR_REDACT: "REDACT",
}

#: Offset of drr_toguid in each record (from the start of the record: 8 bytes of type and
#: payload length come first). Every record but BEGIN carries it; it is what proves the parse
#: is still aligned.
_TOGUID_AT = {
    DRR_OBJECT: 40,
    DRR_FREEOBJECTS: 24,
    DRR_WRITE: 40,
    DRR_FREE: 32,
    DRR_END: 40,
    DRR_WRITE_BYREF: 32,
    DRR_SPILL: 24,
    DRR_WRITE_EMBEDDED: 32,
    DRR_OBJECT_RANGE: 24,
    DRR_REDACT: 32,
}
#: Records of changed data of one object (drr_object is their first field). DRR_FREE is not one:
#: the stream frees the tail of every object it sends, and freed content changes the dnode anyway.
_DATA_RECORDS = frozenset({DRR_WRITE, DRR_WRITE_BYREF, DRR_SPILL, DRR_WRITE_EMBEDDED, DRR_REDACT})
#: objects per batch handed to the caller
BATCH_OBJECTS = 20_000
DMU_OT_SA = 44
SA_MAGIC = 0x2F505A

_HEAD = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_BEGIN = struct.Struct("<QQQIIQQ")  # magic, versioninfo, creation_time, type, flags, toguid, fromguid
#: From byte 8 of an OBJECT record: drr_object, drr_type (@16), drr_bonustype (@20), drr_bonuslen (@28),
#: drr_raw_bonuslen (@36), drr_toguid (@40)
_OBJECT = struct.Struct("<QII4xI4xIQ")
#: From byte 16 of a WRITE_EMBEDDED record: drr_offset, drr_compression (@40), drr_etype (@41), drr_lsize (@48),
#: drr_psize (@52)
_EMBEDDED = struct.Struct("<Q16xBB6xII")
BP_EMBEDDED_TYPE_DATA = 0
#: From byte 8 of a WRITE record: drr_object, drr_type (@16), drr_offset (@24), drr_logical_size (@32),
#: drr_toguid (@40), drr_compressiontype (@50)
_WRITE = struct.Struct("<QI4xQQQ2xB")
#: A directory's block 0 is kept (:attr:`ObjectBatch.directories`) while a stream's kept blocks are below this
MAX_DIRECTORY_BYTES = 64 << 20
#: The first attributes of a ZPL object's system-attribute bonus in the order zfs_mknode() registers
#: them (module/os/linux/zfs/zfs_znode_os.c): MODE SIZE GEN UID GID PARENT FLAGS ATIME[2] MTIME[2]
#: CTIME[2] CRTIME[2] LINKS. A layout is only believed once a file of it matched its stat (the caller).
_ZPL_PREFIX = struct.Struct("<16Q")
_NS = 1_000_000_000


class StreamFormatError(ValueError):
    """The stream is not one this parser understands exactly (its records are then not trusted)."""


class TooManyChanges(Exception):
    """More changed than a change list is worth; the caller walks instead."""


class StreamAbandoned(Exception):
    """The caller set ``stop``: the stream was not read to its end."""


class ZplAttributes(NamedTuple):
    """A ZPL object's attributes from its bonus buffer, if its SA layout is zfs_mknode's."""

    layout: int
    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    links: int

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` (the object's stat in the stream's snapshot) says exactly the same."""
        return (self.mode, self.size, self.uid, self.gid, self.mtime_ns, self.ctime_ns, self.links) == (
            st.st_mode,
            st.st_size,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_nlink,
        )

    def as_stat(self, inode: int, dev: int) -> os.stat_result:
        """What ``lstat`` of the object (number *inode*, on device *dev*) says in the stream's snapshot: the
        fields :meth:`matches` compares, the others 0 (``st_atime``, ``st_rdev``, ``st_blocks``...)."""
        mtime, ctime = self.mtime_ns, self.ctime_ns
        integer_times = (0, mtime // _NS, ctime // _NS)  # st_atime, st_mtime, st_ctime as indexed
        float_times = (0.0, mtime / _NS, ctime / _NS)
        fields = (self.mode, inode, dev, self.links, self.uid, self.gid, self.size, *integer_times, *float_times)
        return os.stat_result((*fields, 0, mtime, ctime))


def zpl_attributes(
    bonus: memoryview | bytes | bytearray, offset: int = 0, length: int | None = None
) -> ZplAttributes | None:
    """Decode a system-attribute bonus buffer laid out in zfs_mknode's order (``length`` bytes of *bonus* from
    *offset*, by default all of it); None if it cannot be."""
    if length is None:
        length = len(bonus) - offset
    if length < 8 or _U32.unpack_from(bonus, offset)[0] != SA_MAGIC:
        return None
    info = _U16.unpack_from(bonus, offset + 4)[0]
    header = ((info >> 10) & 0x3F) << 3
    if header < 8 or length < header + _ZPL_PREFIX.size:
        return None
    v = _ZPL_PREFIX.unpack_from(bonus, offset + header)
    return ZplAttributes(info & 0x3FF, v[0], v[1], v[3], v[4], v[9] * _NS + v[10], v[11] * _NS + v[12], v[15])


@dataclass
class ObjectBatch:
    """The objects of one stretch of the stream."""

    objects: set[int] = field(default_factory=set)
    """Every object with an OBJECT record or a data record."""
    data_objects: set[int] = field(default_factory=set)
    """Those with a data record (WRITE, WRITE_EMBEDDED, SPILL, ...): changed for certain."""
    attributes: dict[int, ZplAttributes] = field(default_factory=dict)
    """What the OBJECT records of ZPL objects say (not for raw streams of encrypted datasets)."""
    directories: dict[int, zap.DirectoryBlock] = field(default_factory=dict)
    """Block 0 of each directory whose entries changed, as sent: a microzap's is its whole listing
    (:func:`zfsbackd.zfs.zap.directory_entries`). Not kept for encrypted (raw) streams, nor past
    ``MAX_DIRECTORY_BYTES`` a stream."""


@dataclass
class StreamSummary:
    """What one incremental stream held, for the log and the benchmark."""

    records: dict[str, int] = field(default_factory=dict)
    """Count per record type."""
    objects: int = 0
    stream_bytes: int = 0
    features: int = 0
    """DMU_BACKUP_FEATURE_* bits of the stream (compressed, large blocks, raw, ...)."""
    toguid: int = 0
    fromguid: int = 0
    seconds: float = 0.0


def _payload_size(kind: int, rec: memoryview) -> int:
    """The payload length after a record of type *kind* (the DRR_*_PAYLOAD_SIZE macros)."""
    if kind == DRR_OBJECT:
        raw_bonuslen = _U32.unpack_from(rec, 36)[0]
        if raw_bonuslen:
            return raw_bonuslen
        bonuslen = _U32.unpack_from(rec, 28)[0]
        return (bonuslen + 7) & ~7
    if kind == DRR_WRITE:
        compressed = rec[50] != 0  # drr_compressiontype
        return _U64.unpack_from(rec, 96 if compressed else 32)[0]  # drr_compressed_size : drr_logical_size
    if kind == DRR_SPILL:
        compressed_size = _U64.unpack_from(rec, 40)[0]
        return compressed_size or _U64.unpack_from(rec, 16)[0]  # else drr_length
    if kind == DRR_WRITE_EMBEDDED:
        psize = _U32.unpack_from(rec, 52)[0]
        return (psize + 7) & ~7
    if kind == DRR_BEGIN:
        return _U32.unpack_from(rec, 4)[0]  # drr_payloadlen: the BEGIN nvlist, when there is one
    return 0


class _Reader:
    """Buffered reads of exact lengths from a file descriptor, with cheap skips."""

    def __init__(self, fd: int, stop: threading.Event | None) -> None:
        self.fd = fd
        self.stop = stop
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.total = 0

    def _read(self, into: memoryview) -> int:
        if self.stop is not None and self.stop.is_set():
            raise StreamAbandoned()
        got = os.readv(self.fd, [into])
        self.total += got
        return got

    def fill(self, need: int) -> bool:
        """Make *need* bytes available at ``start``; False at a clean end of stream before any of them."""
        if need > len(self.buf):
            raise StreamFormatError(f"a record of {need} bytes is larger than any this parser reads")
        if self.start + need > len(self.buf):
            remaining = self.end - self.start
            self.buf[:remaining] = self.buf[self.start : self.end]
            self.start, self.end = 0, remaining
        while self.end - self.start < need:
            got = self._read(self.view[self.end :])
            if got == 0:
                if self.end == self.start:
                    return False
                raise StreamFormatError(f"stream truncated: {self.end - self.start} of {need} bytes of a record")
            self.end += got
        return True

    def take(self, nbytes: int) -> memoryview | None:
        """The next *nbytes* (valid until the next call), or None at the end of the stream."""
        if not self.fill(nbytes):
            return None
        data = self.view[self.start : self.start + nbytes]
        self.start += nbytes
        return data

    def skip(self, nbytes: int) -> None:
        buffered = min(nbytes, self.end - self.start)
        self.start += buffered
        nbytes -= buffered
        while nbytes > 0:
            got = self._read(self.view[: min(nbytes, len(self.buf))])
            if got == 0:
                raise StreamFormatError(f"stream truncated inside a payload ({nbytes} bytes missing)")
            nbytes -= got
        if self.start == self.end:
            self.start = self.end = 0


class StreamReader:
    """One incremental send stream read from *fd*, object batch by object batch (:meth:`batches`).

    Raises :class:`StreamFormatError` on anything unexpected (a full stream, a compound stream,
    another endianness, an unknown record type, a record out of place) and
    :class:`StreamAbandoned` once *stop* is set. ``summary`` is complete once the batches are.
    """

    def __init__(self, fd: int, stop: threading.Event | None = None) -> None:
        self._reader = _Reader(fd, stop)
        self.summary = StreamSummary()
        self._directory_bytes = 0  # of the directory blocks kept (MAX_DIRECTORY_BYTES)

    def _begin(self) -> None:
        first = self._reader.take(RECORD_SIZE)
        if first is None:
            raise StreamFormatError("empty stream")
        kind = _HEAD.unpack_from(first, 0)[0]
        if kind != DRR_BEGIN:
            raise StreamFormatError(f"stream starts with record type {kind}, not BEGIN")
        magic, versioninfo, _ctime, _type, _flags, toguid, fromguid = _BEGIN.unpack_from(first, 8)
        if magic != DMU_BACKUP_MAGIC:
            raise StreamFormatError(f"bad magic {magic:#x} (a stream of another endianness is not expected here)")
        if versioninfo & 3 != 1:  # DMU_SUBSTREAM: lzc_send of one snapshot
            raise StreamFormatError("compound stream (only single-snapshot streams are parsed)")
        if fromguid == 0:
            raise StreamFormatError("full stream (a change list needs an incremental one)")
        self.summary.toguid, self.summary.fromguid, self.summary.features = toguid, fromguid, versioninfo >> 2
        self._reader.skip(_payload_size(DRR_BEGIN, first))

    def batches(self, batch_objects: int = BATCH_OBJECTS) -> Iterator[ObjectBatch]:
        """The stream's objects, at most *batch_objects* per batch, up to its END record.

        Runs once per record (tens of thousands for a scattered 1 % churn), so the two records
        that make up most of a stream, OBJECT and WRITE, are read with one ``unpack_from`` each
        and their payloads skipped in the buffer without a call; everything else goes through
        the general rules of :func:`_payload_size`.
        """
        reader, summary = self._reader, self.summary
        self._begin()
        counts = dict.fromkeys(RECORD_NAMES, 0)
        counts[DRR_BEGIN] = 1
        toguid = summary.toguid
        batch = ObjectBatch()
        objects, data_objects, attributes = batch.objects, batch.data_objects, batch.attributes
        directories = batch.directories
        directory_objects: set[int] = set()
        keep_directories = not summary.features & DMU_BACKUP_FEATURE_RAW  # (raw: encrypted blocks)
        while True:
            if reader.end - reader.start < RECORD_SIZE and not reader.fill(RECORD_SIZE):
                raise StreamFormatError("stream ended without an END record")
            buf, at = reader.buf, reader.start  # the record is read in place, not sliced out
            reader.start = at + RECORD_SIZE
            kind = _U32.unpack_from(buf, at)[0]
            if kind == DRR_OBJECT:
                obj, dmu_type, bonustype, bonuslen, raw_bonuslen, guid = _OBJECT.unpack_from(buf, at + 8)
                size = raw_bonuslen or (bonuslen + 7) & ~7
            elif kind == DRR_WRITE:
                obj, dmu_type, offset, logical, guid, compression = _WRITE.unpack_from(buf, at + 8)
                size = _U64.unpack_from(buf, at + 96)[0] if compression else logical  # drr_compressed_size
                if dmu_type == zap.DMU_OT_DIRECTORY_CONTENTS and offset == 0 and keep_directories:
                    kept = self._directory_block(compression, logical, size)
                    if kept is not None:
                        directories[obj] = kept
                        size = 0  # (its payload is taken)
            else:
                rec = memoryview(buf)[at : at + RECORD_SIZE]
                where = _TOGUID_AT.get(kind)
                if where is None:
                    raise StreamFormatError(f"record type {kind} at byte {reader.total} is not one this parser knows")
                guid = _U64.unpack_from(rec, where)[0]
                obj = _U64.unpack_from(rec, 8)[0] if kind in _DATA_RECORDS else -1
                size = _payload_size(kind, rec)
                if kind == DRR_WRITE_EMBEDDED and obj in directory_objects and keep_directories:
                    offset, compression, etype, logical, _psize = _EMBEDDED.unpack_from(rec, 16)
                    if offset == 0 and etype == BP_EMBEDDED_TYPE_DATA:
                        kept = self._directory_block(compression, logical, size)
                        if kept is not None:
                            directories[obj] = kept
                            size = 0
            if guid != toguid:
                raise StreamFormatError(f"{RECORD_NAMES[kind]} record at byte {reader.total} is out of place")
            counts[kind] += 1
            if kind == DRR_END:
                break
            if kind == DRR_OBJECT:
                objects.add(obj)
                if dmu_type == zap.DMU_OT_DIRECTORY_CONTENTS:
                    directory_objects.add(obj)  # (for its WRITE_EMBEDDED records, which do not give the type)
                if size and bonustype == DMU_OT_SA and not raw_bonuslen:  # a ZPL object's attributes
                    if reader.end - reader.start < size and not reader.fill(size):
                        raise StreamFormatError("stream truncated inside a bonus buffer")
                    found = zpl_attributes(reader.buf, reader.start, bonuslen)
                    if found is not None:
                        attributes[obj] = found
            elif obj >= 0:  # a data record
                objects.add(obj)
                data_objects.add(obj)
            if size:
                if reader.end - reader.start > size:
                    reader.start += size
                else:
                    reader.skip(size)
            if len(objects) >= batch_objects:
                summary.objects += len(objects)
                yield batch
                batch = ObjectBatch()
                objects, data_objects, attributes = batch.objects, batch.data_objects, batch.attributes
                directories = batch.directories
        if reader.take(1) is not None:
            raise StreamFormatError("data after the END record")
        summary.objects += len(objects)
        summary.records = {RECORD_NAMES[k]: n for k, n in counts.items() if n}
        summary.stream_bytes = reader.total
        yield batch


    def _directory_block(self, compression: int, logical: int, size: int) -> zap.DirectoryBlock | None:
        """The payload of a directory's block 0 (the next *size* bytes), taken from the stream while the
        stream's budget lasts; None (the payload is then skipped) past it."""
        if logical > zap.MZAP_MAX_BLOCK or size > logical or self._directory_bytes + size > MAX_DIRECTORY_BYTES:
            return None  # (larger than a microzap: a fat ZAP's block)
        payload = self._reader.take(size)
        if payload is None:
            raise StreamFormatError("stream truncated inside a directory block")
        self._directory_bytes += size
        return zap.DirectoryBlock(compression, logical, bytes(payload))


@contextmanager
def incremental_stream(snapshot: bytes, base: bytes, stop: threading.Event | None = None) -> Iterator[StreamReader]:
    """The incremental stream from *base* (a snapshot or a bookmark) to *snapshot*, being written by ``lzc_send``.

    The kernel writes into a pipe on a thread of its own (``lzc_send`` releases the GIL) while the
    caller reads the headers; leaving the block early closes our end, so the send fails with EPIPE
    and that thread ends. A failure of the send itself is raised (its ``ZFSError``) when the
    reading went well: a stream that broke off is a truncated stream to the reader anyway.
    """
    started = time.monotonic()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default size works too
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            lzc.lzc_send(snapshot, base, write_fd, list(SEND_FLAGS))
        except BaseException as exc:  # reported by the reader, after the join
            failure.append(exc)
        finally:
            os.close(write_fd)

    sender = threading.Thread(target=send, name="zfsbackd-send-stream", daemon=True)
    sender.start()
    stream = StreamReader(read_fd, stop)
    try:
        yield stream
    finally:
        os.close(read_fd)  # a sender still writing (we stopped early) now fails with EPIPE and ends
        sender.join()
    if failure:
        raise failure[0]
    stream.summary.seconds = time.monotonic() - started
