"""The listing cache (zfsbackd.store.listingcache): unchanged directories taken whole by their listing.

What must hold: a backup that takes directories by their listing makes exactly the trees the
entry-by-entry comparison makes (same root tree id) for every kind of change, reads again what
changed, and never trusts a row it cannot verify or a file that is not its own.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from enginekit import REPO, cli_command, make_config, write_config
from fsfixtures import assert_trees_identical, populate_sample_tree

from zfsbackd import pools
from zfsbackd.config import load_config
from zfsbackd.engine.archiver import Archiver
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.store import listingcache
from zfsbackd.store.listingcache import ListingCache, ListingSummary, listing_digest
from zfsbackd.store.records import BackupRecord

STORE_ID = "0123456789abcdef0123456789abcdef"


def _mac(data: bytes) -> bytes:
    return b"mac" + len(data).to_bytes(4, "big") + data[-8:]


def _summary(digest: bytes = b"\x07" * 32, files: int = 3) -> ListingSummary:
    return ListingSummary(digest, files, 4096, 1, 0, [{"name": "sub", "type": "dir", "subtree": "ab" * 32}])


def _cache(tmp_path: Path, **kwargs: int) -> ListingCache:
    return ListingCache(tmp_path / "cache", STORE_ID, _mac, **kwargs)


# ---------------------------------------------------------------- the digest
def _stat(path: Path) -> os.stat_result:
    return os.lstat(path)


def test_the_digest_changes_with_every_field_the_entry_test_compares(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1234")
    b.write_bytes(b"x")
    names = [b"a", b"b"]
    base = listing_digest(names, [_stat(a), _stat(b)])
    assert base == listing_digest(names, [_stat(a), _stat(b)])
    assert base != listing_digest([b"a", b"c"], [_stat(a), _stat(b)]), "a name"
    assert base != listing_digest([b"b", b"a"], [_stat(b), _stat(a)]), "the order"
    assert base != listing_digest([b"a/b"], [_stat(a), _stat(b)]), "names are not run together"
    fields = ("st_mode", "st_ino", "st_ctime_ns", "st_mtime_ns", "st_size")
    for name in fields:
        values = {f: getattr(os.lstat(a), f) for f in fields}
        assert base == listing_digest(names, [_FakeStat(**values), _stat(b)])  # type: ignore[list-item]
        values[name] += 1
        assert base != listing_digest(names, [_FakeStat(**values), _stat(b)]), name  # type: ignore[list-item]
    assert listing_digest(names, [_FakeStat(0, 2**64 - 1, 0, 0, 0), _stat(b)]) is None  # type: ignore[list-item]


class _FakeStat:
    def __init__(self, st_mode: int, st_ino: int, st_ctime_ns: int, st_mtime_ns: int, st_size: int) -> None:
        self.st_mode, self.st_ino, self.st_ctime_ns = st_mode, st_ino, st_ctime_ns
        self.st_mtime_ns, self.st_size = st_mtime_ns, st_size


# ---------------------------------------------------------------- the cache file
def test_rows_persist_and_are_verified(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.put(b"\x01" * 32, _summary())
    assert cache.get(b"\x01" * 32) == _summary(), "a row waiting to be written is already answered"
    cache.close()

    again = _cache(tmp_path)
    assert again.rebuilt_reason is None
    assert again.get(b"\x01" * 32) == _summary()
    assert again.get(b"\x02" * 32) is None
    again.close()

    conn = sqlite3.connect(tmp_path / "cache" / listingcache.CACHE_FILE)
    forged = _summary(files=99).encode()
    conn.execute("UPDATE listings SET summary = ? WHERE tree_id = ?", (forged, b"\x01" * 32))
    conn.commit()
    conn.close()
    third = _cache(tmp_path)
    assert third.get(b"\x01" * 32) is None, "a row whose MAC does not verify is not used"
    third.close()
    conn = sqlite3.connect(tmp_path / "cache" / listingcache.CACHE_FILE)
    assert conn.execute("SELECT count(*) FROM listings").fetchone()[0] == 0, "... and is dropped"
    conn.close()


@pytest.mark.parametrize("damage", ["another store", "older format", "garbage", "truncated"])
def test_a_file_that_is_not_this_caches_is_replaced(tmp_path: Path, damage: str) -> None:
    cache = _cache(tmp_path)
    for i in range(200):
        cache.put(i.to_bytes(32, "big"), _summary())
    cache.close()
    path = tmp_path / "cache" / listingcache.CACHE_FILE
    if damage == "another store":
        ListingCache(tmp_path / "cache", "f" * 32, _mac).close()
    elif damage == "older format":
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = '0' WHERE name = 'format'")
        conn.commit()
        conn.close()
    elif damage == "garbage":
        path.write_bytes(os.urandom(8192))
    else:
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    fresh = _cache(tmp_path)
    assert fresh.rebuilt_reason is not None, damage
    assert fresh.get((5).to_bytes(32, "big")) is None
    fresh.put(b"\x09" * 32, _summary())
    fresh.flush()
    assert fresh.get(b"\x09" * 32) == _summary()
    fresh.close()


def test_an_unusable_file_system_turns_the_cache_off(tmp_path: Path) -> None:
    (tmp_path / "cache" / listingcache.CACHE_FILE).mkdir(parents=True)  # where the file should be: a directory
    cache = _cache(tmp_path)
    cache.put(b"\x01" * 32, _summary())
    cache.flush()
    assert cache.get(b"\x01" * 32) is None
    cache.close()


def test_past_its_bound_the_least_recently_used_rows_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    day = [20_000]
    monkeypatch.setattr(listingcache, "_today", lambda: day[0])
    cache = _cache(tmp_path, max_bytes=1 << 20)  # past it with the second 2,000 rows
    old = [i.to_bytes(32, "big") for i in range(2000)]
    for tree_id in old:
        cache.put(tree_id, _summary())
    cache.flush()
    day[0] += 1
    assert cache.get(old[0]) is not None  # used today: kept
    new = [(10_000 + i).to_bytes(32, "big") for i in range(2000)]
    for tree_id in new:
        cache.put(tree_id, _summary())
    cache.flush()
    conn = sqlite3.connect(cache.path)
    rows = conn.execute("SELECT count(*) FROM listings").fetchone()[0]
    conn.close()
    assert rows < 4000, "evicted"
    assert cache.get(old[0]) is not None and cache.get(new[-1]) is not None
    assert sum(cache.get(t) is not None for t in old[1:]) < 1999, "the rows not used since go first"
    cache.close()


# ---------------------------------------------------------------- backups
def _populate(root: Path) -> None:
    populate_sample_tree(root)
    for d in range(6):
        inner = root / f"dir{d}" / "inner"
        inner.mkdir(parents=True)
        for f in range(8):
            (inner / f"f{f}").write_bytes(os.urandom(100 + d * 10 + f))
        (root / f"dir{d}" / "top").write_bytes(b"t" * d)
        os.symlink(f"inner/f{d}", root / f"dir{d}" / "link")


def _engine(tmp_path: Path, root: Path) -> Engine:
    return Engine(make_config(tmp_path, {"src": root}, extra_fs={"allow_copy_snapshots": True}))


def _backup_without_listings(engine: Engine) -> BackupRecord:
    """A backup that compares every entry one by one (the cache taken away for it)."""
    store = engine.store()
    cache, store.listing_cache = store.listing_cache, None
    try:
        return engine.create_backup(BackupRequest("fs-src"))
    finally:
        store.listing_cache = cache


def _same_mtime_new_content(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _changes(root: Path) -> dict[str, tuple[object, ...]]:
    """Every kind of change the per-entry test notices, each in its own directory (name → what it changes)."""
    return {
        "content, same size and mtime": (_same_mtime_new_content, root / "dir0" / "inner" / "f3"),
        "mode": (os.chmod, root / "dir1" / "inner" / "f1", 0o600),
        "rename": (os.rename, root / "dir2" / "inner" / "f2", root / "dir2" / "inner" / "renamed"),
        "symlink target": (_retarget, root / "dir3" / "link"),
        "xattr": (os.setxattr, root / "dir4" / "inner" / "f4", "user.note", b"hello"),
        "hard link": (os.link, root / "dir5" / "inner" / "f5", root / "dir5" / "second-name"),
    }


def _retarget(link: Path) -> None:
    link.unlink()
    os.symlink("inner/elsewhere", link)


def test_unchanged_directories_are_taken_by_their_listing_with_the_same_trees(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    engine = _engine(tmp_path, root)
    first = engine.create_backup(BackupRequest("fs-src"))
    assert first.stats.directories_listed_as_before == 0  # type: ignore[attr-defined]

    unchanged = engine.create_backup(BackupRequest("fs-src"))
    directories = unchanged.stats.directories
    assert unchanged.root_tree == first.root_tree
    # Every directory but those holding entries that are never backed up (sockets, FIFOs: not in the tree).
    assert 0 < unchanged.stats.directories_listed_as_before <= directories  # type: ignore[attr-defined]
    assert unchanged.stats.files_read == 0 and unchanged.stats.files_unchanged == unchanged.stats.files
    assert (unchanged.stats.symlinks, unchanged.stats.other) == (first.stats.symlinks, first.stats.other)
    again = engine.create_backup(BackupRequest("fs-src"))
    assert again.stats.directories_listed_as_before == unchanged.stats.directories_listed_as_before  # type: ignore[attr-defined]
    api = again.to_api()["Stats"]  # what describe-backups and create-backup show
    assert api["DirectoriesListedAsBefore"] == again.stats.directories_listed_as_before  # type: ignore[attr-defined]
    assert api["FilesUnchanged"] == api["Files"] and api["FilesRead"] == 0

    for what, (change, *args) in _changes(root).items():
        change(*args)  # type: ignore[operator]
        with_cache = engine.create_backup(BackupRequest("fs-src"))
        without = _backup_without_listings(engine)
        assert with_cache.root_tree == without.root_tree, what
        assert with_cache.root_tree != first.root_tree, what
        assert without.stats.files_read == 0, what  # (against the backup just made)
        first = with_cache
    assert engine.check(read_data=True).errors == []
    target = tmp_path / "out"
    target.mkdir()
    assert_trees_identical(root, engine.restore_backup(first.backup_id, target).path)


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    engine = _engine(tmp_path, root)
    engine.create_backup(BackupRequest("fs-src"))
    engine.create_backup(BackupRequest("fs-src"))
    _same_mtime_new_content(root / "dir2" / "inner" / "f6")
    changed = engine.create_backup(BackupRequest("fs-src"))
    assert changed.stats.files_read == 1
    target = tmp_path / "out"
    target.mkdir()
    restored = engine.restore_backup(changed.backup_id, target).path
    assert (restored / "dir2" / "inner" / "f6").read_bytes() == (root / "dir2" / "inner" / "f6").read_bytes()


def test_a_directory_whose_parent_tree_became_unreadable_is_archived_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken by its listing, then a subdirectory changed, and its parent backup's tree cannot be read
    any more (gone from the tree cache and damaged in the store): its entries are read again."""
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    engine = _engine(tmp_path, root)
    engine.create_backup(BackupRequest("fs-src"))
    engine.create_backup(BackupRequest("fs-src"))  # the listings of the first backup's trees are known now
    _same_mtime_new_content(root / "dir1" / "inner" / "f0")  # inner's listing changes, dir1's does not

    read = Archiver._read_parent_tree
    lost: list[str] = []

    def unreadable_dir1(self: Archiver, tree_id: str) -> object:
        nodes = read(self, tree_id)
        if nodes is not None and b"inner" in nodes and b"top" in nodes and nodes[b"top"].get("size") == 1:
            lost.append(tree_id)
            return None
        return nodes

    monkeypatch.setattr(Archiver, "_read_parent_tree", unreadable_dir1)
    changed = engine.create_backup(BackupRequest("fs-src"))
    monkeypatch.undo()
    assert lost, "dir1's tree was asked for once its subdirectory changed"
    assert changed.stats.files_read == 2  # the changed file, and dir1's own file `top`, read again
    without = _backup_without_listings(engine)
    assert changed.root_tree == without.root_tree
    target = tmp_path / "out"
    target.mkdir()
    assert_trees_identical(root, engine.restore_backup(changed.backup_id, target).path)


def test_worker_processes_share_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    engine = _engine(tmp_path, root)
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 5)
    monkeypatch.setattr(pools, "ARCHIVE_PROCESSES", 3)
    first = engine.create_backup(BackupRequest("fs-src"))
    second = engine.create_backup(BackupRequest("fs-src"))
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10**9)
    single = engine.create_backup(BackupRequest("fs-src"))
    assert first.root_tree == second.root_tree == single.root_tree
    # Rows written by the workers (the directories they archived) serve the single process, and back.
    assert second.stats.directories_listed_as_before == single.stats.directories_listed_as_before > 6  # type: ignore[attr-defined]


def test_a_backup_killed_while_the_cache_is_written_leaves_it_valid(tmp_path: Path) -> None:
    """SIGKILL inside the cache's write transaction (``listing-cache-written``): the rerun resumes the
    backup, the cache opens as it was (not rebuilt), and the backup after it takes directories by listing."""
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    config = write_config(tmp_path, {"src": root}, extra_fs={"allow_copy_snapshots": True})
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZFSBACKD_FAULT_POINT": "listing-cache-written:1"}
    proc = subprocess.run(
        cli_command(config, "create-backup", "--file-system-id", "fs-src"),
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    engine = Engine(load_config(config))
    cache = engine.store().listing_cache
    assert cache is not None and cache.rebuilt_reason is None
    resumed = engine.create_backup(BackupRequest("fs-src"))
    assert resumed.stats.directories_listed_as_before == 0  # type: ignore[attr-defined]  # nothing was committed
    unchanged = engine.create_backup(BackupRequest("fs-src"))
    assert unchanged.root_tree == resumed.root_tree
    assert unchanged.stats.directories_listed_as_before > 0  # type: ignore[attr-defined]
    target = tmp_path / "out"
    target.mkdir()
    assert_trees_identical(root, engine.restore_backup(unchanged.backup_id, target).path)


@pytest.mark.parametrize("fs_kind", ["xfs", "btrfs"])
def test_snapshots_of_real_file_systems_are_taken_by_their_listing(
    fs_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """btrfs snapshots (a new device number each, the same inode numbers) and XFS reflink clones: an
    unchanged directory of the next snapshot has the listing of the one before, and a changed one not."""
    if fs_kind == "btrfs":
        root = request.getfixturevalue("btrfs_subvol")  # a subvolume: snapshotted whole
    else:
        root = request.getfixturevalue("xfs_dir") / "src"
        root.mkdir()
    for d in range(5):
        (root / f"d{d}").mkdir()
        for f in range(20):
            (root / f"d{d}" / f"f{f}").write_bytes(os.urandom(50 + f))
    engine = Engine(make_config(tmp_path, {"src": root}))
    first = engine.create_backup(BackupRequest("fs-src"))
    second = engine.create_backup(BackupRequest("fs-src"))
    assert second.snapshot["Provider"] == ("btrfs" if fs_kind == "btrfs" else "reflink")
    assert second.root_tree == first.root_tree
    assert second.stats.directories_listed_as_before == 6  # type: ignore[attr-defined]  # the root and d0 to d4
    _same_mtime_new_content(root / "d3" / "f7")
    third = engine.create_backup(BackupRequest("fs-src"))
    assert third.stats.files_read == 1
    assert third.stats.directories_listed_as_before == 5  # type: ignore[attr-defined]  # all but d3
    assert _backup_without_listings(engine).root_tree == third.root_tree
