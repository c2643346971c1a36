"""Backups guided by a list of changed paths (what `zfs diff` gives) equal a full walk.

The ZFS provider turns `zfs diff` into a ChangeSet; the archiver then skips
every directory nothing changed in. These tests drive the same archiver code
with a ChangeSet written by hand on XFS, so the logic is proven without ZFS;
tests/zfsvm/ proves it with real `zfs diff` output.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import threading
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import populate_sample_tree

from zfsbackd.engine import archiver as archiver_module
from zfsbackd.engine.archiver import Archiver
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.snapshot import take_snapshot
from zfsbackd.snapshot.base import ChangeSet
from zfsbackd.snapshot.detect import choose_provider
from zfsbackd.store.writer import PackWriter
from zfsbackd.zfs.sendstream import ZplAttributes


def _archive(engine: Engine, parent_root: str, changes: ChangeSet | None) -> tuple[str, object]:
    fs = engine.config.file_system("fs-src")
    store = engine.store()
    snapshot = take_snapshot(fs, "backup-00000000000000000", choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            root, stats = Archiver(store, writer, snapshot, parent_root, changes=changes).run()
            writer.flush()
    finally:
        snapshot.release()
    return root, stats


def _record_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, what each parsed tree was (the archiver's parse_tree calls), in order."""
    parsed: list[str] = []
    real_parse = archiver_module.parse_tree

    def recording_parse(raw: bytes, *, what: str) -> object:
        parsed.append(what)
        return real_parse(raw, what=what)

    monkeypatch.setattr(archiver_module, "parse_tree", recording_parse)
    return parsed


def _record_lstats(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """From now on, the path of each ``lstat`` by bytes path (the walk's own: ``_NamedEntry.stat``), in order."""
    stat_paths: list[bytes] = []
    real_lstat = os.lstat

    def recording_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if isinstance(path, bytes):
            stat_paths.append(path)
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(archiver_module.os, "lstat", recording_lstat)
    return stat_paths


class _RunArchiver(Archiver):
    """An archiver that keeps what :meth:`run` returned."""

    result: tuple[str, object]


def _archive_recording_listings(
    engine: Engine, parent_root: str | None, changes: ChangeSet, monkeypatch: pytest.MonkeyPatch
) -> tuple[_RunArchiver, list[bytes]]:
    """The archiver of one run with *changes*, and the directories it listed (``os.scandir``), sorted,
    relative to the snapshot's root."""
    listed: list[bytes] = []
    real_scandir = os.scandir

    def recording_scandir(path: bytes) -> object:
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(archiver_module.os, "scandir", recording_scandir)
    fs = engine.config.file_system("fs-src")
    store = engine.store()
    snapshot = take_snapshot(fs, "backup-00000000000000001", choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            archiver = _RunArchiver(store, writer, snapshot, parent_root, changes=changes)
            archiver.result = archiver.run()
            writer.flush()
        root = os.fsencode(snapshot.root)
    finally:
        snapshot.release()
    return archiver, sorted(os.path.relpath(path, root) for path in listed)


def test_change_set_walk_equals_full_walk(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    deep = xfs_dir / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(30):
        (deep / f"f{i}").write_text(f"file {i}\n")
    (xfs_dir / "quiet").mkdir()
    for i in range(50):
        (xfs_dir / "quiet" / f"q{i}").write_bytes(random.Random(i).randbytes(1000))
    (xfs_dir / "old-name").mkdir()
    (xfs_dir / "old-name" / "inside").write_text("moved with its dir\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))

    (deep / "f3").write_text("changed\n")  # modified
    (deep / "new").write_text("added\n")  # added
    (deep / "f4").unlink()  # removed
    os.rename(xfs_dir / "old-name", xfs_dir / "new-name")  # renamed directory
    os.chmod(xfs_dir / "a", 0o700)  # metadata only
    os.setxattr(deep / "f5", "user.tag", b"v")  # xattr only
    os.symlink("f5", deep / "link")  # new symlink
    touched = [
        b"a/b/c/f3",
        b"a/b/c/new",
        b"a/b/c/f4",
        b"old-name",
        b"new-name",
        b"a",
        b"a/b/c/f5",
        b"a/b/c/link",
        b"a/b/c",
    ]

    full_root, full_stats = _archive(engine, parent.root_tree or "", None)
    hinted_root, hinted_stats = _archive(engine, parent.root_tree or "", ChangeSet.from_paths(touched))

    assert hinted_root == full_root
    assert (hinted_stats.files, hinted_stats.bytes_total, hinted_stats.directories) == (  # type: ignore[attr-defined]
        full_stats.files,
        full_stats.bytes_total,
        full_stats.directories,
    )  # type: ignore[attr-defined]
    # Only the changed files are read, and "inside" with `zfs diff`'s paths: its directory is new under its
    # new name there. The full walk finds the renamed directory's node by its inode and compares with it.
    assert hinted_stats.files_read == 4  # type: ignore[attr-defined]
    assert full_stats.files_read == 3  # type: ignore[attr-defined]


def test_empty_change_set_reuses_the_parent_root(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    root, stats = _archive(engine, parent.root_tree or "", ChangeSet.from_paths([]))
    assert root == parent.root_tree
    assert stats.files == parent.stats.files and stats.files_read == 0  # type: ignore[attr-defined]


def test_unchanged_directories_keep_the_parents_trees_without_writing_them(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full walk (no change list) serializes only the trees of directories on the path of a change:
    every other directory's tree id is taken from the parent backup as it is, and the result is the
    same tree, id for id, as serializing every directory again."""
    populate_sample_tree(xfs_dir)
    deep = xfs_dir / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(5):
        (deep / f"f{i}").write_text(f"file {i}\n")
        (xfs_dir / f"side{i}").mkdir()
        (xfs_dir / f"side{i}" / "x").write_text("x\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    serialized: list[int] = []
    real = archiver_module.serialize_tree

    def counting(nodes: list[dict[str, object]]) -> bytes:
        serialized.append(len(nodes))
        return real(nodes)

    monkeypatch.setattr(archiver_module, "serialize_tree", counting)

    root, stats = _archive(engine, parent.root_tree or "", None)
    assert root == parent.root_tree and stats.files_read == 0  # type: ignore[attr-defined]
    assert len(serialized) == 1  # the root node's own tree; every directory's tree was reused

    (deep / "f3").write_text("changed\n")
    serialized.clear()
    root, stats = _archive(engine, parent.root_tree or "", None)
    assert root != parent.root_tree and stats.files_read == 1  # type: ignore[attr-defined]
    assert len(serialized) == 5  # a/b/c, a/b, a, the top directory, the root node

    monkeypatch.setattr(Archiver, "_same_tree_as_before", lambda _self, _frame: False)
    serialized.clear()
    every_tree_root, _ = _archive(engine, parent.root_tree or "", None)
    assert every_tree_root == root and len(serialized) > 10


def test_clean_entries_of_a_changed_directory_are_taken_without_a_look(xfs_dir: Path, tmp_path: Path) -> None:
    """Scattered churn: in a wide directory with a few changed files, the clean entries are the parent's
    nodes taken at once (not stat'ed, not read), except a clean name that is now another object."""
    wide = xfs_dir / "wide"
    wide.mkdir()
    for i in range(500):
        (wide / f"f{i:03d}").write_bytes(random.Random(i).randbytes(100 + i))
    (wide / "sub").mkdir()
    (wide / "sub" / "inner").write_text("inner\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))

    (wide / "f007").write_text("changed\n")
    (wide / "f300").unlink()
    (wide / "f301").unlink()
    (wide / "f301").write_text("same name, another object\n")  # not in the list: its inode tells
    (wide / "added").write_text("new\n")
    touched = [b"wide/f007", b"wide/f300", b"wide/added"]

    full_root, full_stats = _archive(engine, parent.root_tree or "", None)
    hinted_root, hinted_stats = _archive(engine, parent.root_tree or "", ChangeSet.from_paths(touched))

    assert hinted_root == full_root
    assert (hinted_stats.files, hinted_stats.bytes_total) == (full_stats.files, full_stats.bytes_total)  # type: ignore[attr-defined]
    assert hinted_stats.files_read == full_stats.files_read == 3  # type: ignore[attr-defined]  # f007, f301, added
    # 497 clean files and the clean "sub" of "wide"; nothing else in the root but "wide" itself (dirty)
    assert hinted_stats.entries_not_examined == 498  # type: ignore[attr-defined]
    assert hinted_stats.files_unchanged == full_stats.files_unchanged == 498  # type: ignore[attr-defined]


@pytest.mark.parametrize("read_ahead_entries", [20_000, 1], ids=["read-ahead", "bound-of-one-entry"])
def test_the_trees_a_change_list_names_are_read_ahead_of_the_walk(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_ahead_entries: int
) -> None:
    """With a change list known before the walk, the parent backup's trees of the directories it names are
    read on the read-ahead's threads, in the walk's order, and the walk takes them there: only the tree of
    the root node is read on the walk's thread; the trees of clean directories are not read at all. Even
    with room for one entry (each tree is still read ahead, one at a time), every tree is the full walk's."""
    for top in ("a", "m", "z"):
        for sub in ("x", "y"):
            (xfs_dir / top / sub).mkdir(parents=True)
            for i in range(5):
                (xfs_dir / top / sub / f"f{i}").write_text(f"{top}/{sub}/{i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    (xfs_dir / "a" / "y" / "f1").write_text("changed\n")
    (xfs_dir / "z" / "x" / "f4").write_text("changed too\n")
    full_root, _ = _archive(engine, parent.root_tree or "", None)
    store = engine.store()
    reads: list[tuple[str, str]] = []
    real_read_tree = type(store).read_tree

    def recording_read_tree(self: object, tree_id: bytes, *, what: str) -> bytes:
        reads.append((tree_id.hex(), threading.current_thread().name))
        return real_read_tree(self, tree_id, what=what)  # type: ignore[arg-type]

    monkeypatch.setattr(type(store), "read_tree", recording_read_tree)
    fs = engine.config.file_system("fs-src")
    snapshot = take_snapshot(fs, "backup-00000000000000001", choose_provider(fs))
    try:
        with PackWriter(store) as writer:
            archiver = Archiver(
                store,
                writer,
                snapshot,
                parent.root_tree,
                changes=ChangeSet.from_paths([b"a/y/f1", b"z/x/f4"]),
                read_ahead_entries=read_ahead_entries,
            )
            hinted_root, stats = archiver.run()
            writer.flush()
    finally:
        snapshot.release()

    assert hinted_root == full_root and stats.files_read == 2
    on_walk = [tree for tree, thread in reads if not thread.startswith("zfsbackd-tree")]
    ahead = [tree for tree, thread in reads if thread.startswith("zfsbackd-tree")]
    assert on_walk == [parent.root_tree]
    # the top directory, then a, a/y, z, z/x in the walk's order (the threads may finish them in another)
    assert len(ahead) == len(set(ahead)) == 5


def test_files_whose_content_changed_are_read_without_a_stat_first(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send stream's ``ChangeSet.files`` (regular files with data records, by inode, with their sizes): such
    an entry goes to the read pool without the walk's ``lstat``, in a directory not listed (its inode is the
    parent tree's) and in one whose listing came with the change list (the listing's); the read stats it
    through its descriptor, and every tree is the full walk's."""
    d, e = xfs_dir / "d", xfs_dir / "e"
    d.mkdir()
    e.mkdir()
    for i in range(40):
        (d / f"f{i:02d}").write_text(f"file {i}\n")
        (e / f"g{i:02d}").write_bytes(random.Random(i).randbytes(3000))
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    (d / "f03").write_text("changed in place, larger\n")
    (e / "g07").write_bytes(random.Random(99).randbytes(70_000))  # larger than a small file: read alone
    (e / "new").write_text("a new object\n")
    changed = [d / "f03", e / "g07", e / "new"]
    files = {path.stat().st_ino: path.stat().st_size for path in changed}
    objects = {*files, e.stat().st_ino}
    paths = [b"d/f03", b"e", b"e/g07"]  # (the map has no name for the new object yet)
    full_root, full_stats = _archive(engine, parent.root_tree or "", None)
    stat_paths = _record_lstats(monkeypatch)
    archiver, listed = _archive_recording_listings(
        engine, parent.root_tree, ChangeSet.from_paths(paths, objects, _Listings(e), files=files), monkeypatch
    )
    hinted_root, hinted_stats = archiver.result

    assert hinted_root == full_root
    assert hinted_stats.files_read == full_stats.files_read == 3  # type: ignore[attr-defined]
    assert listed == [b"."]  # d's names are as they were; e's listing came with the change list
    assert not [path for path in stat_paths if path.endswith((b"/f03", b"/g07", b"/new"))]


@pytest.mark.parametrize("attributes_known", [False, True], ids=["stat", "attributes-from-the-stream"])
def test_directories_dirty_only_below_are_entered_without_a_stat(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attributes_known: bool
) -> None:
    """With a send stream's objects, a subdirectory that is not among them but has changes below is entered
    with its parent backup's node (its ctime would have changed with anything of its own): not stat'ed. One
    whose mode changed is among the objects, and is stat'ed, unless its attributes came with the change list
    (``ChangeSet.directories``: its OBJECT record's); every tree is the full walk's."""
    for chain in ("a/b/c", "x/y/z"):
        (xfs_dir / chain).mkdir(parents=True)
        (xfs_dir / chain / "f").write_text("before\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    (xfs_dir / "a/b/c/f").write_text("after\n")  # in place: no directory's names change
    (xfs_dir / "x/y/z/f").write_text("after\n")
    os.chmod(xfs_dir / "x/y", 0o700)
    objects = {(xfs_dir / p).stat().st_ino for p in ("a/b/c/f", "x/y/z/f", "x/y")}
    full_root, _ = _archive(engine, parent.root_tree or "", None)
    stat_paths = _record_lstats(monkeypatch)
    st = (xfs_dir / "x/y").stat()
    known = ZplAttributes(0, st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
    directories = {st.st_ino: known} if attributes_known else None
    changes = ChangeSet.from_paths([b"a/b/c/f", b"x/y/z/f", b"x/y"], objects, directories=directories)
    archiver, listed = _archive_recording_listings(engine, parent.root_tree, changes, monkeypatch)

    assert archiver.result[0] == full_root and archiver.result[1].files_read == 2  # type: ignore[attr-defined]
    assert listed == [b".", b"x/y"]  # the root, and the one directory the change list names itself
    root = stat_paths[0]  # the snapshot's root, stat'ed first
    stat_dirs = sorted(os.path.relpath(path, root) for path in stat_paths[1:])
    expected = [b"a/b/c/f", b"x/y/z/f"] if attributes_known else [b"a/b/c/f", b"x/y", b"x/y/z/f"]
    assert stat_dirs == expected, stat_dirs  # (the files: no ChangeSet.files here)


def test_attributes_from_a_stream_make_the_stat_the_snapshot_would_give(tmp_path: Path) -> None:
    """``ZplAttributes.as_stat``: what ``lstat`` says of the object, to the nanosecond, with its inode and device."""
    st = os.lstat(tmp_path)
    known = ZplAttributes(2, st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
    made = known.as_stat(st.st_ino, st.st_dev)
    assert known.matches(made)
    assert (made.st_ino, made.st_dev, made.st_mtime, made.st_ctime) == (st.st_ino, st.st_dev, st.st_mtime, st.st_ctime)
    assert made.st_mtime_ns == st.st_mtime_ns and made[stat.ST_MTIME] == int(st.st_mtime)


def test_a_directory_node_without_usable_totals_is_counted_entry_by_entry() -> None:
    """The totals of the clean entries come from the parent's directory node only when it has them, as
    whole non-negative numbers (an older or damaged node makes the archiver count the entries instead)."""
    totals = archiver_module._Totals
    assert totals.of_directory({"tree_files": 3, "tree_bytes": 10, "tree_dirs": 1}) == totals(3, 10, 1)
    assert totals.of_directory(None) is None
    assert totals.of_directory({"tree_files": 3, "tree_bytes": 10}) is None  # no tree_dirs
    assert totals.of_directory({"tree_files": -1, "tree_bytes": 10, "tree_dirs": 1}) is None
    assert totals.of_directory({"tree_files": 3, "tree_bytes": "10", "tree_dirs": 1}) is None
    assert totals.of_directory({"tree_files": True, "tree_bytes": 10, "tree_dirs": 1}) is None
    counted = totals(5, 100, 2)
    counted.add_node({"type": "file", "size": 40}, -1)
    counted.add_node({"type": "dir", "tree_files": 2, "tree_bytes": 30, "tree_dirs": 0}, -1)
    assert counted == totals(2, 30, 1)


def test_a_directory_only_dirty_below_is_not_listed(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory the change list names only as the ancestor of changes holds the parent backup's names for
    the same objects (a name added, removed or renamed would have touched the directory itself): it is not
    listed, only its changed entries are stat'ed. Directories it touches, and the root, are listed; the
    tree is the full walk's."""
    for top in ("a", "x"):
        for i in range(20):
            (xfs_dir / top).mkdir(exist_ok=True)
            (xfs_dir / top / f"f{i:02d}").write_text(f"{top} {i}\n")
    (xfs_dir / "a" / "b" / "c").mkdir(parents=True)
    for i in range(20):
        (xfs_dir / "a" / "b" / "c" / f"g{i:02d}").write_text(f"c {i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))

    (xfs_dir / "a" / "b" / "c" / "g03").write_text("content changed, same object\n")
    os.chmod(xfs_dir / "x" / "f05", 0o600)  # metadata only
    (xfs_dir / "a" / "b" / "new").write_text("a new name: a/b itself changed\n")
    (xfs_dir / "top-level-new").write_text("a new name in the root (never in a change list)\n")
    touched = [b"a/b/c/g03", b"x/f05", b"a/b/new", b"a/b", b"top-level-new"]

    full_root, full_stats = _archive(engine, parent.root_tree or "", None)
    parsed = _record_parses(monkeypatch)
    archiver, listed = _archive_recording_listings(engine, parent.root_tree, ChangeSet.from_paths(touched), monkeypatch)
    hinted_root, hinted_stats = archiver.result

    assert hinted_root == full_root
    assert (hinted_stats.files, hinted_stats.bytes_total) == (full_stats.files, full_stats.bytes_total)
    assert hinted_stats.files_read == 4  # g03, f05 (its ctime changed), a/b/new, top-level-new
    assert listed == [b".", b"a/b"]
    assert archiver.directories_not_listed == 3  # a, a/b/c, x
    # Their parent trees are not parsed (their new trees are spliced from the bytes): only the tree of the
    # root's node, the root's and a/b's are.
    assert len(parsed) == 3, parsed
    assert hinted_stats.entries_not_examined == 20 + 19 + 19  # type: ignore[attr-defined]  # in a, a/b/c, x


def test_a_directory_not_listed_whose_tree_cannot_be_spliced_is_serialized_whole(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the parent tree's bytes cannot take the edit after all, the new tree is made from the parsed nodes:
    the same tree, only slower (and logged)."""
    for i in range(30):
        (xfs_dir / "d").mkdir(exist_ok=True)
        (xfs_dir / "d" / f"f{i:02d}").write_text(f"{i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    (xfs_dir / "d" / "f07").write_text("changed\n")
    full_root, _ = _archive(engine, parent.root_tree or "", None)
    monkeypatch.setattr(archiver_module.TreeBytes, "splice", lambda *_args: None)
    hinted_root, hinted_stats = _archive(engine, parent.root_tree or "", ChangeSet.from_paths([b"d/f07"]))
    assert hinted_root == full_root
    assert hinted_stats.files_read == 1  # type: ignore[attr-defined]


class _Listings:
    """Directory listings as a change list carries them (``ChangeSet.listings``): taken from the live tree."""

    def __init__(self, *directories: Path) -> None:
        self.by_inode = {
            d.stat().st_ino: [(entry.name, entry.inode()) for entry in os.scandir(os.fsencode(d))] for d in directories
        }

    def entries(self, inode: int) -> list[tuple[bytes, int]] | None:
        return self.by_inode.get(inode)


@pytest.mark.parametrize("with_listings", [False, True], ids=["listed", "listings-in-the-change-list"])
def test_a_listed_directory_with_the_changed_objects_is_spliced_unparsed(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_listings: bool
) -> None:
    """With the objects that changed (a send stream's ``ChangeSet.objects``), a listed directory's entries whose
    inode is not among them are its parent tree's nodes, taken unparsed; a new object, which a send stream's
    map cannot name, is found by its inode, and a deleted one by its name's absence. A directory whose listing
    the tree does not match (a FIFO: never in a tree) is parsed as before. Every tree is the full walk's.

    When the change list carries the directories' listings (a send stream's microzap blocks), they are taken
    instead of listing the directories: the same trees, only the root listed."""
    d, pipes = xfs_dir / "d", xfs_dir / "pipes"
    d.mkdir()
    pipes.mkdir()
    for i in range(40):
        (d / f"f{i:02d}").write_text(f"file {i}\n")
    (pipes / "p0").write_text("p0\n")
    (pipes / "p1").write_text("p1\n")
    os.mkfifo(pipes / "fifo")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    inode = {name: (d / name).stat().st_ino for name in ("f03", "f07", "f09")}

    (d / "f03").unlink()
    (d / "f03").write_text("the same name, a new object\n")
    (d / "f05").unlink()
    (d / "new").write_text("a new object: the map has no name for it\n")
    os.rename(d / "f07", d / "g07")
    (d / "f09").write_text("changed in place\n")
    (pipes / "p2").write_text("new\n")
    (pipes / "p0").unlink()  # with the FIFO, the counts of entries would still agree: the names must be compared
    # What a send stream gives: the names the map has for changed objects, and the objects themselves (a
    # deleted object, f05's, is in neither: its name is found missing from the listing).
    paths = [b"d", b"d/f03", b"d/f07", b"d/f09", b"pipes"]
    objects = {*inode.values(), *(p.stat().st_ino for p in (d, pipes, d / "f03", d / "new", pipes / "p2"))}

    listings = _Listings(d, pipes) if with_listings else None

    full_root, full_stats = _archive(engine, parent.root_tree or "", None)
    parsed = _record_parses(monkeypatch)
    archiver, listed = _archive_recording_listings(
        engine, parent.root_tree, ChangeSet.from_paths(paths, objects, listings), monkeypatch
    )
    hinted_root, hinted_stats = archiver.result

    assert hinted_root == full_root
    assert hinted_stats.files_read == full_stats.files_read == 5  # type: ignore[attr-defined]
    assert listed == ([b"."] if with_listings else [b".", b"d", b"pipes"])
    assert archiver.directories_listed_by_changes == (2 if with_listings else 0)
    assert len(parsed) == 2, parsed  # the tree of the root's node, and pipes' (its FIFO is in no tree)
    assert hinted_stats.entries_not_examined == 36 + 1  # type: ignore[attr-defined]  # d's 36 clean files, pipes/p1


@pytest.mark.parametrize("with_change_list", [False, True], ids=["full-walk", "send-stream-change-list"])
def test_a_renamed_directory_is_compared_with_its_old_tree_not_read_again(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_change_list: bool
) -> None:
    """A directory renamed in its parent (``mv old new``; a swap of two names; a name given to a new directory
    while the old one moved on) is found by its inode among the parent backup's nodes of that directory, and
    walked against its old tree: only what changed inside is read. A send stream's change list names what
    changed below it by the old paths (the object map's): the walk asks it by those, and what it names
    nowhere below is taken without a look. Every tree is the one a backup with no parent makes."""
    moved = xfs_dir / "p" / "old"
    (moved / "sub" / "deep").mkdir(parents=True)
    for i in range(30):
        (moved / f"f{i:02d}").write_bytes(random.Random(i).randbytes(200 + i))
    for i in range(10):
        (moved / "sub" / f"g{i}").write_text(f"g {i}\n")
    for i in range(5):
        (moved / "sub" / "deep" / f"h{i}").write_text(f"h {i}\n")
    for name in ("swap1", "swap2", "q/gone"):
        (xfs_dir / name).mkdir(parents=True)
        for i in range(8):
            (xfs_dir / name / f"s{i}").write_text(f"{name} {i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    map_of_parent = {p.stat().st_ino: os.fsencode(p.relative_to(xfs_dir)) for p in xfs_dir.rglob("*")}

    new = xfs_dir / "p" / "new"
    os.rename(moved, new)
    (new / "f05").write_text("changed in place\n")
    (new / "added").write_text("a new object\n")
    (new / "f10").unlink()
    (new / "sub" / "deep" / "h2").write_text("changed two levels below the renamed directory\n")
    os.rename(xfs_dir / "swap1", xfs_dir / "tmp")
    os.rename(xfs_dir / "swap2", xfs_dir / "swap1")
    os.rename(xfs_dir / "tmp", xfs_dir / "swap2")
    os.rename(xfs_dir / "q" / "gone", xfs_dir / "q" / "gone2")
    (xfs_dir / "q" / "gone").mkdir()
    (xfs_dir / "q" / "gone" / "fresh").write_text("in a new directory under an old name\n")
    # What a send stream gives: the objects that changed, and the names the parent backup's map has for them.
    changed = [
        xfs_dir,
        xfs_dir / "p",
        new,
        new / "f05",
        new / "added",
        new / "sub" / "deep" / "h2",
        xfs_dir / "swap1",
        xfs_dir / "swap2",
        xfs_dir / "q",
        xfs_dir / "q" / "gone2",
        xfs_dir / "q" / "gone",
        xfs_dir / "q" / "gone" / "fresh",
    ]
    objects = {p.stat().st_ino for p in changed}
    paths = [map_of_parent[inode] for inode in objects if inode in map_of_parent]
    changes = ChangeSet.from_paths(paths, objects) if with_change_list else None

    from_nothing_root, _ = _archive(engine, "", None)
    archiver, listed = _archive_recording_listings(engine, parent.root_tree, changes, monkeypatch)  # type: ignore[arg-type]
    root, stats = archiver.result

    assert root == from_nothing_root
    assert stats.files_read == 4  # type: ignore[attr-defined]  # f05, added, h2, q/gone/fresh
    if with_change_list:
        assert b"p/old/sub/deep/h2" in changes.touched  # type: ignore[union-attr]  # (by the old path)
        assert b"p/new/sub" not in listed and b"p/new/sub/deep" not in listed
        assert archiver.directories_not_listed == 2  # p/new/sub and p/new/sub/deep: only their changed names
        # p/new's files but f05 (and f10, gone); its sub's 10 g's, deep's h's but h2; the 8 files of each
        # swapped directory and of q/gone2
        assert stats.entries_not_examined == 28 + 10 + 4 + 3 * 8  # type: ignore[attr-defined]


def test_a_name_now_of_another_directory_is_compared_entry_by_entry(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rm -r d2/sub; mv d1/sub d2/sub``: a send stream names no deleted object, so the change list names
    neither d2/sub (the old one is gone) nor anything in it; d2/sub is another directory with the same
    names, not the one its parent tree has. Its entries are compared with that tree's one by one (inode
    included), never taken as the old directory's."""
    for top in ("d1", "d2"):
        (xfs_dir / top / "sub").mkdir(parents=True)
        for i in range(8):
            (xfs_dir / top / "sub" / f"s{i}").write_text(f"{top} {i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    map_of_parent = {p.stat().st_ino: os.fsencode(p.relative_to(xfs_dir)) for p in xfs_dir.rglob("*")}

    shutil.rmtree(xfs_dir / "d2" / "sub")
    os.rename(xfs_dir / "d1" / "sub", xfs_dir / "d2" / "sub")
    objects = {p.stat().st_ino for p in (xfs_dir, xfs_dir / "d1", xfs_dir / "d2", xfs_dir / "d2" / "sub")}
    changes = ChangeSet.from_paths([map_of_parent[i] for i in objects if i in map_of_parent], objects)
    assert b"d2/sub" not in changes.touched

    from_nothing_root, _ = _archive(engine, "", None)
    archiver, _listed = _archive_recording_listings(engine, parent.root_tree, changes, monkeypatch)
    root, stats = archiver.result

    assert root == from_nothing_root
    assert stats.files_read == 8  # type: ignore[attr-defined]  # (their inodes are not the old d2/sub's files')


@pytest.mark.parametrize("with_change_list", [False, True], ids=["full-walk", "send-stream-change-list"])
def test_a_directory_moved_to_another_parent_is_found_by_its_old_path(
    xfs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_change_list: bool
) -> None:
    """``mv a/far b/far-moved``: a send stream's object map gives the moved directory's old path
    (``ChangeSet.directory_paths``), where the parent backup's trees have its node; it is walked against
    that tree, asking the change list by the old paths, and only the file changed inside is read. A full
    walk has no such map: the directory is new there, read whole. Both make the tree of a backup with
    no parent."""
    far = xfs_dir / "a" / "far"
    (far / "deep").mkdir(parents=True)
    (xfs_dir / "b").mkdir()
    for i in range(12):
        (far / f"f{i}").write_text(f"far {i}\n")
        (far / "deep" / f"h{i}").write_text(f"deep {i}\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    parent = engine.create_backup(BackupRequest("fs-src"))
    map_of_parent = {p.stat().st_ino: os.fsencode(p.relative_to(xfs_dir)) for p in xfs_dir.rglob("*")}

    moved = xfs_dir / "b" / "far-moved"
    os.rename(far, moved)
    (moved / "deep" / "h1").write_text("changed below the moved directory\n")
    changed = [xfs_dir, xfs_dir / "a", xfs_dir / "b", moved, moved / "deep" / "h1"]
    objects = {p.stat().st_ino for p in changed}
    changes = ChangeSet.from_paths(
        [map_of_parent[i] for i in objects if i in map_of_parent], objects, None, {moved.stat().st_ino: b"a/far"}
    )

    from_nothing_root, _ = _archive(engine, "", None)
    archiver, listed = _archive_recording_listings(
        engine, parent.root_tree, changes if with_change_list else None, monkeypatch  # type: ignore[arg-type]
    )
    root, stats = archiver.result

    assert root == from_nothing_root
    if with_change_list:
        assert stats.files_read == 1  # type: ignore[attr-defined]  # h1
        assert b"b/far-moved/deep" not in listed  # (nothing was added to or removed from it)
    else:
        assert stats.files_read == 24  # type: ignore[attr-defined]
