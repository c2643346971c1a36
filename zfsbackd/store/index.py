"""The blob index: blob id → where it lives (pack, offset, length).

Persisted as immutable ``index/<id>`` objects. A backup writes checkpoints as
it goes (so an interrupted backup's packs are known), garbage collection
replaces them all with one consolidated object. The in-memory form is a dict
of tuples — compact enough for millions of blobs.
"""

from __future__ import annotations

import secrets
import struct
import threading
from collections.abc import Iterable, Iterator
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


def encode_index(packs: dict[bytes, list[PackEntry]], sealer: Sealer) -> bytes:
    parts = []
    for pack_id, entries in packs.items():
        parts.append(_PACK_HEAD.pack(pack_id, len(entries)))
        parts.append(encode_entries(entries))
    raw = zstandard.ZstdCompressor(level=3).compress(b"".join(parts))
    return sealer.seal(raw, INDEX_AAD)


def decode_index(sealed: bytes, sealer: Sealer, *, what: str) -> dict[bytes, list[PackEntry]]:
    raw = zstandard.ZstdDecompressor().decompress(sealer.open(sealed, INDEX_AAD, what=what))
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


class BlobIndex:
    """Thread-safe in-memory index of every blob in the store."""

    def __init__(self) -> None:
        self._blobs: dict[bytes, Location] = {}
        self._packs: dict[bytes, list[PackEntry]] = {}
        self._lock = threading.Lock()

    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        entries = list(entries)
        with self._lock:
            self._packs[pack_id] = entries
            for e in entries:
                self._blobs.setdefault(e.blob_id, Location(pack_id, e.offset, e.length, e.raw_length, e.blob_type))

    def remove_packs(self, pack_ids: Iterable[bytes]) -> None:
        """Forget packs (after garbage collection deleted them); blobs kept elsewhere stay known."""
        with self._lock:
            for pack_id in pack_ids:
                self._packs.pop(pack_id, None)
            self._blobs = {}
            for pack_id, entries in self._packs.items():
                for e in entries:
                    self._blobs.setdefault(e.blob_id, Location(pack_id, e.offset, e.length, e.raw_length, e.blob_type))

    def get(self, blob_id: bytes) -> Location | None:
        return self._blobs.get(blob_id)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def has_pack(self, pack_id: bytes) -> bool:
        return pack_id in self._packs

    def packs(self) -> dict[bytes, list[PackEntry]]:
        with self._lock:
            return dict(self._packs)

    def blob_ids(self) -> Iterator[bytes]:
        return iter(list(self._blobs))
