"""One region's store: its config object, keys, blob index and backup records.

Opening a store loads every index object and then looks for packs no index
mentions (left by an interrupted backup or copy) and adds them from their
headers, so nothing already uploaded is ever uploaded again (DESIGN invariant 2).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from zfsbackd.errors import BackupNotFound, IntegrityError, StoreError
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.store.blobs import BlobCodec, BlobType
from zfsbackd.store.crypto import BlobHasher, Sealer, StoreKeys, derive_wrapping_key
from zfsbackd.store.index import INDEX_PREFIX, BlobIndex, Location, decode_index, encode_index, new_index_key
from zfsbackd.store.packs import TAIL_GUESS, PackEntry, pack_id_from_key, pack_key, parse_header
from zfsbackd.store.records import RECORD_PREFIX, BackupRecord, iso, record_key, utc_now

STORE_FORMAT = 1


class PackSource(Protocol):
    """Where planned reads get a blob's sealed bytes (see zfsbackd.store.packcache)."""

    def sealed(self, loc: Location) -> bytes: ...

CONFIG_KEY = "config"


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024
    # A secret gear-table seed: chunk boundaries then reveal nothing about content.
    seed: int = 0


class Store:
    """The content-addressed repository in one region."""

    def __init__(
        self, objects: ObjectStore, region: str, store_id: str, keys: StoreKeys, chunker: ChunkerParams
    ) -> None:
        self.objects = objects
        self.region = region
        self.store_id = store_id
        self.keys = keys
        self.chunker = chunker
        self.sealer = Sealer(keys.data_key)
        self.hasher = BlobHasher(keys.id_key)
        self.codec = BlobCodec(self.sealer, self.hasher)
        self.index = BlobIndex()
        self.index_keys: set[str] = set()
        self._index_loaded = False
        self._reload_lock = threading.Lock()

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        objects: ObjectStore,
        *,
        region: str,
        key_material: bytes | None,
        create: bool = True,
        id_key: bytes | None = None,
    ) -> Store:
        """Open the store, creating it on first use.

        ``id_key`` (from another region of the same deployment) is used when a
        new store is created, so blob ids match across regions.
        """
        where = f"the store in region {region} ({objects.location})"
        try:
            raw = objects.get(CONFIG_KEY)
        except FileNotFoundError:
            if not create:
                raise StoreError(f"{where} does not exist yet; run a backup to create it") from None
            raw = cls._create(objects, key_material=key_material, id_key=id_key)
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc}") from exc
        try:
            cfg = json.loads(raw)
            if cfg.get("format") != STORE_FORMAT:
                raise StoreError(
                    f"{where} has format {cfg.get('format')}, this zfsbackd reads format {STORE_FORMAT}; "
                    "upgrade zfsbackd"
                )
            store_id = cfg["store_id"]
            chunker = ChunkerParams(**cfg["chunker"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{where}: its `config` object is unreadable ({exc})") from exc
        wrapping = derive_wrapping_key(key_material, store_id) if key_material is not None else None
        keys = StoreKeys.unwrap(cfg["keys"], wrapping, where=where)
        return cls(objects, region, store_id, keys, chunker)

    @staticmethod
    def _create(objects: ObjectStore, *, key_material: bytes | None, id_key: bytes | None) -> bytes:
        store_id = secrets.token_hex(16)
        keys = StoreKeys.generate(encrypted=key_material is not None, id_key=id_key)
        wrapping = derive_wrapping_key(key_material, store_id) if key_material is not None else None
        cfg = {
            "format": STORE_FORMAT,
            "store_id": store_id,
            "created": iso(utc_now()),
            "chunker": ChunkerParams(seed=secrets.randbits(31)).__dict__,
            "keys": keys.wrap(wrapping),
        }
        raw = json.dumps(cfg, sort_keys=True, indent=1).encode()
        if not objects.put_if_absent(CONFIG_KEY, raw):
            return objects.get(CONFIG_KEY)  # another process created it first: use theirs
        return raw

    # ------------------------------------------------------------------- index
    def load_index(self, *, force: bool = False) -> None:
        """Load every index object, then adopt packs that no index lists yet.

        Without ``force`` an already loaded index is kept only while the set of
        index objects is unchanged: garbage collection by another process
        replaces them, and deduplicating against a pack it deleted would make
        a backup that points at nothing.
        """
        keys = [info.key for info in self.objects.list(INDEX_PREFIX)]
        if self._index_loaded and not force and set(keys) == self.index_keys:
            return
        self.index = BlobIndex()
        self.index_keys = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for key, packs in zip(keys, pool.map(self._read_index, keys), strict=True):
                self.index_keys.add(key)
                for pack_id, entries in packs.items():
                    self.index.add_pack(pack_id, entries)
        orphans = [pid for pid in self.list_pack_ids() if not self.index.has_pack(pid)]
        if orphans:
            adopted: dict[bytes, list[PackEntry]] = {}
            with ThreadPoolExecutor(max_workers=8) as pool:
                for pack_id, entries in zip(orphans, pool.map(self.read_pack_header, orphans), strict=True):
                    self.index.add_pack(pack_id, entries)
                    adopted[pack_id] = entries
            # Record them so the next open does not have to read their headers again.
            self.write_index(adopted)
        self._index_loaded = True

    def _refresh_index(self) -> None:
        with self._reload_lock:
            self.load_index(force=True)

    def _read_index(self, key: str) -> dict[bytes, list[PackEntry]]:
        return decode_index(self.objects.get(key), self.sealer, what=f"index object {key}")

    def write_index(self, packs: dict[bytes, list[PackEntry]]) -> str:
        key = new_index_key()
        self.objects.put_if_absent(key, encode_index(packs, self.sealer))
        self.index_keys.add(key)
        return key

    def list_pack_ids(self) -> Iterator[bytes]:
        for info in self.objects.list("data/"):
            pack_id = pack_id_from_key(info.key)
            if pack_id is not None:
                yield pack_id

    def read_pack_header(self, pack_id: bytes) -> list[PackEntry]:
        key = pack_key(pack_id)
        info = self.objects.head(key)
        if info is None:
            raise IntegrityError(f"pack {key} is missing")
        tail = self.objects.get_range(key, -min(TAIL_GUESS, info.size), min(TAIL_GUESS, info.size))
        entries, needed = parse_header(tail, info.size, self.sealer, what=f"pack {key}")
        if needed:
            tail = self.objects.get_range(key, -needed, needed)
            entries, _ = parse_header(tail, info.size, self.sealer, what=f"pack {key}")
        return entries

    # ------------------------------------------------------------------- blobs
    def read_blob(self, blob_id: bytes, *, what: str, packs: PackSource | None = None) -> bytes:
        """Fetch, authenticate, decompress and re-hash one blob; ``what`` names it for errors.

        ``packs`` (a :class:`~zfsbackd.store.packcache.PackCache`) serves the sealed bytes
        when the caller planned its reads; otherwise one ranged read is made.
        """
        loc = self.index.get(blob_id)
        if loc is None:
            self._refresh_index()  # another process (daemon or CLI) may have added it since we loaded
            loc = self.index.get(blob_id)
        if loc is None:
            raise IntegrityError(f"{what}: blob {blob_id.hex()} is not in the store (region {self.region})")
        if packs is not None:
            sealed = packs.sealed(loc)
        else:
            sealed = self.objects.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
        if len(sealed) != loc.length:
            raise IntegrityError(f"{what}: pack {pack_key(loc.pack_id)} is truncated")
        return self.codec.decode(blob_id, sealed, what=f"{what} (blob {blob_id.hex()[:16]})")

    def blob_type(self, blob_id: bytes) -> BlobType | None:
        loc = self.index.get(blob_id)
        return loc.blob_type if loc else None

    # ----------------------------------------------------------------- records
    def save_record(self, record: BackupRecord) -> None:
        key = record_key(record.backup_id)
        self.objects.put(key, self.sealer.seal(record.to_json(), key.encode()))

    def load_record(self, backup_id: str) -> BackupRecord:
        key = record_key(backup_id)
        try:
            raw = self.objects.get(key)
        except FileNotFoundError:
            raise BackupNotFound(
                f"backup {backup_id} does not exist in region {self.region}; "
                "list backups with `zfsbackd describe-backups`"
            ) from None
        return BackupRecord.from_json(self.sealer.open(raw, key.encode(), what=f"backup record {backup_id}"))

    def load_records(self) -> list[BackupRecord]:
        ids = [info.key[len(RECORD_PREFIX) :] for info in self.objects.list(RECORD_PREFIX)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            records = list(pool.map(self.load_record, ids))
        records.sort(key=lambda r: (r.creation_time, r.backup_id))
        return records
