"""Grafts: other snapshot roots read into one backup tree (how a recursive ZFS backup covers its children).

On ZFS a child dataset's mount point is an empty directory inside the parent's
snapshot; its files are under the child's own ``.zfs/snapshot/<name>``. These
tests graft directories of other loop-mounted file systems (other devices, like
child datasets) into an XFS tree, back it up with the real archiver, restore it
with the real restorer and compare with what the grafted view holds.
tests/zfsvm/ proves the same with real child datasets.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from enginekit import make_config
from fsfixtures import LoopFs, populate_sample_tree, tree_manifest

from zfsbackd.engine.archiver import Archiver
from zfsbackd.engine.engine import Engine
from zfsbackd.engine.restorer import Restorer
from zfsbackd.errors import RestoreError
from zfsbackd.snapshot.base import ChangeSet, Snapshot
from zfsbackd.snapshot.copy import CopySnapshot
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle
from zfsbackd.store.repository import Store
from zfsbackd.store.writer import PackWriter


def _archive(
    store: Store, view: Snapshot, parent_root: str | None, changes: ChangeSet | None = None
) -> tuple[str, Any]:
    with PackWriter(store) as writer:
        root, stats = Archiver(store, writer, view, parent_root, changes=changes).run()
        writer.flush()
    return root, stats


def _record(store: Store, root_tree: str) -> BackupRecord:
    return BackupRecord(
        backup_id="backup-0000000000000graft",
        file_system_id="fs-src",
        region=store.region,
        backup_type=BackupType.USER_INITIATED,
        lifecycle=Lifecycle.AVAILABLE,
        creation_time=datetime.now(UTC),
        root_tree=root_tree,
    )


def _restore(store: Store, root_tree: str, target: Path) -> Path:
    return Restorer(store, _record(store, root_tree), target).run().path


def _grafted_manifest(root: Path, grafts: dict[bytes, Path]) -> dict[bytes, dict[str, Any]]:
    """What the grafted view holds: the root's entries, each graft's entries under its path."""
    manifest = tree_manifest(root)
    for rel, graft in sorted(grafts.items()):
        for path in [p for p in manifest if p == rel or p.startswith(rel + b"/")]:
            del manifest[path]
        own = tree_manifest(graft.parent)[os.fsencode(graft.name)]  # the graft root's own metadata
        manifest[rel] = own
        manifest.update({rel + b"/" + p: info for p, info in tree_manifest(graft).items()})
    for info in manifest.values():
        info.pop("link_group", None)  # links never span grafts; each side is checked by the restore tests
        info.pop("allocated_blocks_lt_size", None)
    return manifest


def test_grafts_are_backed_up_in_place_and_restore_identical(
    xfs_dir: Path, btrfs_fs: LoopFs, ext4_fs: LoopFs, tmp_path: Path
) -> None:
    populate_sample_tree(xfs_dir)
    (xfs_dir / "mnt" / "child" / "sub" / "nested").mkdir(parents=True)  # empty mount points, as ZFS leaves them
    child = btrfs_fs.mountpoint / f"graft-{os.getpid()}"
    child.mkdir()
    populate_sample_tree(child, seed=7)
    (child / "sub" / "nested").mkdir(parents=True)
    nested = ext4_fs.mountpoint / f"graft-{os.getpid()}"
    nested.mkdir()
    (nested / "deep.txt").write_bytes(b"nested dataset\n" * 1000)
    os.chmod(nested, 0o750)
    grafts = {b"mnt/child": child, b"mnt/child/sub/nested": nested}

    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    store = engine.store()
    view = CopySnapshot("test", xfs_dir, grafts=grafts)
    try:
        root, stats = _archive(store, view, None)
        restored = _restore(store, root, tmp_path)
    finally:
        view.release()
    assert stats.files_read == stats.files >= 40
    got = tree_manifest(restored)
    for info in got.values():
        info.pop("link_group", None)
        info.pop("allocated_blocks_lt_size", None)
    expected = _grafted_manifest(xfs_dir, grafts)
    assert b"mnt/child/sub/nested/deep.txt" in got
    assert got == expected


def test_change_set_inside_a_graft_equals_full_walk(xfs_dir: Path, btrfs_fs: LoopFs, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    (xfs_dir / "child").mkdir()
    child = btrfs_fs.mountpoint / f"graft-changes-{os.getpid()}"
    child.mkdir()
    populate_sample_tree(child, seed=3)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    store = engine.store()

    def archive(changes: ChangeSet | None, parent: str | None) -> tuple[str, Any]:
        view = CopySnapshot("test", xfs_dir, grafts={b"child": child})
        try:
            return _archive(store, view, parent, changes)
        finally:
            view.release()

    parent, _ = archive(None, None)
    changed = sorted(p for p in tree_manifest(child) if tree_manifest(child)[p]["type"] == "file")[0]
    (child / os.fsdecode(changed)).write_bytes(b"changed inside the graft\n")
    full, full_stats = archive(None, parent)
    hinted, hinted_stats = archive(ChangeSet.from_paths([b"child/" + changed]), parent)
    assert hinted == full
    assert hinted_stats.files_read == full_stats.files_read == 1


def test_restore_into_a_target_that_holds_only_the_childrens_mount_points(
    xfs_dir: Path, btrfs_fs: LoopFs, tmp_path: Path
) -> None:
    """What a restore to a new ZFS dataset finds: the recreated children already mounted, empty."""
    (xfs_dir / "top.txt").write_text("top\n")
    (xfs_dir / "x" / "child").mkdir(parents=True)
    child = btrfs_fs.mountpoint / f"graft-target-{os.getpid()}"
    child.mkdir()
    (child / "in-child.txt").write_text("child\n")
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    store = engine.store()
    view = CopySnapshot("test", xfs_dir, grafts={b"x/child": child})
    try:
        root, _ = _archive(store, view, None)
    finally:
        view.release()
    record = _record(store, root)
    target = tmp_path / "new-dataset"
    (target / "x" / "child" / "nested").mkdir(parents=True)  # a child of the child, recreated too
    (target / "x" / "child" / "leftover").write_text("not empty\n")
    mounts = [target / "x" / "child", target / "x" / "child" / "nested"]
    with pytest.raises(RestoreError, match="leftover exists"):
        Restorer(store, record, target).run_into(target, mounts)
    (target / "x" / "child" / "leftover").unlink()
    (target / "stray").mkdir()
    with pytest.raises(RestoreError, match="stray exists"):
        Restorer(store, record, target).run_into(target, mounts)
    (target / "stray").rmdir()
    Restorer(store, record, target).run_into(target, mounts)
    assert (target / "x" / "child" / "in-child.txt").read_text() == "child\n"
    assert (target / "top.txt").read_text() == "top\n"
