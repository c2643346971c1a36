"""A 2,000-level-deep directory tree backs up: the archiver's walk keeps its own stack.

Its recursive walk hit Python's recursion limit at about 490 levels. The archiver
reads the source by path, so what lies beyond Linux's PATH_MAX (4096 bytes with the
NUL) cannot be read: the first entry past it is skipped with ENAMETOOLONG (with its
subtree) and listed, per ``on_entry_error``, and everything above it is backed up.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import make_config

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.store.records import BackupRecord, Lifecycle
from zfsbackd.store.tree import node_name, parse_tree

DEPTH = 2000
NAME = b"dd"
FILE_EVERY = 100  # levels; each such level holds a small file
PATH_MAX = 4096  # Linux, including the terminating NUL


def _make_chain(root: Path, depth: int) -> None:
    """``root/dd/dd/…`` *depth* levels deep, built with openat-style calls (the paths get too long)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(1, depth + 1):
            os.mkdir(NAME, dir_fd=fd)
            below = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
            if level % FILE_EVERY == 0:
                f = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
                os.write(f, b"level %d\n" % level)
                os.close(f)
    finally:
        os.close(fd)


@pytest.fixture
def deep_source(xfs_dir: Path) -> Iterator[Path]:
    source = xfs_dir / "src"
    source.mkdir()
    _make_chain(source, DEPTH)
    yield source
    subprocess.run(["rm", "-rf", "--one-file-system", str(source)], check=True)  # fts: any depth


def _backed_up_chain(engine: Engine, record: BackupRecord) -> tuple[int, list[int]]:
    """(directory levels in the backup, levels whose file ``f`` is in it), read from the store's trees."""
    store = engine.store()
    assert record.root_tree

    def entries(tree_id: str) -> dict[bytes, dict]:  # type: ignore[type-arg]
        nodes = parse_tree(store.read_blob(bytes.fromhex(tree_id), what=tree_id), what=tree_id)
        return {node_name(n): n for n in nodes}

    (root,) = entries(record.root_tree).values()
    level, files, current = 0, [], entries(root["subtree"])
    while NAME in current:
        level += 1
        current = entries(current[NAME]["subtree"])
        if b"f" in current:
            files.append(level)
    return level, files


def test_two_thousand_levels_back_up_up_to_path_max(deep_source: Path, tmp_path: Path) -> None:
    engine = Engine(make_config(tmp_path, {"src": deep_source}))

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert engine.check(read_data=True).errors == []
    # Levels whose path fits in PATH_MAX are all there (far beyond the old ~490), files included.
    fits = (PATH_MAX - 1 - len(os.fsencode(deep_source))) // (len(NAME) + 1)
    assert fits > 1000
    depth, files = _backed_up_chain(engine, record)
    assert depth == fits
    file_fits = [lvl for lvl in range(FILE_EVERY, fits + 1, FILE_EVERY) if
                 len(os.fsencode(deep_source)) + (len(NAME) + 1) * lvl + 2 <= PATH_MAX - 1]
    assert files == file_fits
    assert record.stats.directories == 1 + fits
    # What lies beyond is one skipped entry per too-long path met: the first directory (subtree
    # included) and, if it sits in the deepest directory, a file.
    skipped = record.stats.skipped_entries
    assert record.stats.entries_skipped_with_errors == len(skipped) >= 1
    assert {e["errno"] for e in skipped} == {"ENAMETOOLONG"}
    assert "/".join([NAME.decode()] * (fits + 1)) in {e["path"] for e in skipped}

    # An unchanged deep tree reuses every tree of its parent.
    again = engine.create_backup(BackupRequest("fs-src"))
    assert again.lifecycle == Lifecycle.AVAILABLE
    assert again.root_tree == record.root_tree
    assert again.stats.blobs_new == 0
