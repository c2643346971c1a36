"""Blob encoding: compress when it pays, then seal with the blob id as associated data."""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import NamedTuple

import zstandard

from zfsbackd.errors import IntegrityError
from zfsbackd.store.crypto import BlobHasher, Sealer

_RAW = 0
_ZSTD = 1
_ZSTD_LEVEL = 1
# Compress a sample first for large blobs: incompressible data (media, archives,
# encrypted files) then costs a 16 KiB probe instead of a full zstd pass.
_PROBE_THRESHOLD = 128 * 1024
_PROBE_BYTES = 16 * 1024
_MIN_SAVING = 0.97


class Compressed(NamedTuple):
    """A blob's body before sealing: ``data`` is a zstd frame (with its content size) when ``zstd``."""

    data: bytes | memoryview
    zstd: bool


class BlobType(IntEnum):
    DATA = 0
    TREE = 1


class ZstdPerThread:
    """zstd compression and decompression contexts, one per thread (a context is not shareable)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            comp = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return comp

    def decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "decompressor", None)
        if dec is None:
            dec = self._local.decompressor = zstandard.ZstdDecompressor()
        return dec


class BlobCodec:
    """Encode/decode blobs. Thread-safe: zstd contexts are per thread."""

    def __init__(self, sealer: Sealer, hasher: BlobHasher) -> None:
        self.sealer = sealer
        self.hasher = hasher
        self._zstd = ZstdPerThread(_ZSTD_LEVEL)
        self._compressor = self._zstd.compressor
        self._decompressor = self._zstd.decompressor

    def encode(self, blob_id: bytes, plaintext: bytes | memoryview) -> bytes:
        return self.seal(blob_id, self.compress(plaintext))

    def compress(self, plaintext: bytes | memoryview) -> Compressed:
        """The blob's body as stored: a zstd frame when that saves enough, else the plaintext itself."""
        size = len(plaintext)
        if size >= 64:
            comp = self._compressor()
            worth_trying = True
            if size > _PROBE_THRESHOLD:
                probe = comp.compress(plaintext[:_PROBE_BYTES])
                worth_trying = len(probe) < _PROBE_BYTES * _MIN_SAVING
            if worth_trying:
                packed = comp.compress(plaintext)
                if len(packed) < size * _MIN_SAVING:
                    return Compressed(packed, zstd=True)
        return Compressed(plaintext, zstd=False)

    def seal(self, blob_id: bytes, body: Compressed) -> bytes:
        """The sealed blob of a :meth:`compress` result."""
        return self.sealer.seal(bytes([_ZSTD if body.zstd else _RAW]) + bytes(body.data), blob_id)

    def decode(self, blob_id: bytes, sealed: bytes | memoryview, *, what: str) -> bytes:
        """Open, decompress and re-hash: a blob is returned only if it is exactly the one its id names."""
        return self._plaintext(blob_id, self.sealer.open(sealed, blob_id, what=what), what=what)

    def reseal(self, blob_id: bytes, sealed: bytes | memoryview, target: BlobCodec, *, what: str) -> bytes:
        """Re-encrypt a blob for another store (another data key), verified but not recompressed."""
        body = self.sealer.open(sealed, blob_id, what=what)
        self._plaintext(blob_id, body, what=what)
        return target.sealer.seal(body, blob_id)

    def _plaintext(self, blob_id: bytes, body: bytes, *, what: str) -> bytes:
        flag, payload = body[0], memoryview(body)[1:]
        if flag == _ZSTD:
            try:
                data = self._decompressor().decompress(payload)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what} does not decompress: {exc}") from None
        elif flag == _RAW:
            data = bytes(payload)
        else:
            raise IntegrityError(f"{what} has an unknown encoding {flag}")
        if self.hasher.blob_id(data) != blob_id:
            raise IntegrityError(f"{what} does not match its id {blob_id.hex()}: the stored data is wrong")
        return data
