"""Reading trees ahead of a walk is bounded by entries, not by a count of trees (issue 13, item 1).

The read-ahead (``TreeReadAhead``) is tested on synthetic trees first — many small
directories, one huge one, directories the walk passes over — then through the
archiver (an incremental backup over 2,000 parent directories) and the restorer
(a full restore planned in many small batches). Each asserts the peak number of
entries held at once, the counter the classes expose for this; memory targets in
MiB belong to the benchmark (bench/scale.py), not here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import assert_trees_identical

from zfsbackd.engine import archiver as archiver_module
from zfsbackd.engine import restorer as restorer_module
from zfsbackd.engine.archiver import Archiver
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.engine.restorer import Restorer
from zfsbackd.pools import TREE_READ_AHEAD_WORKERS as READ_AHEAD_WORKERS
from zfsbackd.snapshot import take_snapshot
from zfsbackd.snapshot.detect import choose_provider
from zfsbackd.store import writer as writer_module
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.tree import TreeReadAhead, expected_entries
from zfsbackd.store.writer import PackWriter

# --------------------------------------------------------------- synthetic trees
#: tree id → (entries that are not directories, subtree ids in walk order)
Trees = dict[str, tuple[int, list[str]]]


def _wide_and_deep(dirs: int, files_per_dir: int) -> Trees:
    """A root with ``dirs`` subdirectories in groups of 10, each holding ``files_per_dir`` files."""
    trees: Trees = {}
    groups = []
    for g in range(dirs // 10):
        leaves = [f"leaf-{g}-{i}" for i in range(10)]
        for leaf in leaves:
            trees[leaf] = (files_per_dir, [])
        trees[f"group-{g}"] = (0, leaves)
        groups.append(f"group-{g}")
    trees["root"] = (0, groups)
    return trees


class _Synthetic:
    """A TreeReadAhead over ``trees`` that counts reads; results are (tree id, entries)."""

    def __init__(
        self, trees: Trees, max_entries: int, fail: str | None = None, workers: int = READ_AHEAD_WORKERS
    ) -> None:
        self.trees = trees
        self.reads = 0
        self.fail = fail
        self._lock = threading.Lock()
        self.ahead: TreeReadAhead[None, tuple[str, int]] = TreeReadAhead(
            self._read, self._children, lambda result: result[1], [("root", None)], max_entries=max_entries,
            workers=workers,
        )

    def _read(self, tree_id: str, _arg: None) -> tuple[str, int]:
        with self._lock:
            self.reads += 1
        if tree_id == self.fail:
            raise OSError(5, "unreadable tree")
        files, subdirs = self.trees[tree_id]
        return tree_id, files + len(subdirs)

    def _children(self, result: tuple[str, int], _arg: None) -> list[tuple[str, None, int]]:
        """Subtrees with what their parent knows of their size: exact for a leaf (as a directory node's totals)."""
        return [(child, None, self._expected(child)) for child in self.trees[result[0]][1]]

    def _expected(self, tree_id: str) -> int:
        files, subdirs = self.trees[tree_id]
        return 0 if subdirs else files

    def walk(self, tree_id: str = "root", skip: frozenset[str] = frozenset()) -> list[str]:
        """Take every tree depth first as a walk would (iteratively), passing over ``skip``; the order taken."""
        taken = []
        stack = [tree_id]
        while stack:
            current = stack.pop()
            result = self.ahead.take(current)
            assert result is not None, f"{current} was not read ahead"
            assert result[0] == current
            taken.append(current)
            stack.extend(reversed([c for c in self.trees[current][1] if c not in skip]))
        return taken


def test_read_ahead_of_2000_directories_stays_within_its_bound() -> None:
    trees = _wide_and_deep(2000, files_per_dir=30)
    bound = 200
    synthetic = _Synthetic(trees, max_entries=bound)
    with synthetic.ahead:
        taken = synthetic.walk()
    assert len(taken) == len(trees) and synthetic.reads == len(trees), "each tree read once, in the walk's order"
    largest = max(files + len(subdirs) for files, subdirs in trees.values())
    # Reading pauses at the bound; the reads already under way may each add one tree.
    assert 0 < synthetic.ahead.peak_entries <= bound + READ_AHEAD_WORKERS * largest
    assert synthetic.ahead.held_entries == 0


def test_reads_under_way_count_against_the_bound() -> None:
    """Eight read threads must not each add a tree past the bound: a read under way counts as what it will hold.

    What may exceed the bound: the last read started below it, and the tree the
    walk waits for (read at once, whatever is held).
    """
    trees = _wide_and_deep(2000, files_per_dir=500)
    bound = 2000
    synthetic = _Synthetic(trees, max_entries=bound, workers=8)
    with synthetic.ahead:
        taken = synthetic.walk()
    assert len(taken) == len(trees)
    largest = max(files + len(subdirs) for files, subdirs in trees.values())
    assert 0 < synthetic.ahead.peak_entries <= bound + 2 * largest


def test_one_huge_directory_is_read_alone() -> None:
    trees: Trees = {"root": (0, ["small-1", "huge", "small-2"]), "small-1": (5, []), "small-2": (5, [])}
    trees["huge"] = (200_000, [])
    synthetic = _Synthetic(trees, max_entries=1000)
    with synthetic.ahead:
        assert synthetic.walk() == ["root", "small-1", "huge", "small-2"]
    # The walk cannot do without the directory it is in, however large; nothing beyond it piles up.
    assert synthetic.ahead.peak_entries <= 200_000 + 1000 + READ_AHEAD_WORKERS * 5


def test_directories_the_walk_passes_over_are_let_go() -> None:
    """Subtrees deleted since the parent backup (or clean under a change list) are never taken: they
    are dropped when the walk goes past them, so they cannot fill the bound and stall the read-ahead."""
    trees = _wide_and_deep(500, files_per_dir=20)
    skipped = frozenset(f"group-{g}" for g in range(0, 50, 2))
    synthetic = _Synthetic(trees, max_entries=100)
    with synthetic.ahead:
        taken = synthetic.walk(skip=skipped)
    assert not skipped & set(taken)
    assert synthetic.ahead.held_entries == 0
    assert synthetic.ahead.peak_entries <= 100 + READ_AHEAD_WORKERS * 20


def test_a_tree_that_cannot_be_read_fails_where_the_walk_takes_it() -> None:
    synthetic = _Synthetic(_wide_and_deep(20, files_per_dir=2), max_entries=50, fail="leaf-1-3")
    with synthetic.ahead, pytest.raises(OSError, match="unreadable tree"):
        synthetic.walk()


def test_an_unforeseen_tree_is_left_to_the_caller() -> None:
    synthetic = _Synthetic(_wide_and_deep(20, files_per_dir=2), max_entries=50)
    with synthetic.ahead:
        assert synthetic.ahead.take("not-in-the-parent") is None
        assert synthetic.walk()[0] == "root"


# ------------------------------------------------------ archiver and restorer
DIRS = 2000
BOUND = 300


def _many_directories(root: Path) -> None:
    for g in range(DIRS // 20):
        for i in range(20):
            leaf = root / f"g{g:03d}" / f"d{i:02d}"
            leaf.mkdir(parents=True)
            (leaf / "f").write_bytes(f"{g}/{i}\n".encode())


def test_incremental_backup_reads_the_parent_ahead_within_the_bound(xfs_dir: Path, tmp_path: Path) -> None:
    _many_directories(xfs_dir)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    fs = engine.config.file_system("fs-src")
    snapshot = take_snapshot(fs, "backup-00000000000000001", choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            archiver = Archiver(store, writer, snapshot, parent.root_tree, read_ahead_entries=BOUND)
            root, stats = archiver.run()
            writer.flush()
    finally:
        snapshot.release()
    assert root == parent.root_tree, "nothing changed: the very same trees, the same root id"
    assert stats.files_read == 0 and stats.files_unchanged == DIRS
    # A group directory holds 20 entries, the root 100: the reads under way add at most one tree each.
    assert 0 < archiver.read_ahead_peak_entries <= BOUND + READ_AHEAD_WORKERS * 100


def test_directories_waiting_for_their_file_reads_are_bounded(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk goes on past a directory whose files are still being read, but holds at most
    UNFINISHED_DIRS such directories: with reads held back, it reaches the bound and waits there."""
    _many_directories(xfs_dir)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    for g in range(DIRS // 20):
        (xfs_dir / f"g{g:03d}" / "d07" / "f").write_bytes(b"changed\n")
    monkeypatch.setattr(archiver_module, "UNFINISHED_DIRS", 5)
    reads_may_go = threading.Event()
    original = Archiver._read_files

    def held_back(self: Archiver, jobs: list) -> list:
        reads_may_go.wait(30)
        return original(self, jobs)

    monkeypatch.setattr(Archiver, "_read_files", held_back)
    store = engine.store()
    fs = engine.config.file_system("fs-src")
    snapshot = take_snapshot(fs, "backup-00000000000000001", choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            archiver = Archiver(store, writer, snapshot, parent.root_tree)
            timer = threading.Timer(1.0, reads_may_go.set)
            timer.start()
            root, stats = archiver.run()
            writer.flush()
    finally:
        snapshot.release()
    assert stats.files_read == DIRS // 20 and stats.files_unchanged == DIRS - DIRS // 20
    assert archiver.unfinished_peak_dirs == 5 + 1, "it went on past waiting directories, up to the bound"
    reference = engine.create_backup(BackupRequest("fs-src"))
    assert reference.root_tree == root, "the same trees as a backup that waited for nothing"


def test_full_restore_streams_trees_and_plans_reads_in_batches(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_directories(xfs_dir)
    (xfs_dir / "g000" / "d00" / "link").hardlink_to(xfs_dir / "g000" / "d00" / "f")
    (xfs_dir / "g099" / "d19" / "link").hardlink_to(xfs_dir / "g000" / "d00" / "f")  # across batches
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    record = engine.create_backup(BackupRequest("fs-src"))
    monkeypatch.setattr(restorer_module, "BATCH_FILES", 64)  # ~32 batches: packs are shared between them
    target = tmp_path / "target"
    target.mkdir()
    restorer = Restorer(engine.store(), record, target, read_ahead_entries=BOUND)
    result = restorer.run()
    assert_trees_identical(xfs_dir, result.path)
    assert result.files == DIRS + 2
    assert 0 < restorer.read_ahead_peak_entries <= BOUND + READ_AHEAD_WORKERS * 100


def test_a_directory_node_tells_its_entries_only_when_it_has_no_subdirectories() -> None:
    assert expected_entries({"type": "dir", "tree_files": 700, "tree_dirs": 0}) == 700
    assert expected_entries({"type": "dir", "tree_files": 700, "tree_dirs": 3}) == 0  # its own entries unknown
    assert expected_entries({"type": "dir"}) == 0  # no totals (older trees)
    for bad in ("700", -5, True, None, 7.5):
        assert expected_entries({"type": "dir", "tree_files": bad, "tree_dirs": 0}) == 0


def test_a_writer_holds_no_more_packs_than_its_slots_and_the_one_it_fills(tmp_path: Path) -> None:
    """Four threads add blobs while uploads are slow: a thread that fills a pack while every slot
    is taken must not take it and wait holding it while the others fill more (the old writer held
    one such pack per adding thread)."""
    engine = Engine(make_config(tmp_path, {}))
    store = engine.store()
    store.load_index()
    held, peak, lock = [0], [0], threading.Lock()
    put = store.objects.put_if_absent

    def slow_put(key: str, data: object) -> object:
        threading.Event().wait(0.02)
        return put(key, data)

    store.objects.put_if_absent = slow_put  # type: ignore[method-assign]
    with PackWriter(store, pack_size=4096, max_packs_in_flight=1, upload_threads=1) as writer:
        take, slots = writer._take_pack, writer._slots

        def counted_take() -> tuple[bytearray, list]:
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            return take()

        class CountedSlots:
            """The writer's slots; a pack is let go when its upload gives its slot back."""

            acquire = slots.acquire

            def release(self) -> None:
                with lock:
                    held[0] -= 1
                slots.release()

        writer._take_pack = counted_take  # type: ignore[method-assign]
        writer._slots = CountedSlots()  # type: ignore[assignment]

        def add() -> None:
            for _ in range(40):
                writer.add(BlobType.DATA, os.urandom(1500))

        threads = [threading.Thread(target=add) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.flush()
    assert writer.stats.packs_uploaded > 20
    # One slot: the pack uploading, and at the end the last partial pack taken while it waits for the slot.
    assert peak[0] <= 2, f"{peak[0]} packs taken and not yet uploaded at once, with one slot"


def test_trees_are_stored_on_the_tree_thread_within_a_bound_of_queued_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``add_tree`` gives the id at once and leaves the tree to the writer's tree thread; past the bound of
    queued bytes the caller waits (one tree larger than the bound still goes, alone), and after ``flush``
    every tree is stored and readable."""
    monkeypatch.setattr(writer_module, "TREES_QUEUED_BYTES", 1000)
    engine = Engine(make_config(tmp_path, {}))
    store = engine.store()
    store.load_index()
    go = threading.Event()
    with PackWriter(store) as writer:
        encode = writer._encode

        def held_encode(*args: object) -> None:
            go.wait(30)
            encode(*args)  # type: ignore[arg-type]

        writer._encode = held_encode  # type: ignore[method-assign]
        trees = [b'{"nodes":[%d]}' % i + b" " * 590 for i in range(3)]  # 603 bytes each
        first = writer.add_tree(trees[0])  # queued; a second one would pass the bound
        second: list[bytes] = []
        adder = threading.Thread(target=lambda: second.append(writer.add_tree(trees[1])))
        adder.start()
        adder.join(0.3)
        assert adder.is_alive() and writer._trees_queued == len(trees[0])  # waits while the first is not stored
        go.set()
        adder.join(30)
        third = writer.add_tree(trees[2] * 3)  # 1,809 bytes: larger than the bound, queued alone
        writer.flush()
        assert writer._trees_queued == 0
    for tree_id, plaintext in zip([first, second[0], third], [trees[0], trees[1], trees[2] * 3], strict=True):
        assert tree_id == store.hasher.blob_id(plaintext)
        assert store.read_tree(tree_id, what="a tree") == plaintext
    assert writer.stats.blobs_new == 3


def test_an_error_storing_a_tree_is_raised_by_flush(tmp_path: Path) -> None:
    """A tree that cannot be stored (a full disk under the tree cache) fails the backup at ``flush``,
    which the engine calls before any record names the trees: never a backup naming a tree it lacks."""
    engine = Engine(make_config(tmp_path, {}))
    store = engine.store()
    store.load_index()

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device", "/var/lib/zfsbackd/cache/trees")

    store.remember_tree = full_disk  # type: ignore[method-assign]
    with PackWriter(store) as writer:
        writer.add_tree(b'{"nodes":[]}')
        with pytest.raises(OSError, match="No space left"):
            writer.flush()
