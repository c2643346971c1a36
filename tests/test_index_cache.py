"""The on-disk blob index cache (zfsbackd.store.indexcache): persistence, validation, sync, recovery.

None of these need root: the stores are local directories under tmp_path and
data goes in through the store API (PackWriter), not through snapshots.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from enginekit import REPO, make_config, write_config

from zfsbackd.config import load_config
from zfsbackd.engine.engine import Engine
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.check import check_store
from zfsbackd.store.gc import collect_garbage
from zfsbackd.store.index import INDEX_PREFIX
from zfsbackd.store.indexcache import CACHE_FILE, BlobIndex, cache_directory
from zfsbackd.store.packs import PackEntry, pack_key
from zfsbackd.store.repository import DATA_LISTING_INTERVAL, Store
from zfsbackd.store.writer import PackWriter

KiB = 1024


def _engine(tmp_path: Path, state: str = "state", **kwargs: object) -> Engine:
    """An engine on the local store ``tmp_path/store``; ``state`` names its state_dir (its "host")."""
    config = make_config(tmp_path, {"src": tmp_path / "src"}, **kwargs)
    return Engine(config.__class__(**{**config.__dict__, "state_dir": tmp_path / state}))


def _fill(store: Store, blobs: int, *, seed: int = 0) -> list[bytes]:
    """``blobs`` random 4 KiB blobs in packs of 16, an index object per pack; their ids."""
    rng = random.Random(seed)
    ids = []
    with PackWriter(store, pack_size=16 * 4 * KiB, checkpoint_every=1) as writer:
        for _ in range(blobs):
            blob_id, _new = writer.add(BlobType.DATA, rng.randbytes(4 * KiB))
            ids.append(blob_id)
        writer.flush()
    return ids


def _index_gets(store: Store) -> int:
    return store.objects.metrics.requests["get"]


def _cache_file(engine: Engine, store: Store) -> Path:
    return cache_directory(engine.config.state_dir, store.store_id) / CACHE_FILE


def _filled_cache(tmp_path: Path, blobs: int) -> tuple[list[bytes], Path]:
    """A store with ``blobs`` blobs, its cache closed (checkpointed, no WAL): their ids and the cache file."""
    engine = _engine(tmp_path)
    store = engine.store()
    store.load_index()
    ids = _fill(store, blobs)
    store.index.close()
    return ids, _cache_file(engine, store)


def _reopen(tmp_path: Path, state: str = "state") -> tuple[Store, int]:
    """A new engine (as a new process would) and how many objects its index load read."""
    store = _engine(tmp_path, state).store()
    before = _index_gets(store)
    store.load_index()
    return store, _index_gets(store) - before


# ------------------------------------------------------------ the index itself
def test_lookups_of_many_blobs_at_once_answer_as_one_at_a_time(tmp_path: Path) -> None:
    """``get_many`` and ``present`` (one query per 500 ids) give what ``get`` and ``in`` give per blob,
    also for a blob stored in two packs (the same copy as ``get``) and for ids the index lacks."""
    index = BlobIndex(tmp_path / "cache", "store-id")
    rng = random.Random(7)
    ids = [rng.randbytes(32) for _ in range(1_203)]
    index.add_pack(b"\x01" * 32, [PackEntry(BlobType.DATA, b, i * 10, 10, 9) for i, b in enumerate(ids[:700])])
    index.add_pack(b"\x02" * 32, [PackEntry(BlobType.TREE, b, i * 5, 5, 4) for i, b in enumerate(ids[600:1_100])])
    asked = ids + [rng.randbytes(32) for _ in range(50)]  # 103 stored nowhere
    located = index.get_many(asked)
    assert located == {b: index.get(b) for b in asked if index.get(b) is not None}
    assert len(located) == 1_100 and located[ids[650]].pack_id == b"\x01" * 32
    assert index.present(asked) == set(ids[:1_100]) == {b for b in asked if b in index}
    assert index.get_many([]) == {} and index.present([]) == set()
    index.close()


def test_concurrent_lookups_and_inserts(tmp_path: Path) -> None:
    index = BlobIndex(tmp_path / "cache", "0" * 32)
    rng = random.Random(7)
    packs = {
        rng.randbytes(32): [PackEntry(BlobType.DATA, rng.randbytes(32), k * 100, 100, 90) for k in range(200)]
        for _ in range(40)
    }
    items = list(packs.items())
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(part: list[tuple[bytes, list[PackEntry]]]) -> None:
        for pack_id, entries in part:
            index.add_pack(pack_id, entries)

    def read() -> None:
        while not stop.is_set():
            for pack_id, entries in items:
                for e in entries[::37]:
                    loc = index.get(e.blob_id)
                    if loc is not None and (loc.pack_id, loc.offset) != (pack_id, e.offset):
                        errors.append(AssertionError(f"wrong location for {e.blob_id.hex()}"))

    def guarded(fn, *args):  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=guarded, args=(write, items[i::4])) for i in range(4)]
    readers = [threading.Thread(target=guarded, args=(read,)) for _ in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(index) == 40 * 200
    for pack_id, entries in items:
        assert index.pack_entries(pack_id) == entries
        assert all(e.blob_id in index for e in entries)
    assert {pack_id for pack_id, _ in index.iter_packs()} == set(packs)
    index.remove_packs([items[0][0]])
    assert items[0][1][0].blob_id not in index and not index.has_pack(items[0][0])


def test_second_open_reads_no_index_object(tmp_path: Path) -> None:
    store = _engine(tmp_path).store()
    store.load_index()
    ids = _fill(store, 64)
    objects = len(list(store.objects.list(INDEX_PREFIX)))
    assert objects >= 4

    again, reads = _reopen(tmp_path)
    assert reads == 0
    assert all(b in again.index for b in ids) and len(again.index) == 64
    assert again.read_blob(ids[5], what="test") and again.index_keys == store.index_keys

    # another host (its own state_dir) reads every object once, then none
    _, reads = _reopen(tmp_path, "state-other")
    assert reads == objects
    _, reads = _reopen(tmp_path, "state-other")
    assert reads == 0


# ----------------------------------------------------------- a cache not to trust
def _rebuilt(tmp_path: Path, expected_ids: list[bytes]) -> str:
    store, reads = _reopen(tmp_path)
    assert reads == len(list(store.objects.list(INDEX_PREFIX)))  # everything read again
    assert all(b in store.index for b in expected_ids) and len(store.index) == len(expected_ids)
    assert store.index.rebuilt_reason
    return store.index.rebuilt_reason


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "truncated|malformed"),
        ("garbage", "not a readable cache"),
        ("format", "cache format 0"),
        ("empty", "not a readable cache"),
    ],
)
def test_damaged_or_outdated_cache_is_rebuilt(tmp_path: Path, damage: str, reason: str) -> None:
    ids, path = _filled_cache(tmp_path, 200)
    assert path.stat().st_size > 16 * KiB and not Path(f"{path}-wal").exists()
    if damage == "truncate":
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif damage == "garbage":
        path.write_bytes(random.Random(3).randbytes(path.stat().st_size))
    elif damage == "empty":
        path.write_bytes(b"SQLite format 3\x00" + bytes(84))
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = '0' WHERE name = 'format'")
        conn.close()
    why = _rebuilt(tmp_path, ids)
    assert any(part in why for part in reason.split("|")), why


@pytest.mark.parametrize("left", ["zero-bytes", "no-tables"])
def test_a_cache_whose_maker_was_killed_before_its_schema_is_completed(tmp_path: Path, left: str) -> None:
    """A process killed between creating the file and committing the schema (a daemon SIGKILLed on its
    first copy) must not leave a cache that every later process refuses."""
    ids, path = _filled_cache(tmp_path, 50)
    path.unlink()
    if left == "zero-bytes":
        path.write_bytes(b"")
    else:
        sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").fetchall()  # a database with nothing in it
    store, reads = _reopen(tmp_path)
    assert reads == len(list(store.objects.list(INDEX_PREFIX)))
    assert all(b in store.index for b in ids) and len(store.index) == len(ids)


def test_a_database_that_is_not_a_cache_is_rebuilt(tmp_path: Path) -> None:
    ids, path = _filled_cache(tmp_path, 20)
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    conn.close()
    assert "not a cache of this zfsbackd" in _rebuilt(tmp_path, ids)


def test_cache_of_another_store_is_not_used(tmp_path: Path) -> None:
    mine = _engine(tmp_path / "a")
    other = _engine(tmp_path / "b")
    store, foreign = mine.store(), other.store()
    store.load_index()
    foreign.load_index()
    ids = _fill(store, 32, seed=1)
    foreign_ids = _fill(foreign, 32, seed=2)
    foreign.index.close()
    store.index.close()
    # someone copies the other store's cache over this one's
    _cache_file(mine, store).write_bytes(_cache_file(other, foreign).read_bytes())

    reopened = _engine(tmp_path / "a").store()
    reopened.load_index()
    assert f"made for store {foreign.store_id}" in (reopened.index.rebuilt_reason or "")
    assert all(b in reopened.index for b in ids)
    assert not any(b in reopened.index for b in foreign_ids)


def test_wrong_cached_location_is_rebuilt_and_read(tmp_path: Path) -> None:
    """A cache whose row points elsewhere in the pack: the read checks the header, rebuilds, succeeds."""
    engine = _engine(tmp_path)
    store = engine.store()
    store.load_index()
    ids = _fill(store, 40)
    first = store.read_blob(ids[3], what="before")
    with sqlite3.connect(_cache_file(engine, store)) as conn:
        conn.execute("UPDATE blobs SET offset = offset + 16 WHERE blob_id = ?", (ids[3],))
    conn.close()
    assert store.index.get(ids[3]).offset == store.index.get(ids[3]).offset  # type: ignore[union-attr]
    assert store.read_blob(ids[3], what="after") == first
    assert store.index.rebuilt_reason is None  # rebuilt during the read, not at open
    header = {e.blob_id: e for e in store.read_pack_header(store.index.get(ids[3]).pack_id)}  # type: ignore[union-attr]
    assert store.index.get(ids[3]).offset == header[ids[3]].offset  # type: ignore[union-attr]


_CHILD = """
import sys
from zfsbackd.config import load_config
from zfsbackd.engine.engine import Engine
store = Engine(load_config(sys.argv[1])).store()
store.load_index(record_adopted=False)
"""


def test_crash_while_the_cache_is_written(tmp_path: Path) -> None:
    """SIGKILL inside the transaction that merges the index objects: the next open rolls it back, re-reads."""
    store = _engine(tmp_path, "writer-state").store()
    store.load_index()
    ids = _fill(store, 96)
    objects = len(list(store.objects.list(INDEX_PREFIX)))
    config = write_config(tmp_path, {"src": tmp_path / "src"})  # state_dir tmp_path/state: empty
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZFSBACKD_FAULT_POINT": "index-cache-written:1"}
    cache = cache_directory(tmp_path / "state", store.store_id) / CACHE_FILE
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(config)], env=env, capture_output=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Path(f"{cache}-wal").stat().st_size > 16 * KiB  # the rows were written, uncommitted

    fresh = Engine(load_config(config)).store()
    before = _index_gets(fresh)
    fresh.load_index()
    assert fresh.index.rebuilt_reason is None  # a valid cache: the killed transaction was rolled back
    assert _index_gets(fresh) - before == objects  # nothing of it was kept: every object read again
    assert all(b in fresh.index for b in ids) and len(fresh.index) == len(ids)


# ------------------------------------------------------------ garbage collection elsewhere
def test_gc_on_another_host_replaces_index_objects(tmp_path: Path) -> None:
    mine = _engine(tmp_path).store()
    mine.load_index()
    ids = _fill(mine, 64)
    old_keys = set(mine.index_keys)
    # a damaged index object makes collection consolidate
    bad = next(iter(sorted(old_keys)))
    path = tmp_path / "store" / bad
    path.write_bytes(path.read_bytes()[:-7])
    other = _engine(tmp_path, "state-other").store()
    result = collect_garbage(other, grace_seconds=10**6)  # young packs: none deleted, index consolidated
    # the old objects, and the one recording the packs it adopted for the damaged object
    assert result.index_objects_replaced == len(old_keys) + 1 and result.packs_deleted == 0
    (consolidated,) = [info.key for info in other.objects.list(INDEX_PREFIX)]

    again, reads = _reopen(tmp_path)
    assert reads == 1  # only the consolidated object
    assert again.index_keys == {consolidated} and not again.unreadable_indexes
    assert all(b in again.index for b in ids) and again.read_blob(ids[0], what="test")
    assert check_store(again).errors == []


def test_gc_on_another_host_deletes_packs(tmp_path: Path) -> None:
    mine = _engine(tmp_path).store()
    mine.load_index()
    ids = _fill(mine, 48)
    other = _engine(tmp_path, "state-other").store()
    result = collect_garbage(other, grace_seconds=0)  # no backup references anything: all of it goes
    assert result.packs_deleted >= 3

    again, reads = _reopen(tmp_path)
    assert reads == 1
    assert not any(b in again.index for b in ids)
    assert again.index.pack_ids() == set()


def test_unreadable_index_object_is_reported_and_its_packs_adopted(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = engine.store()
    store.load_index()
    ids = _fill(store, 48)
    bad = sorted(store.index_keys)[0]
    (tmp_path / "store" / bad).write_bytes(b"garbage")

    # this host had absorbed it before the damage; check re-reads every object and reports it
    cached = _engine(tmp_path).store()
    result = check_store(cached)
    assert any(bad in error for error in result.errors)
    assert all(b in cached.index for b in ids)

    # a host that never saw it adopts its packs from their headers, reports it, and so does every open
    fresh, _ = _reopen(tmp_path, "state-fresh")
    assert [u.key for u in fresh.unreadable_indexes] == [bad]
    assert all(b in fresh.index for b in ids)
    again, _ = _reopen(tmp_path, "state-fresh")
    assert [u.key for u in again.unreadable_indexes] == [bad]
    assert all(b in again.index for b in ids)


def test_pack_vanished_without_index_change_is_dropped(tmp_path: Path) -> None:
    """An adopted pack (no index lists it) deleted from the store leaves the cache at the next sync."""
    store = _engine(tmp_path).store()
    store.load_index()
    with PackWriter(store, pack_size=8 * KiB, checkpoint_every=100) as writer:
        blob_id, _ = writer.add(BlobType.DATA, random.Random(5).randbytes(16 * KiB))
        # no flush: the pack is uploaded (closing waits) but no index object names it
    loc = store.index.get(blob_id)
    assert loc is not None
    fresh, _ = _reopen(tmp_path)  # adopts it (and records an index object for it)
    assert blob_id in fresh.index
    for key in list(fresh.index_keys):
        (tmp_path / "store" / key).unlink()
    (tmp_path / "store" / pack_key(loc.pack_id)).unlink()
    again, _ = _reopen(tmp_path)
    assert blob_id not in again.index


def _data_listings(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prefixes ``store`` lists from now on, with ``data/`` ones counted."""
    prefixes: list[str] = []
    real = store.objects.list

    def listing(prefix: str = "") -> Any:
        prefixes.append(prefix)
        return real(prefix)

    monkeypatch.setattr(store.objects, "list", listing)
    return prefixes


def test_a_sync_lists_data_only_when_that_can_find_something(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing ``data/`` costs one request per 1,000 packs and a set of every pack id: a sync does it on
    a cache's first sync, for a resumed writer (``adopt``), and once a day; an ordinary open lists
    ``index/`` only, and a pack no index names (another host's killed writer) waits for one of those."""
    a = _engine(tmp_path, "state-a").store()
    a.load_index()
    _fill(a, 32)
    b = _engine(tmp_path, "state-b").store()
    first = _data_listings(b, monkeypatch)
    b.load_index()
    assert any(p.startswith("data/") for p in first)  # its first sync

    with PackWriter(a, pack_size=8 * KiB, checkpoint_every=100) as writer:  # A is killed before its index
        orphan, _ = writer.add(BlobType.DATA, random.Random(6).randbytes(16 * KiB))
    b = _engine(tmp_path, "state-b").store()
    ordinary = _data_listings(b, monkeypatch)
    b.load_index()
    assert ordinary == ["index/"] and orphan not in b.index
    b.load_index(force=True, adopt=True)
    assert orphan in b.index

    c = _engine(tmp_path, "state-c").store()
    c.load_index()
    with PackWriter(a, pack_size=8 * KiB, checkpoint_every=100) as writer:
        later, _ = writer.add(BlobType.DATA, random.Random(7).randbytes(16 * KiB))
    c.index.set_data_listed_at(time.time() - DATA_LISTING_INTERVAL - 1)
    c = _engine(tmp_path, "state-c").store()
    daily = _data_listings(c, monkeypatch)
    c.load_index()
    assert any(p.startswith("data/") for p in daily) and later in c.index


def test_cache_found_corrupt_while_in_use_is_rebuilt(tmp_path: Path) -> None:
    """Damage past the pages checked at open: the query that meets it rebuilds the cache and answers."""
    ids, path = _filled_cache(tmp_path, 400)
    size = path.stat().st_size
    with path.open("r+b") as f:  # every page but the first four (schema, meta, …) overwritten
        f.seek(4 * 4096)
        f.write(random.Random(9).randbytes(size - 4 * 4096))

    again, _ = _reopen(tmp_path)
    assert again.index.rebuilt_reason is None  # it looked whole when opened
    assert all(b in again.index for b in ids) and again.read_blob(ids[7], what="test")
    assert again.index.pack_ids() == set(again.list_pack_ids())


def test_lookup_meeting_corruption_rebuilds_and_answers(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = engine.store()
    store.load_index()
    ids = _fill(store, 400)
    again, _ = _reopen(tmp_path)  # synced, its blob pages not read yet
    path = _cache_file(engine, store)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name = 'blobs'")]
    conn.close()
    with path.open("r+b") as f:
        for page in pages:
            f.seek((page - 1) * 4096)
            f.write(random.Random(page).randbytes(4096))
    assert all(again.index.get(b) is not None for b in ids)  # the first one met the damage and rebuilt it
    assert again.index._generation >= 1
    assert again.read_blob(ids[9], what="test")
