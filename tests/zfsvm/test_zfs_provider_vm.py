"""The ZFS snapshot provider on real OpenZFS: zfs-diff incrementals, holds, cleanup, restore to a new dataset."""

from __future__ import annotations

import functools
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from enginekit import write_config
from fsfixtures import tree_manifest
from zfsvm_util import sh

from zfsbackd import pools
from zfsbackd.config import load_config
from zfsbackd.engine import restorer
from zfsbackd.engine.archiver import Archiver
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import SnapshotError
from zfsbackd.snapshot import zfs as zfs_provider
from zfsbackd.snapshot.zfs import ZfsProvider
from zfsbackd.store.writer import PackWriter
from zfsbackd.zfs import command
from zfsbackd.zfs.libzfs_core import lzc_exists as _lzc_exists


def _config(tmp_path: Path, dataset: str, *, recursive: bool = False) -> Path:
    """A configuration file backing up ``dataset`` as file system ``fs-zfs``."""
    config = write_config(tmp_path, {})
    data = yaml.safe_load(config.read_text())
    source: dict[str, object] = {"zfs": dataset}
    if recursive:
        source["recursive"] = True
    data["file_systems"] = [{"id": "fs-zfs", "source": source}]
    config.write_text(yaml.safe_dump(data))
    return config


def _engine(tmp_path: Path, dataset: str, *, recursive: bool = False) -> Engine:
    return Engine(load_config(_config(tmp_path, dataset, recursive=recursive)))


def _mnt(dataset: str) -> Path:
    mnt = command.mountpoint(dataset)
    assert mnt is not None
    return mnt


def _full_walk_root(engine: Engine, backup_id: str, parent_root: str | None) -> str:
    """Archive the backup's own ZFS snapshot again, without a change list."""
    fs = engine.config.file_system("fs-zfs")
    snapshot = ZfsProvider().find(fs, backup_id)
    assert snapshot is not None, "the newest backup's snapshot is kept as the next base"
    store = engine.store()
    with PackWriter(store) as writer:
        root, _ = Archiver(store, writer, snapshot, parent_root).run()
        writer.flush()
    snapshot.close()
    return root


def _manifest(root: Path) -> dict[bytes, dict]:
    """tree_manifest without sparseness: ZFS updates st_blocks only when the transaction group syncs."""
    manifest = tree_manifest(root, ignore={b".zfs"})
    for info in manifest.values():
        info.pop("allocated_blocks_lt_size", None)
    return manifest


def _ours(dataset: str) -> list[str]:
    return [s.snapname for s in command.list_snapshots(dataset) if s.backup_id]


def test_zfs_diff_incremental_reads_only_changed_files(dataset: str, tmp_path: Path) -> None:
    root = _mnt(dataset)
    rng = random.Random(5)
    for d in range(100):
        sub = root / f"d{d:03d}"
        sub.mkdir()
        for f in range(500):
            (sub / f"f{f:03d}").write_bytes(rng.randbytes(rng.randint(0, 64)))
    engine = _engine(tmp_path, dataset)
    first = engine.create_backup(BackupRequest("fs-zfs"))
    assert first.snapshot["Provider"] == "zfs" and first.stats.files == 50_000
    assert _ours(dataset) == [f"zfsbackd-{first.backup_id}"]

    changed = [root / f"d{rng.randrange(100):03d}" / f"f{i:03d}" for i in range(20)]
    for path in changed:
        path.write_bytes(b"changed " + os.urandom(16))
    second = engine.create_backup(BackupRequest("fs-zfs"))

    assert second.stats.files == 50_000
    assert second.stats.files_read == 20
    assert second.stats.entries_not_examined > 0, "the zfs diff change list was used"
    assert second.stats.bytes_read == 24 * 20
    assert _ours(dataset) == [f"zfsbackd-{second.backup_id}"], "older snapshots of ours are pruned"
    bookmarks = sh("zfs", "list", "-H", "-t", "bookmark", "-o", "name", "-r", dataset).split()
    assert bookmarks == [f"{dataset}#zfsbackd-{second.backup_id}"]
    assert _full_walk_root(engine, second.backup_id, first.root_tree) == second.root_tree


@pytest.fixture(params=["send-stream", "zfs-diff"])
def change_list(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where incremental change lists come from: the send stream (with the object map), or zfs diff (without)."""
    if request.param == "zfs-diff":
        monkeypatch.setattr(ZfsProvider, "_objmap", lambda self, fs: None)
    return str(request.param)


def test_change_list_equals_full_walk_with_renames_links_xattrs_and_type_changes(
    dataset: str, tmp_path: Path, change_list: str
) -> None:
    root = _mnt(dataset)
    (root / "keep").mkdir()
    (root / "keep" / "a").write_text("a\n")
    (root / "mv-src" / "deeper").mkdir(parents=True)
    (root / "mv-src" / "inner").write_text("inner\n")
    (root / "mv-src" / "deeper" / "changed").write_text("before\n")
    for top in ("d1", "d2", "swap1", "swap2"):  # directories with the same names in them
        (root / top / "sub").mkdir(parents=True)
        for i in range(3):
            (root / top / "sub" / f"s{i}").write_text(f"{top} {i}\n")
    (root / "gone").write_text("bye\n")
    (root / "becomes-dir").write_text("file now\n")
    (root / "linked").write_text("hard\n")
    os.link(root / "linked", root / "keep" / "second-name")
    (root / "tagged").write_text("x\n")
    for top in ("xattr-dir", "chmod-dir"):  # directories whose own attributes change, and a file below
        (root / top / "below").mkdir(parents=True)
        (root / top / "below" / "f").write_text("f\n")
    engine = _engine(tmp_path, dataset)
    first = engine.create_backup(BackupRequest("fs-zfs"))

    os.rename(root / "mv-src", root / "mv-dst")  # renamed directory
    (root / "mv-dst" / "deeper" / "changed").write_text("after: the stream's map names it by its old path\n")
    shutil.rmtree(root / "d2" / "sub")  # a name now of another directory, the old one gone (in no stream)
    os.rename(root / "d1" / "sub", root / "d2" / "sub")
    os.rename(root / "swap1", root / "swap-tmp")  # two directories swap names
    os.rename(root / "swap2", root / "swap1")
    os.rename(root / "swap-tmp", root / "swap2")
    (root / "gone").unlink()  # deleted
    (root / "becomes-dir").unlink()  # type change
    (root / "becomes-dir").mkdir()
    (root / "becomes-dir" / "child").write_text("child\n")
    os.setxattr(root / "tagged", "user.color", b"blue")  # xattr only
    os.chmod(root / "keep", 0o750)  # metadata only
    # A directory changed only below is entered with its old node (send stream: its object is not among the
    # changed ones); one whose own xattr or mode changed too must not be (its ctime changed: it is).
    os.setxattr(root / "xattr-dir", "user.dir", b"tag")
    os.chmod(root / "chmod-dir" / "below", 0o700)
    for top in ("xattr-dir", "chmod-dir"):
        (root / top / "below" / "f").write_text("changed in place\n")
    (root / "new dir with space").mkdir()
    (root / "new dir with space" / b"\xffnot-utf8".decode("utf-8", "surrogateescape")).write_text("odd\n")
    second = engine.create_backup(BackupRequest("fs-zfs"))
    assert _full_walk_root(engine, second.backup_id, first.root_tree) == second.root_tree
    assert _full_walk_root(engine, second.backup_id, None) == second.root_tree  # (nothing reused at all)
    if change_list == "send-stream":  # moved directories are walked against their old trees, by their old paths
        # deeper/changed, becomes-dir/child, tagged (its ctime), the odd name, the two below/f
        assert second.stats.files_read == 6

    (root / "linked").write_text("hard, changed\n")  # a changed file with another name elsewhere
    third = engine.create_backup(BackupRequest("fs-zfs"))
    assert _full_walk_root(engine, third.backup_id, second.root_tree) == third.root_tree
    target_fs = f"{dataset}-target"  # on ZFS: the guest's /tmp (tmpfs, kernel 6.1) has no user xattrs
    sh("zfs", "create", target_fs)
    restored = engine.restore_backup(third.backup_id, _mnt(target_fs)).path
    assert _manifest(restored) == _manifest(root)


def test_restore_to_new_dataset_has_recorded_properties(dataset: str, tmp_path: Path) -> None:
    sh("zfs", "set", "recordsize=16K", "compression=zle", "atime=off", "org.example:owner=storage-team", dataset)
    root = _mnt(dataset)
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(os.urandom(100_000))
    os.symlink("dir/file", root / "link")
    os.chown(root / "dir" / "file", 1234, 5678)
    engine = _engine(tmp_path, dataset)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    assert record.properties["zfs:recordsize"] == "16384"
    assert record.properties["zfs:org.example:owner"] == "storage-team"

    new = f"{dataset}-restored"
    result = engine.restore_backup(record.backup_id, None, target_dataset=new)
    assert result.path == _mnt(new)
    assert _manifest(_mnt(new)) == _manifest(root)
    props = command.get_properties(new, ["recordsize", "compression", "atime", "org.example:owner"])
    assert props == {"recordsize": "16384", "compression": "zle", "atime": "off", "org.example:owner": "storage-team"}
    with pytest.raises(Exception, match="exists"):
        engine.restore_backup(record.backup_id, None, target_dataset=new)


def test_a_restore_worker_writes_into_a_new_dataset(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore of several batches (BATCH_DIRS directories each) into a new dataset starts a worker process,
    which writes through the directory descriptors it is given: on ZFS as on XFS."""
    root = _mnt(dataset)
    for d in range(restorer.BATCH_DIRS + 20):
        sub = root / f"d{d:03d}"
        sub.mkdir()
        for f in range(2):
            (sub / f"f{f}").write_bytes(os.urandom(10 + d + f))
    engine = _engine(tmp_path, dataset)
    record = engine.create_backup(BackupRequest("fs-zfs"))
    monkeypatch.setattr(pools, "RESTORE_PROCESSES", 2)
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)

    new = f"{dataset}-restored"
    with structlog.testing.capture_logs() as logs:
        result = engine.restore_backup(record.backup_id, None, target_dataset=new)

    assert [e for e in logs if e["event"] == "restore_workers_started"], logs
    assert result.files == record.stats.files == 2 * (restorer.BATCH_DIRS + 20)
    assert _manifest(_mnt(new)) == _manifest(root)


def test_held_snapshot_survives_cleanup_and_missing_base_falls_back(dataset: str, tmp_path: Path) -> None:
    root = _mnt(dataset)
    (root / "f").write_text("1\n")
    engine = _engine(tmp_path, dataset)
    first = engine.create_backup(BackupRequest("fs-zfs"))
    first_snap = f"{dataset}@zfsbackd-{first.backup_id}"
    sh("zfs", "hold", "someone-else", first_snap)
    sh("zfs", "snapshot", f"{dataset}@manual")
    # set on the file system, the backup id is inherited by every snapshot: only one set on the snapshot is ours
    sh("zfs", "set", f"{command.BACKUP_ID_PROPERTY}=backup-0000000inherited", dataset)
    (root / "f").write_text("2\n")
    with structlog.testing.capture_logs() as logs:
        second = engine.create_backup(BackupRequest("fs-zfs"))
    snaps = [s.snapname for s in command.list_snapshots(dataset)]
    assert f"zfsbackd-{first.backup_id}" in snaps, "a snapshot someone holds is never destroyed"
    assert "manual" in snaps, "snapshots that are not ours are never touched"
    assert [e["snapshot"] for e in logs if e["event"] == "zfs_snapshot_kept_held"] == [first_snap]
    sh("zfs", "inherit", command.BACKUP_ID_PROPERTY, dataset)
    sh("zfs", "release", "someone-else", first_snap)

    sh("zfs", "destroy", f"{dataset}@zfsbackd-{second.backup_id}")  # the base is lost
    (root / "g").write_text("3\n")
    third = engine.create_backup(BackupRequest("fs-zfs"))
    assert third.stats.files_read == 1  # a full walk, but unchanged files are still not read
    assert _full_walk_root(engine, third.backup_id, second.root_tree) == third.root_tree


def test_the_snapshot_is_held_while_it_is_read(dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold is placed beside the walk (its transaction group is not waited for before the reading starts)
    and released at the commit; one that cannot be placed is logged, and the backup goes on unguarded."""
    root = _mnt(dataset)
    (root / "f").write_text("1\n")
    engine = _engine(tmp_path, dataset)
    seen: list[tuple[bool, str]] = []
    real_run = Archiver.run

    def run(self: Archiver) -> Any:
        snapshot = self.snapshot
        assert isinstance(snapshot, zfs_provider.ZfsSnapshot)
        seen.append((snapshot.held(), sh("zfs", "holds", "-H", f"{dataset}@{snapshot.name}")))
        return real_run(self)

    monkeypatch.setattr(Archiver, "run", run)
    first = engine.create_backup(BackupRequest("fs-zfs"))
    assert len(seen) == 1 and seen[0][0] is True
    assert zfs_provider.HOLD_TAG.decode() in seen[0][1].split()
    assert sh("zfs", "holds", "-H", f"{dataset}@zfsbackd-{first.backup_id}").strip() == ""

    monkeypatch.setattr(zfs_provider, "HOLD_TAG", b"t" * 300)  # longer than a hold tag may be
    (root / "f").write_text("2\n")
    with structlog.testing.capture_logs() as logs:
        second = engine.create_backup(BackupRequest("fs-zfs"))
    assert second.stats.files_read == 1 and seen[1][0] is False
    assert [e["snapshot"] for e in logs if e["event"] == "zfs_snapshot_not_held"] == [f"zfsbackd-{second.backup_id}"]
    assert sh("zfs", "holds", "-H", f"{dataset}@zfsbackd-{second.backup_id}").strip() == ""
    assert _ours(dataset) == [f"zfsbackd-{second.backup_id}"]


def test_missing_dataset_and_pool_are_clear_errors(pool: str, tmp_path: Path) -> None:
    engine = _engine(tmp_path, f"{pool}/does-not-exist")
    with pytest.raises(SnapshotError, match="does-not-exist"):
        engine.create_backup(BackupRequest("fs-zfs"))
    (tmp_path / "other").mkdir()
    engine = _engine(tmp_path / "other", "nopool/data")
    with pytest.raises(SnapshotError, match="zpool import nopool"):
        engine.create_backup(BackupRequest("fs-zfs"))


def test_recursive_source_backs_up_children_in_place(dataset: str, tmp_path: Path) -> None:
    root = _mnt(dataset)
    (root / "top.txt").write_text("parent\n")
    sh("zfs", "create", f"{dataset}/child")
    sh("zfs", "create", "-o", "recordsize=16K", f"{dataset}/child/grand")
    sh("zfs", "create", "-o", "canmount=off", f"{dataset}/container")  # nothing of its own to read
    (root / "child" / "c.txt").write_text("child\n")
    (root / "child" / "dir").mkdir()
    (root / "child" / "dir" / "d.bin").write_bytes(os.urandom(200_000))
    (root / "child" / "grand" / "g.txt").write_text("grandchild\n")
    os.chmod(root / "child" / "grand", 0o751)
    (root / "container").mkdir(exist_ok=True)
    (root / "container" / "in-parent.txt").write_text("stored in the parent dataset\n")
    engine = _engine(tmp_path, dataset, recursive=True)

    first = engine.create_backup(BackupRequest("fs-zfs"))
    assert first.stats.files == 5 and first.stats.files_read == 5
    for child in ("", "/child", "/child/grand", "/container"):  # one atomic snapshot of every file system
        assert _ours(dataset + child) == [f"zfsbackd-{first.backup_id}"]
    restored = engine.restore_backup(first.backup_id, _mnt(_target(dataset))).path
    assert _manifest(restored) == _manifest(root)

    (root / "child" / "grand" / "g.txt").write_text("grandchild, changed\n")
    (root / "child" / "new.txt").write_text("new in child\n")
    second = engine.create_backup(BackupRequest("fs-zfs"))
    assert second.stats.files == 6 and second.stats.files_read == 2, "zfs diff of each child: only changes read"
    sh("zfs", "create", f"{dataset}/late")  # created after the snapshot: a resumed backup leaves it out
    assert _full_walk_root(engine, second.backup_id, first.root_tree) == second.root_tree
    sh("zfs", "destroy", f"{dataset}/late")
    for child in ("", "/child", "/child/grand"):
        assert _ours(dataset + child) == [f"zfsbackd-{second.backup_id}"], "older snapshots pruned in children too"
    restored = engine.restore_backup(second.backup_id, _mnt(_target(dataset))).path
    assert _manifest(restored) == _manifest(root)

    new = f"{dataset}-new"  # the FSx way: a new dataset, children recreated as datasets with their properties
    engine.restore_backup(second.backup_id, None, target_dataset=new)
    new_mnt = _mnt(new)
    assert command.mounts_and_properties(new)[0] == [
        command.MountInfo(new, new_mnt),
        command.MountInfo(f"{new}/child", new_mnt / "child"),
        command.MountInfo(f"{new}/child/grand", new_mnt / "child" / "grand"),
        command.MountInfo(f"{new}/container", None),
    ]
    assert command.get_properties(f"{new}/child/grand", ["recordsize"]) == {"recordsize": "16384"}
    assert _manifest(new_mnt) == _manifest(root)
    assert os.stat(new_mnt / "child" / "grand").st_dev != os.stat(new_mnt / "child").st_dev

    sh("zfs", "set", f"mountpoint=/{dataset}-elsewhere", f"{dataset}/child")
    with pytest.raises(SnapshotError, match="outside"):
        engine.create_backup(BackupRequest("fs-zfs"))


def _target(dataset: str) -> str:
    """A scratch dataset to restore into (created once per test)."""
    name = f"{dataset}-target"
    if not _lzc_exists(name.encode()):
        sh("zfs", "create", name)
    return name


def _synced_txg(pool: str) -> int:
    """The newest transaction group the pool committed (/proc/spl/kstat/zfs/POOL/txgs, state C)."""
    rows = Path(f"/proc/spl/kstat/zfs/{pool}/txgs").read_text().splitlines()[1:]
    return max(int(row.split()[0]) for row in rows if row.split()[2] == "C")


def test_commit_is_one_channel_program_and_shares_its_txg(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup's commit (bookmark the new snapshot, destroy the older one and its bookmark, release the
    hold) is one channel program with the release and the bookmark destruction beside it, instead of four
    calls that each wait for their own transaction group in turn, and leaves what they left."""
    root = _mnt(dataset)
    (root / "f").write_text("1\n")
    engine = _engine(tmp_path, dataset)
    engine.create_backup(BackupRequest("fs-zfs"))
    pool = dataset.split("/")[0]
    calls: list[str] = []
    timings: dict[str, tuple[float, int]] = {}
    real_commit = zfs_provider.ZfsSnapshot.commit

    def timed_commit(self: zfs_provider.ZfsSnapshot) -> None:
        before, started = _synced_txg(pool), time.monotonic()
        real_commit(self)
        timings[label] = (time.monotonic() - started, _synced_txg(pool) - before)

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(zfs_provider.lzc, name)

        @functools.wraps(real)  # is_supported() goes by the function's name
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("lzc_channel_program", "lzc_bookmark", "lzc_destroy_snaps"):
        monkeypatch.setattr(zfs_provider.lzc, name, counted(name))
    monkeypatch.setattr(zfs_provider.ZfsSnapshot, "commit", timed_commit)

    label = "program"
    second = engine.create_backup(BackupRequest("fs-zfs"))
    assert calls == ["lzc_channel_program"]
    assert _ours(dataset) == [f"zfsbackd-{second.backup_id}"]
    bookmarks = sh("zfs", "list", "-H", "-t", "bookmark", "-o", "name", "-r", dataset).split()
    assert bookmarks == [f"{dataset}#zfsbackd-{second.backup_id}"]
    assert sh("zfs", "holds", "-H", f"{dataset}@zfsbackd-{second.backup_id}").strip() == ""

    label = "one-by-one"
    monkeypatch.setattr(zfs_provider.lzc, "is_supported", lambda _f: False)
    calls.clear()
    third = engine.create_backup(BackupRequest("fs-zfs"))
    assert calls == ["lzc_bookmark", "lzc_destroy_snaps"]
    assert _ours(dataset) == [f"zfsbackd-{third.backup_id}"]
    # (seconds, transaction groups synced meanwhile) of each way, for the record: on an idle pool both take
    # a few txgs' time, since concurrent sync tasks join one txg only when they reach it while it is open
    print(f"commit: {timings}")
