"""The blob index: blob id → where it lives (pack, offset, length).

Persisted as immutable ``index/<id>`` objects. A backup writes checkpoints as
it goes (so an interrupted backup's packs are known), garbage collection
replaces them all with one consolidated object. This module encodes and
decodes them; the index a process queries is an on-disk cache of them
(zfsbackd.store.indexcache), not Python objects.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable
from typing import NamedTuple

import zstandard

from zfsbackd.errors import IntegrityError
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.crypto import Sealer
from zfsbackd.store.packs import ENTRY, PackEntry, decode_entries, encode_entries

INDEX_PREFIX = "index/"
INDEX_AAD = b"zfsbackd index v1"
_PACK_HEAD = struct.Struct("<32sI")


class Location(NamedTuple):
    pack_id: bytes
    offset: int
    length: int
    raw_length: int
    blob_type: BlobType


def new_index_key() -> str:
    return INDEX_PREFIX + secrets.token_hex(16)


def encode_index(packs: Iterable[tuple[bytes, list[PackEntry]]], sealer: Sealer) -> bytes:
    """Seal the index object for ``packs`` (pairs, streamed: only the compressed body is held)."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    parts = []
    for pack_id, entries in packs:
        parts.append(compressor.compress(_PACK_HEAD.pack(pack_id, len(entries)) + encode_entries(entries)))
    parts.append(compressor.flush())
    return sealer.seal(b"".join(parts), INDEX_AAD)


def decode_index(sealed: bytes, sealer: Sealer, *, what: str) -> dict[bytes, list[PackEntry]]:
    # A stream decompressor: objects written before streaming have a content size in the frame
    # header, streamed ones (garbage collection's consolidated index) do not.
    body = zstandard.ZstdDecompressor().decompressobj()
    raw = body.decompress(sealer.open(sealed, INDEX_AAD, what=what))
    if not body.eof:
        raise IntegrityError(f"{what} is truncated (its compressed body ends early)")
    packs: dict[bytes, list[PackEntry]] = {}
    pos = 0
    while pos < len(raw):
        if pos + _PACK_HEAD.size > len(raw):
            raise IntegrityError(f"{what} is truncated")
        pack_id, count = _PACK_HEAD.unpack_from(raw, pos)
        pos += _PACK_HEAD.size
        end = pos + count * ENTRY.size
        packs[pack_id] = decode_entries(raw[pos:end], what=what)
        pos = end
    return packs
