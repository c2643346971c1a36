"""One region's store: its config object, keys, blob index and backup records.

Opening a store brings its blob index (an SQLite cache in ``state_dir``, see
zfsbackd.store.indexcache) up to date: index objects not seen yet are read,
vanished ones forgotten, and packs no index mentions (left by an interrupted
backup or copy) are added from their headers, so nothing already uploaded is
ever uploaded again (DESIGN invariant 2).
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import structlog
import zstandard

from zfsbackd import faults, pools
from zfsbackd.errors import BackupNotFound, IntegrityError, StoreError, StoreNotInitialized, ZfsbackdError
from zfsbackd.identity import HostIdentity
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.store.blobs import BlobCodec, BlobType
from zfsbackd.store.candidates import Candidates
from zfsbackd.store.crypto import BlobHasher, Sealer, StoreKeys
from zfsbackd.store.index import INDEX_PREFIX, Location, decode_index, encode_index, new_index_key
from zfsbackd.store.indexcache import BlobIndex, IndexCacheCorrupt, cache_directory
from zfsbackd.store.leases import DEFAULT_LEASE_SECONDS, PROCESS_KEEPER, HeldLease, LeaseBook, Operation
from zfsbackd.store.listingcache import ListingCache
from zfsbackd.store.packs import TAIL_GUESS, PackEntry, pack_id_from_key, pack_key, parse_header
from zfsbackd.store.recordcache import RecordCache
from zfsbackd.store.records import (
    RECORD_PREFIX,
    BackupRecord,
    RecordFormatError,
    iso,
    record_key,
    utc_now,
)
from zfsbackd.store.treecache import DEFAULT_MAX_BYTES as DEFAULT_TREE_CACHE_BYTES
from zfsbackd.store.treecache import TreeCache

#: Format 2 (zfsbackd/store/FORMAT.md) authenticates the whole ``config`` with the key file and keeps
#: the chunker seed secret. Format 1 (pre-release, never deployed) is refused, not converted.
STORE_FORMAT = 2
#: how often a read that found its pack gone re-reads the index (garbage collection moved the blob)
PACK_GONE_RETRIES = 2
#: longest time between two listings of ``data/`` by an index sync that has no other reason to list it
DATA_LISTING_INTERVAL = 24 * 3600
#: index objects read (and decoded) at once while syncing the index cache: bounds the memory of a sync

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UnreadableRecord:
    """A backup record that failed to authenticate, to parse, or is of a newer major format."""

    backup_id: str
    error: ZfsbackdError

    def to_api(self) -> dict[str, object]:
        return {"BackupId": self.backup_id, "Error": {"Code": self.error.code, "Message": self.error.message}}


@dataclass(frozen=True)
class UnreadableIndex:
    """An ``index/`` object that failed to authenticate or decode; its packs are re-read from their headers."""

    key: str
    message: str


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_Opened = TypeVar("_Opened")


class PackSource(Protocol):
    """Where planned reads get a blob's location and sealed bytes (see zfsbackd.store.packcache)."""

    def location(self, blob_id: bytes) -> Location | None: ...

    def sealed(self, loc: Location) -> bytes: ...

CONFIG_KEY = "config"
#: Fields every format-2 ``config`` has (``keys`` holds the wrapped secrets, the rest is authenticated).
CONFIG_FIELDS = ("format", "store_id", "created", "encryption", "chunker", "keys")
_STORE_ID_LENGTH = 32
#: Bounds on chunk sizes read from a config (an unencrypted one is not authenticated).
_CHUNK_SIZE_RANGE = (4 * 1024, 64 * 1024 * 1024)


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC sizes (public, in ``config``) and the gear-table seed.

    The seed is secret in an encrypted store, wrapped with its keys (see
    :class:`~zfsbackd.store.crypto.StoreKeys`): with a known seed, chunk
    boundaries (visible as blob sizes) would reveal something about content.
    """

    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024
    seed: int = 0

    def public(self) -> dict[str, int]:
        """The sizes as written in ``config`` (never the seed)."""
        return {"min_size": self.min_size, "avg_size": self.avg_size, "max_size": self.max_size}

    @classmethod
    def from_config(cls, fields: object, seed: int, *, where: str) -> ChunkerParams:
        """Validate the ``chunker`` field of a config: three sizes, ordered, within sane bounds."""
        names = ("min_size", "avg_size", "max_size")
        low, high = _CHUNK_SIZE_RANGE
        if (
            not isinstance(fields, dict)
            or set(fields) != set(names)
            or not all(type(fields[n]) is int and low <= fields[n] <= high for n in names)
            or not fields["min_size"] <= fields["avg_size"] <= fields["max_size"]
        ):
            raise IntegrityError(
                f"{where}: its `config` object is corrupt: `chunker` must hold min_size <= avg_size <= max_size, "
                f"each from {low} to {high}"
            )
        return cls(min_size=fields["min_size"], avg_size=fields["avg_size"], max_size=fields["max_size"], seed=seed)


def _parse_config(raw: bytes, *, region: str, where: str) -> dict[str, object]:
    """The config object as a dict with every format-2 field; nothing in it is authenticated yet.

    Damage (not JSON, not an object, fields missing or of the wrong type) is
    an IntegrityError (exit 6); an old or newer format is a StoreError that
    says what to do.
    """
    restore = "Restore the `config` object from a copy of the store; without it no backup in the store can be read"
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(
            f"{where}: its `config` object ({len(raw)} bytes) is not valid JSON: it is corrupt or truncated. {restore}"
        ) from None
    if not isinstance(cfg, dict):
        raise IntegrityError(f"{where}: its `config` object is not a JSON object: it is corrupt. {restore}")
    fmt = cfg.get("format")
    if type(fmt) is not int:
        raise IntegrityError(f"{where}: its `config` object has no format number: it is corrupt. {restore}")
    if fmt < STORE_FORMAT:
        raise StoreError(
            f"{where} has store format {fmt}, written by a pre-release zfsbackd; this zfsbackd reads format "
            f"{STORE_FORMAT} only and cannot convert it. Move the old store aside (this version cannot read its "
            f"backups) and create a new one with `zfsbackd store init --region {region}`"
        )
    if fmt > STORE_FORMAT:
        raise StoreError(
            f"{where} has store format {fmt}, newer than this zfsbackd reads (format {STORE_FORMAT}); "
            "upgrade zfsbackd"
        )
    missing = [name for name in CONFIG_FIELDS if name not in cfg]
    if missing:
        raise IntegrityError(
            f"{where}: its `config` object lacks {', '.join(missing)}: it is corrupt or was tampered with. {restore}"
        )
    store_id = cfg["store_id"]
    if not (
        isinstance(store_id, str) and len(store_id) == _STORE_ID_LENGTH and set(store_id) <= set("0123456789abcdef")
    ):
        raise IntegrityError(f"{where}: its `config` object has a malformed store_id: it is corrupt. {restore}")
    return cfg


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
        self._index: BlobIndex | None = None
        self._index_dir: Path | None = None
        self.tree_cache: TreeCache | None = None
        self.listing_cache: ListingCache | None = None
        self._index_create_lock = threading.Lock()
        self.index_keys: set[str] = set()
        self.unreadable_indexes: list[UnreadableIndex] = []
        self._index_loaded = False
        self._index_generation = 0
        self._reload_lock = threading.Lock()
        self.leases = LeaseBook(objects, self.sealer, region, HostIdentity.anonymous(), PROCESS_KEEPER)
        self.candidates = Candidates(objects, self.sealer, region)
        self.record_cache: RecordCache | None = None
        self._excluded_packs: frozenset[bytes] = frozenset()
        self._writers = 0
        self._writers_lock = threading.Lock()

    # ----------------------------------------------------------------- opening
    #: True when :meth:`open` created the store (``zfsbackd store init`` reports it).
    created: bool = False

    @classmethod
    def open(
        cls,
        objects: ObjectStore,
        *,
        region: str,
        key_material: bytes | None,
        create: bool = False,
        like: StoreKeys | None = None,
        used_before: str | None = None,
    ) -> Store:
        """Open the store and authenticate its ``config`` with the key file.

        ``create`` is a deliberate decision to create a store where none exists
        (``zfsbackd store init``, or the region's ``create_if_missing``); without
        it a missing store is StoreNotInitialized, so that an unmounted file
        system or a mistyped location never quietly receives backups.
        ``used_before`` is the id of the store this host used in the region
        before (remembered in ``state_dir``): when that store is gone nothing is
        created, and when the region now holds another store it is refused.
        ``like`` (the home region's keys) gives a new store the deployment's id
        key and chunker seed, so blob ids and chunks match across its regions.
        """
        where = f"the store in region {region} ({objects.location})"
        settings = " and ".join(f"regions.{region}.{key}" for key in objects.location_settings) or f"regions.{region}"
        created = False
        try:
            raw: bytes | None = objects.get(CONFIG_KEY)
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc}") from exc
        if raw is None:
            if used_before is not None:
                raise StoreError(
                    f"the store in region {region} (id {used_before}) that this host used before is gone: "
                    f"{objects.location} holds no `config` object. Is the file system mounted, and is {settings} "
                    f"right? Nothing was written. If the store was deleted on purpose, create a new one with "
                    f"`zfsbackd store init --region {region}`"
                )
            if not create:
                raise StoreNotInitialized(
                    f"{where} does not hold a store yet. zfsbackd creates stores only when asked, so that an "
                    f"unmounted file system or a mistyped {settings} never receives backups: check {settings} "
                    f"(is the file system mounted?), then create the store with "
                    f"`zfsbackd store init --region {region}`, or set regions.{region}.create_if_missing: true"
                )
            raw, created = cls._create(objects, key_material=key_material, like=like, where=where,
                                       settings=settings)
        cfg = _parse_config(raw, region=region, where=where)
        store_id = str(cfg["store_id"])
        if used_before is not None and store_id != used_before:
            raise IntegrityError(
                f"{where} holds another store (id {store_id}) than the one this host used there before "
                f"(id {used_before}): its `config` object was replaced, or {settings} now points at another store. "
                f"Nothing was written. If the change is intended, accept the store with "
                f"`zfsbackd store init --region {region}`"
            )
        public = {name: value for name, value in cfg.items() if name != "keys"}
        keys = StoreKeys.unwrap(cfg["keys"], key_material, store_id=store_id, public=public, where=where)
        chunker = ChunkerParams.from_config(cfg["chunker"], keys.chunker_seed, where=where)
        store = cls(objects, region, store_id, keys, chunker)
        store.created = created
        return store

    @staticmethod
    def _create(
        objects: ObjectStore, *, key_material: bytes | None, like: StoreKeys | None, where: str, settings: str
    ) -> tuple[bytes, bool]:
        """Write a new ``config`` unless another process won the race; returns it and whether it is ours.

        Never over existing objects: a location with objects but no config is
        not a store of ours, or a store whose config was lost — a new config
        would make its data unreadable garbage.
        """
        objects.check_reachable()  # a missing directory or bucket is never created here
        stray = next(
            (info.key for info in objects.list("") if info.key != CONFIG_KEY and not info.key.startswith("locks/")),
            None,
        )
        if stray is not None:
            problem = (
                f"{where} holds objects ({stray}, …) but no `config` object, so zfsbackd will not create a store "
                "there (the objects would become unreadable)"
            )
            if stray.startswith(("data/", "index/", "backups/")):
                raise IntegrityError(
                    f"{problem}: it looks like a store whose `config` was deleted. Restore the `config` object "
                    f"from a copy of the store, or point {settings} at another location"
                )
            raise StoreError(f"{problem}: point {settings} at an empty location")
        store_id = secrets.token_hex(_STORE_ID_LENGTH // 2)
        keys = StoreKeys.generate(encrypted=key_material is not None, like=like)
        public: dict[str, object] = {
            "format": STORE_FORMAT,
            "store_id": store_id,
            "created": iso(utc_now()),
            "encryption": keys.mode,
            "chunker": ChunkerParams().public(),
        }
        cfg = {**public, "keys": keys.wrap(key_material, store_id=store_id, public=public)}
        raw = json.dumps(cfg, sort_keys=True, indent=1).encode()
        if not objects.put_if_absent(CONFIG_KEY, raw):
            return objects.get(CONFIG_KEY), False  # another process created it first: use theirs
        log.info("store_created", location=objects.location, store_id=store_id, encryption=keys.mode)
        return raw, True

    # ------------------------------------------------------------------- fleet
    def use_identity(self, identity: HostIdentity, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        """Name this host in the leases it writes (the engine calls this; tools stay anonymous)."""
        self.leases = LeaseBook(self.objects, self.sealer, self.region, identity, PROCESS_KEEPER, ttl=lease_seconds)

    @contextmanager
    def writing(self, operation: Operation, subject: str) -> Iterator[HeldLease]:
        """Hold a writer's lease for a backup or copy into this store, and avoid candidate packs meanwhile.

        The candidate sets are read after the lease is in the store, so any
        set this writer does not see was written after its lease, and the
        collection that would execute that set waits for this lease
        (FORMAT.md, "Garbage collection across hosts"). While any writer of
        this process runs, packs are only added to the avoided set, never
        removed: a pack dropped from the sets was deleted, and this process's
        index may still list it until its next sync. Load the index after
        entering, not before.
        """
        with self.leases.acquire(operation, subject) as lease, self.helping_writer():
            yield lease

    @contextmanager
    def helping_writer(self) -> Iterator[None]:
        """Write for a writer whose lease another process holds (a backup's archive worker): avoid the
        candidate packs as :meth:`writing` does, read now, after that lease was acquired."""
        with self._writers_lock:
            avoid = self.candidates.packs()
            self._excluded_packs = avoid if self._writers == 0 else self._excluded_packs | avoid
            self._writers += 1
        try:
            yield
        finally:
            with self._writers_lock:
                self._writers -= 1

    def can_deduplicate(self, blob_id: bytes) -> bool:
        """Is ``blob_id`` stored in a pack a writer may point at (one garbage collection will not delete)?"""
        excluded = self._excluded_packs
        if not excluded:
            return blob_id in self.index
        return self.index.stored_outside(blob_id, excluded)

    def deduplicable(self, blob_ids: list[bytes]) -> set[bytes]:
        """Those of ``blob_ids`` that :meth:`can_deduplicate`, asked for many blobs at once."""
        found = self.index.present(blob_ids)
        if self._excluded_packs:
            found = {blob_id for blob_id in found if self.can_deduplicate(blob_id)}
        return found

    # ------------------------------------------------------------------- index
    def use_index_cache(self, state_dir: Path) -> None:
        """Keep the blob index in ``state_dir/cache/<store id>/`` across opens (the engine calls this).

        Without it the index lives in a private temporary file for this
        object's lifetime (tools and tests that open a store directly).
        """
        with self._index_create_lock:
            if self._index is not None:
                self._index.close()
                self._index = None
            self._index_dir = cache_directory(state_dir, self.store_id)
            self._index_loaded = False

    def use_record_cache(self, state_dir: Path) -> None:
        """Keep authenticated records in ``state_dir/cache/<store id>/records``, fetched again only when
        the listing shows a new version (zfsbackd.store.recordcache)."""
        self.record_cache = RecordCache(cache_directory(state_dir, self.store_id) / "records")

    def use_tree_cache(self, state_dir: Path, *, max_bytes: int = DEFAULT_TREE_CACHE_BYTES) -> None:
        """Keep tree blobs in ``state_dir/cache/<store id>/trees`` (bounded, verified by id on read),
        so incremental backups and restores do not fetch the same directories again."""
        self.tree_cache = TreeCache(
            cache_directory(state_dir, self.store_id) / "trees", self._is_blob, max_bytes=max_bytes
        )

    def use_listing_cache(self, state_dir: Path) -> None:
        """Keep which listing each tree was made from in ``state_dir/cache/<store id>/listings.sqlite``, so a
        backup takes an unchanged directory's entries all at once (see :mod:`zfsbackd.store.listingcache`)."""
        self.listing_cache = ListingCache(cache_directory(state_dir, self.store_id), self.store_id, self.hasher.blob_id)

    def flush_caches(self) -> None:
        """Write what the tree and listing caches still hold in memory (the next backup finds it locally)."""
        if self.tree_cache is not None:
            self.tree_cache.flush()
        if self.listing_cache is not None:
            self.listing_cache.flush()

    def _is_blob(self, blob_id: bytes, plaintext: bytes) -> bool:
        return self.hasher.blob_id(plaintext) == blob_id

    def read_tree(self, tree_id: bytes, *, what: str, cached: bool = True) -> bytes:
        """A tree blob's plaintext: from the local tree cache when it has it (verified by its id),
        else from the store (then cached). ``cached=False`` always reads the store: ``check``
        must prove the store holds every tree, not that this host remembers it."""
        if cached and self.tree_cache is not None:
            plaintext = self.tree_cache.get(tree_id)
            if plaintext is not None:
                return plaintext
        plaintext = self.read_blob(tree_id, what=what)
        self.remember_tree(tree_id, plaintext)
        return plaintext

    def remember_tree(
        self, tree_id: bytes, plaintext: bytes | memoryview, compressed: bytes | memoryview | None = None
    ) -> None:
        """Put a tree this process read or wrote into the tree cache (if there is one); *compressed*, if
        given, is its zstd frame (made for the store: the cache keeps it as it is)."""
        if self.tree_cache is not None:
            self.tree_cache.put(
                tree_id,
                bytes(plaintext) if compressed is None else bytes(compressed),
                compressed=compressed is not None,
            )

    @property
    def scratch_dir(self) -> Path:
        """Where this store's scratch files go (on-disk blob sets): beside its index cache."""
        return self.index.path.parent

    @property
    def index(self) -> BlobIndex:
        """The blob index (an SQLite cache, see zfsbackd.store.indexcache), opened and validated on first use."""
        index = self._index
        if index is None:
            with self._index_create_lock:
                if self._index is None:
                    self._index = BlobIndex(self._index_dir, self.store_id)
                    self._index.on_reset = self._resync_after_reset
                index = self._index
        return index

    def load_index(
        self, *, force: bool = False, record_adopted: bool = True, verify: bool = False, adopt: bool = False
    ) -> None:
        """Bring the index up to date with the store: absorb new index objects, adopt packs no index lists.

        Only ``index/`` objects the cache has not seen are read (one transaction
        each, so a killed process resumes where it stopped). Index objects gone
        from the store (garbage collection here or on another host replaced
        them) take with them the packs only they listed, unless the pack is
        still in ``data/``; packs no index lists are adopted from their headers
        as before.

        ``record_adopted`` writes an index object for adopted packs; readers
        (restore, check, a copy's source) pass False, so that reading a store
        never writes to it — an index written by a reader that raced garbage
        collection could name a pack collection was deleting.

        Without ``force`` an already loaded index is kept only while the set of
        index objects is unchanged: garbage collection by another process
        replaces them, and deduplicating against a pack it deleted would make
        a backup that points at nothing. ``verify`` (``check``, garbage
        collection) re-reads every index object, not only new ones, so one
        damaged after it was cached is found too.

        ``data/`` is listed (one LIST per 1,000 packs on S3, and a set of every
        pack id in memory) only when something may be there that no index
        object names: with ``verify`` or ``adopt`` (a resumed backup or copy,
        whose durable packs come back this way), on the first sync of a cache,
        when index objects went away or are unreadable, and otherwise once per
        DATA_LISTING_INTERVAL (another host's killed writer: until then its
        packs are only not deduplicated against). The rest of the time a sync
        costs one listing of ``index/``.

        An index object that fails to authenticate or decode is treated like a
        missing one (DESIGN invariant 7): it is remembered in
        ``unreadable_indexes`` (``check`` reports it, garbage collection
        replaces it) and its packs, which no readable index lists, are adopted
        from their self-describing headers.
        """
        keys = [info.key for info in self.objects.list(INDEX_PREFIX)]
        if (
            self._index_loaded
            and not force
            and not verify
            and set(keys) == self.index_keys | self._unreadable_index_keys()
        ):
            return
        try:
            with self.index.manual_recovery():
                self._sync_index(keys, record_adopted=record_adopted, verify=verify, adopt=adopt)
        except IndexCacheCorrupt as exc:
            self.index.reset(f"corrupt ({exc})")
            with self.index.manual_recovery():
                self._sync_index(keys, record_adopted=record_adopted, verify=verify, adopt=adopt)
        self._index_loaded = True

    def _sync_index(self, keys: list[str], *, record_adopted: bool, verify: bool, adopt: bool) -> None:
        index = self.index
        seen = index.seen_index_keys()
        listed = set(keys)
        unreadable: list[UnreadableIndex] = []
        to_read = keys if verify else [key for key in keys if key not in seen]

        def readable() -> Iterator[tuple[str, dict[bytes, list[PackEntry]]]]:
            for batch in _batches(to_read, pools.INDEX_READ_WORKERS):  # bounded: a few decoded objects in memory
                with ThreadPoolExecutor(max_workers=pools.INDEX_READ_WORKERS) as pool:
                    for key, packs in zip(batch, pool.map(self._read_index, batch), strict=True):
                        if isinstance(packs, UnreadableIndex):
                            unreadable.append(packs)
                            listed.discard(key)
                            log.warning("index_unreadable", region=self.region, key=key, error=packs.message)
                        elif packs is None:
                            listed.discard(key)  # replaced by garbage collection since the listing
                        else:
                            yield key, packs

        index.absorb(readable())
        forgotten = seen - listed
        listed_at = index.data_listed_at()
        now = time.time()
        if not (verify or adopt or not seen or forgotten or unreadable or listed_at is None
                or not 0 <= now - listed_at < DATA_LISTING_INTERVAL):
            self.index_keys, self.unreadable_indexes = listed, unreadable
            log.debug("index_synced", region=self.region, read=len(to_read), data_listed=False)
            return
        up_to = index.last_pack_number()  # packs added after this are newer than the listing below
        present = set(self.list_pack_ids())
        index.set_data_listed_at(now)
        dropped = index.forget_index_objects(forgotten, present=present, up_to=up_to)
        orphans = list(present - index.pack_ids())
        adopted: dict[bytes, list[PackEntry]] = {}
        if orphans:
            with ThreadPoolExecutor(max_workers=pools.STORE_LISTING_WORKERS) as pool:
                for pack_id, entries in zip(orphans, pool.map(self._adoptable_header, orphans), strict=True):
                    if entries is not None:
                        index.add_pack(pack_id, entries)
                        adopted[pack_id] = entries
        self.index_keys, self.unreadable_indexes = listed, unreadable
        log.debug("index_synced", region=self.region, read=len(to_read), data_listed=True,
                  forgotten=len(forgotten), packs_dropped=dropped, packs_adopted=len(adopted))
        if adopted and record_adopted:
            # Record them so no other host has to read their headers again.
            self.write_index(adopted)

    def _unreadable_index_keys(self) -> set[str]:
        return {bad.key for bad in self.unreadable_indexes}

    def _adoptable_header(self, pack_id: bytes) -> list[PackEntry] | None:
        """A pack's header, or None when the pack is gone or damaged (``check`` names it)."""
        try:
            return self.read_pack_header(pack_id)
        except (IntegrityError, FileNotFoundError) as exc:
            message = exc.message if isinstance(exc, IntegrityError) else str(exc)
            log.warning("pack_header_unreadable", region=self.region, pack=pack_key(pack_id), error=message)
            return None

    def _refresh_index(self, seen_generation: int | None = None, *, rebuild: str | None = None) -> None:
        """Re-sync the index; skipped when another thread re-synced it since ``seen_generation``.

        Many reader threads meet the same moved pack at once; one re-sync
        serves them all. ``rebuild`` (the reason) first empties the cache: it
        gave a location its pack's authenticated header contradicts.
        """
        with self._reload_lock:
            if seen_generation is not None and seen_generation != self._index_generation:
                return
            if rebuild is not None:
                self.index.reset(rebuild)
            self.load_index(force=True, record_adopted=False)
            self._index_generation += 1

    def _resync_after_reset(self) -> None:
        """The cache was found corrupt in the middle of an operation and emptied: fill it from the store."""
        with self._reload_lock:
            self.load_index(force=True, record_adopted=False)
            self._index_generation += 1

    def _read_index(self, key: str) -> dict[bytes, list[PackEntry]] | UnreadableIndex | None:
        what = f"index object {key}"
        try:
            return decode_index(self.objects.get(key), self.sealer, what=what)
        except FileNotFoundError:
            return None
        except IntegrityError as exc:
            return UnreadableIndex(key, exc.message)
        except (zstandard.ZstdError, ValueError, struct.error) as exc:
            return UnreadableIndex(key, f"{what} cannot be decoded: {exc}")

    def write_index(self, packs: dict[bytes, list[PackEntry]]) -> str:
        """Write an index object naming ``packs`` (all durable already) and record it in the cache."""
        key = new_index_key()
        self.objects.put_if_absent(key, encode_index(packs.items(), self.sealer))
        faults.point("index-written")
        self.index.add_index_object(key, packs)
        self.index_keys.add(key)
        return key

    def write_consolidated_index(self) -> str:
        """One index object naming every pack the index knows (garbage collection), streamed from the cache."""
        key = new_index_key()
        pack_ids: list[bytes] = []

        def packs() -> Iterator[tuple[bytes, list[PackEntry]]]:
            for pack_id, entries in self.index.iter_packs():
                pack_ids.append(pack_id)
                yield pack_id, entries

        self.objects.put_if_absent(key, encode_index(packs(), self.sealer))
        faults.point("index-written")
        self.index.record_index_object(key, pack_ids)
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
        return self.fetch_blob(
            blob_id,
            what=what,
            packs=packs,
            open_sealed=lambda sealed: self.codec.decode(blob_id, sealed, what=f"{what} (blob {blob_id.hex()[:16]})"),
        )

    def fetch_blob(
        self, blob_id: bytes, *, what: str, open_sealed: Callable[[bytes], _Opened], packs: PackSource | None = None
    ) -> _Opened:
        """Fetch one blob's sealed bytes and return what ``open_sealed`` makes of them.

        ``open_sealed`` authenticates (and raises IntegrityError when that fails):
        :meth:`read_blob` decodes, a copy re-seals for another region's key.

        A pack that is gone when it is read usually means garbage collection (in
        this or another process) rewrote the pack's live blobs into a new one and
        deleted it: collection writes the new pack and index before it deletes,
        so the index is re-synced and the blob fetched from where it lives now. Only
        a blob that is nowhere is an error, and it is an IntegrityError that names
        the file, never a bare "file not found".

        The location comes from a local cache, which is not trusted either: a
        blob that fails to authenticate is looked up in its pack's authenticated
        header, and if the header says the cache was wrong the cache is rebuilt
        from the store and the read tried once more. Real damage stays an
        IntegrityError.
        """
        generation = self._index_generation
        loc = packs.location(blob_id) if packs is not None else None
        if loc is None:
            loc = self.index.get(blob_id)
        gone_retries = 0
        gone_packs: set[bytes] = set()
        cache_rebuilt = False
        while True:
            if loc is None:
                self._refresh_index(generation)  # another process (daemon or CLI) may have added it since
                loc = self.index.get(blob_id)
            if loc is None:
                raise IntegrityError(f"{what}: blob {blob_id.hex()} is not in the store (region {self.region})")
            try:
                if packs is not None:
                    sealed = packs.sealed(loc)
                else:
                    sealed = self.objects.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
            except FileNotFoundError:
                gone = loc.pack_id
                gone_packs.add(gone)
                self._refresh_index(generation)
                generation = self._index_generation
                # Another copy, if any: the index may still name packs a killed collection deleted. Each
                # copy is tried once; the bound is for a store that keeps moving the blob (a collection
                # running on another host between every attempt).
                copies = self.index.locations(blob_id)
                loc = next((other for other in copies if other.pack_id not in gone_packs), None)
                gone_retries += 1
                if loc is None or gone_retries > PACK_GONE_RETRIES + len(copies):
                    raise IntegrityError(
                        f"{what}: pack {pack_key(gone)} holding blob {blob_id.hex()} is missing from the store "
                        f"(region {self.region}); run `zfsbackd check` to see what else it affects"
                    ) from None
                continue
            try:
                if len(sealed) != loc.length:
                    raise IntegrityError(f"{what}: pack {pack_key(loc.pack_id)} is truncated")
                return open_sealed(sealed)
            except IntegrityError:
                if cache_rebuilt or not self._cached_location_is_wrong(blob_id, loc):
                    raise
            cache_rebuilt = True
            self._refresh_index(generation, rebuild=f"blob {blob_id.hex()} is not where the cache says")
            generation = self._index_generation
            loc = self.index.get(blob_id)

    def _cached_location_is_wrong(self, blob_id: bytes, loc: Location) -> bool:
        """Whether the pack's authenticated header contradicts the cached location (False if unreadable)."""
        try:
            header = self.read_pack_header(loc.pack_id)
        except (IntegrityError, FileNotFoundError):
            return False  # damage of the pack itself: the original error stands
        entry = next((e for e in header if e.blob_id == blob_id), None)
        return entry is None or (entry.offset, entry.length, entry.raw_length, entry.blob_type) != (
            loc.offset,
            loc.length,
            loc.raw_length,
            loc.blob_type,
        )

    def blob_type(self, blob_id: bytes) -> BlobType | None:
        loc = self.index.get(blob_id)
        return loc.blob_type if loc else None

    # ----------------------------------------------------------------- records
    def save_record(self, record: BackupRecord) -> None:
        key = record_key(record.backup_id)
        self.objects.put(key, self.sealer.seal(record.to_json(), key.encode()))

    def load_record(self, backup_id: str) -> BackupRecord:
        return self._fetch_record(backup_id)[0]

    def _fetch_record(self, backup_id: str) -> tuple[BackupRecord, bytes]:
        """The record read from the store and authenticated, and its plaintext."""
        key = record_key(backup_id)
        try:
            raw = self.objects.get(key)
        except FileNotFoundError:
            raise BackupNotFound(
                f"backup {backup_id} does not exist in region {self.region}; "
                "list backups with `zfsbackd describe-backups`"
            ) from None
        what = f"backup record {backup_id} (region {self.region}, object {key})"
        plaintext = self.sealer.open(raw, key.encode(), what=what)
        return BackupRecord.from_json(plaintext, what=what), plaintext

    def _cached_record(self, backup_id: str, version: str) -> BackupRecord:
        """The record at ``version``: from the record cache if this host read that version, else fetched."""
        cache = self.record_cache
        if cache is not None:
            plaintext = cache.get(backup_id, version)
            if plaintext is not None:
                what = f"backup record {backup_id} (region {self.region}, cached in {cache.directory})"
                try:
                    return BackupRecord.from_json(plaintext, what=what)
                except (IntegrityError, RecordFormatError):
                    pass  # a damaged entry, or one an older zfsbackd wrote: read the store's
        record, plaintext = self._fetch_record(backup_id)
        if cache is not None:
            cache.put(backup_id, version, plaintext)
        return record

    def load_records_checked(self, *, cached: bool = True) -> tuple[list[BackupRecord], list[UnreadableRecord]]:
        """Every record, oldest first, and those that could not be read (DESIGN invariant 7).

        One damaged or newer-format record costs only itself: it is returned
        with its error instead of failing the listing. A record deleted while
        the listing ran is simply left out. ``cached=False`` (``check``) reads
        and authenticates every record in the store, whatever this host read before.
        """
        listed = {info.key[len(RECORD_PREFIX) :]: info.version for info in self.objects.list(RECORD_PREFIX)}
        records: list[BackupRecord] = []
        unreadable: list[UnreadableRecord] = []

        def load(backup_id: str) -> BackupRecord | UnreadableRecord | None:
            try:
                if not cached:
                    return self._fetch_record(backup_id)[0]
                return self._cached_record(backup_id, listed[backup_id])
            except BackupNotFound:
                return None
            except (IntegrityError, RecordFormatError) as exc:
                return UnreadableRecord(backup_id, exc)

        if self.record_cache is not None:
            self.record_cache.keep_only(set(listed))
        with ThreadPoolExecutor(max_workers=pools.STORE_LISTING_WORKERS) as pool:
            for item in pool.map(load, listed):
                if isinstance(item, BackupRecord):
                    records.append(item)
                elif item is not None:
                    unreadable.append(item)
        records.sort(key=lambda r: (r.creation_time, r.backup_id))
        unreadable.sort(key=lambda u: u.backup_id)
        for bad in unreadable:
            log.warning(
                "backup_record_unreadable", region=self.region, backup_id=bad.backup_id, error=bad.error.message
            )
        return records, unreadable

    def load_records(self) -> list[BackupRecord]:
        """The readable records, oldest first (unreadable ones are logged and left out).

        Only for callers to whom a missing record means "do less" (listing,
        scheduling); anything that decides what data may be deleted must use
        :meth:`load_records_checked`.
        """
        return self.load_records_checked()[0]
