"""Pack files: many sealed blobs followed by a sealed header that lists them.

Layout::

    blob_0 | blob_1 | … | sealed(header) | u32 header length | b"ZBP1"

The header makes every pack self-describing, so the index can always be
rebuilt from the packs alone (that is how an interrupted backup's uploaded
packs are found again and reused).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from zfsbackd.errors import IntegrityError
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.crypto import Sealer

MAGIC = b"ZBP1"
TRAILER = struct.Struct("<I4s")
ENTRY = struct.Struct("<B32sQQQ")  # type, blob id, offset, sealed length, plaintext length
HEADER_AAD = b"zfsbackd pack header v1"
# Read this much from the end of a pack to get the header in one request most of the time.
TAIL_GUESS = 64 * 1024


@dataclass(frozen=True, slots=True)
class PackEntry:
    blob_type: BlobType
    blob_id: bytes
    offset: int
    length: int
    raw_length: int


def pack_key(pack_id: bytes) -> str:
    hex_id = pack_id.hex()
    return f"data/{hex_id[:2]}/{hex_id}"


def pack_id_from_key(key: str) -> bytes | None:
    name = key.rsplit("/", 1)[-1]
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def pack_id_of(data: bytes | memoryview) -> bytes:
    """Pack ids are the (unkeyed) BLAKE3 of the whole pack, so ``check`` can verify a pack end to end."""
    return blake3.blake3(data, max_threads=1).digest()


def encode_entries(entries: list[PackEntry]) -> bytes:
    return b"".join(ENTRY.pack(e.blob_type, e.blob_id, e.offset, e.length, e.raw_length) for e in entries)


def decode_entries(raw: bytes, *, what: str) -> list[PackEntry]:
    if len(raw) % ENTRY.size:
        raise IntegrityError(f"{what}: header has a truncated entry")
    return [PackEntry(BlobType(t), bid, off, ln, raw_ln) for t, bid, off, ln, raw_ln in ENTRY.iter_unpack(raw)]


def build_trailer(entries: list[PackEntry], sealer: Sealer) -> bytes:
    header = sealer.seal(encode_entries(entries), HEADER_AAD)
    return header + TRAILER.pack(len(header), MAGIC)


def parse_header(tail: bytes, total_size: int, sealer: Sealer, *, what: str) -> tuple[list[PackEntry], int]:
    """Parse the header from the last bytes of a pack.

    Returns the entries, or ``([], needed)`` when ``tail`` is too short and
    ``needed`` bytes from the end must be fetched.
    """
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"{what} is truncated ({total_size} bytes)")
    header_len, magic = TRAILER.unpack(tail[-TRAILER.size :])
    if magic != MAGIC:
        raise IntegrityError(f"{what} is not a zfsbackd pack (bad trailer)")
    needed = header_len + TRAILER.size
    if needed > total_size:
        raise IntegrityError(f"{what}: header length {header_len} exceeds the pack size {total_size}")
    if needed > len(tail):
        return [], needed
    sealed = tail[-needed : -TRAILER.size]
    entries = decode_entries(sealer.open(sealed, HEADER_AAD, what=f"{what} header"), what=what)
    return entries, 0
