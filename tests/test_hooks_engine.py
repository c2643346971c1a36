"""pre_snapshot / post_snapshot hooks through the Engine, for every provider a host can run.

The hooks used to run only when a provider's ``find`` returned nothing, which the
reflink and copy providers never did: their hooks silently never ran. These tests go
through ``Engine.create_backup`` (not ``take_snapshot``) so that how the engine obtains
its snapshot is what is tested.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import make_config
from fsfixtures import LoopFs, remove_tree

from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import SnapshotError
from zfsbackd.store.records import BackupRecord, Lifecycle
from zfsbackd.store.tree import node_name, parse_tree

MARKER = "paused-by-pre-hook"

# (fixture giving the source directory, provider zfsbackd must pick for it)
SOURCES = {
    "xfs-dir": ("xfs_dir", "reflink"),
    "btrfs-dir": ("btrfs_plain_dir", "reflink"),
    "btrfs-subvolume": ("btrfs_subvol", "btrfs"),
    "ext4-copy": ("ext4_dir", "copy"),
}


@pytest.fixture
def btrfs_plain_dir(btrfs_subvol: Path) -> Path:
    """A directory on btrfs that is not a subvolume: reflink clones, not btrfs snapshots."""
    path = btrfs_subvol / "plain"
    path.mkdir()
    return path


@pytest.fixture
def ext4_dir(ext4_fs: LoopFs, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory on ext4: no snapshots nor reflinks, so only the copy provider (when allowed)."""
    path = ext4_fs.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    yield path
    remove_tree(path)


def _engine(tmp_path: Path, source: Path, log: Path, *, pre_exit: int = 0) -> Engine:
    """An engine whose file system fs-src logs each hook run to *log*; the pre hook also leaves a
    marker in the source (so the backup shows that it ran before the snapshot) and exits *pre_exit*."""
    pre = f'echo "pre $ZFSBACKD_BACKUP_ID" >> "{log}"; echo x > "{source}/{MARKER}"; exit {pre_exit}'
    post = f'echo "post $ZFSBACKD_BACKUP_ID" >> "{log}"'
    extra = {"pre_snapshot": pre, "post_snapshot": post, "allow_copy_snapshots": True, "hook_timeout_seconds": 30}
    return Engine(make_config(tmp_path, {"src": source}, extra_fs=extra))


def _hook_runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _top_level_names(engine: Engine, record: BackupRecord) -> set[bytes]:
    store = engine.store()
    assert record.root_tree
    (root,) = parse_tree(store.read_blob(bytes.fromhex(record.root_tree), what="root"), what="root")
    top = parse_tree(store.read_blob(bytes.fromhex(root["subtree"]), what="top"), what="top")
    return {node_name(n) for n in top}


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> tuple[Path, str]:
    fixture, provider = SOURCES[request.param]
    return request.getfixturevalue(fixture), provider


def test_hooks_run_once_around_each_backup_for_every_provider(source: tuple[Path, str], tmp_path: Path) -> None:
    src, provider = source
    (src / "data.txt").write_text("payload")
    log = tmp_path / "hooks.log"
    engine = _engine(tmp_path, src, log)

    first = engine.create_backup(BackupRequest("fs-src"))
    second = engine.create_backup(BackupRequest("fs-src"))

    assert first.lifecycle == second.lifecycle == Lifecycle.AVAILABLE
    assert first.snapshot["Provider"] == provider
    assert _hook_runs(log) == [
        f"pre {first.backup_id}",
        f"post {first.backup_id}",
        f"pre {second.backup_id}",
        f"post {second.backup_id}",
    ]
    # The pre hook ran before the snapshot was read: what it wrote is in the backup.
    assert MARKER.encode() in _top_level_names(engine, first)


@pytest.mark.parametrize(("fixture", "hooks_again"), [("btrfs_subvol", False), ("xfs_dir", True)])
def test_resumed_backup_runs_hooks_only_if_it_takes_a_new_snapshot(
    fixture: str, hooks_again: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A btrfs snapshot survives an interruption, and the resumed backup reads the point in time the
    application was paused for: no second pause. A reflink "snapshot" is the live tree, taken anew."""
    src: Path = request.getfixturevalue(fixture)
    (src / "data.txt").write_text("payload")
    log = tmp_path / "hooks.log"
    engine = _engine(tmp_path, src, log)
    stop = threading.Event()
    stop.set()  # the archiver stops at its first directory: after the snapshot, before any data

    with pytest.raises(BackupCancelled):
        engine.create_backup(BackupRequest("fs-src"), cancel=stop)
    (interrupted,) = engine.describe_backups()[0]
    assert interrupted.lifecycle == Lifecycle.CREATING
    assert _hook_runs(log) == [f"pre {interrupted.backup_id}", f"post {interrupted.backup_id}"]

    resumed = engine.create_backup(BackupRequest("fs-src"))

    assert resumed.backup_id == interrupted.backup_id
    assert resumed.lifecycle == Lifecycle.AVAILABLE
    expected = [f"pre {resumed.backup_id}", f"post {resumed.backup_id}"] * (2 if hooks_again else 1)
    assert _hook_runs(log) == expected


@pytest.mark.parametrize("fixture", ["xfs_dir", "btrfs_subvol"])
def test_failing_pre_hook_fails_the_backup_and_post_hook_still_runs(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Documented behaviour (snapshot/hooks.py): once pre_snapshot has started, post_snapshot always
    runs, so an application the pre hook half-paused is resumed; no snapshot is taken."""
    src: Path = request.getfixturevalue(fixture)
    log = tmp_path / "hooks.log"
    engine = _engine(tmp_path, src, log, pre_exit=3)

    with pytest.raises(SnapshotError) as raised:
        engine.create_backup(BackupRequest("fs-src"))

    assert raised.value.code == "SnapshotFailed"
    assert "file_systems[fs-src].pre_snapshot" in raised.value.message
    assert "exit status 3" in raised.value.message
    (record,) = engine.describe_backups(filters={"lifecycle": ["FAILED"]})[0]
    assert record.lifecycle == Lifecycle.FAILED
    assert record.failure_message == raised.value.message
    assert _hook_runs(log) == [f"pre {record.backup_id}", f"post {record.backup_id}"]
    assert not list((src.parent / ".zfsbackd-snapshots").rglob(f"*{record.backup_id}*"))
