"""Archive worker processes (zfsbackd.engine.shards): the same backup as one process makes, and every
way a worker or the backup's own process can stop.

The trees are small; the walk is told to start its workers after a few entries
(``pools.PARALLEL_AFTER_ENTRIES`` in this process, ``ZFSBACKD_PARALLEL_AFTER_ENTRIES`` for a CLI
process), so every test takes the path a large tree takes. Kills are fault points (``shard-archived``
in a worker, ``archive-result-received`` in the backup's process), never timing.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from enginekit import cli_command, make_config, run_cli, write_config
from fsfixtures import assert_trees_identical, populate_sample_tree

from zfsbackd import pools
from zfsbackd.engine import workers
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import EXIT_BACKUP_FAILED, EXIT_INTERRUPTED, ZfsbackdError
from zfsbackd.snapshot.base import Snapshot
from zfsbackd.store.records import BackupStats, Lifecycle
from zfsbackd.store.writer import WriterStats

DIRS, FILES = 24, 12
PATH_MAX = 4096


def _populate(root: Path) -> None:
    populate_sample_tree(root)
    for d in range(DIRS):
        directory = root / f"dir{d:02}" / "inner"
        directory.mkdir(parents=True)
        for f in range(FILES):
            (directory / f"f{f}").write_bytes(os.urandom(64 + 97 * d + f))
        (directory.parent / "top").write_bytes(b"x" * d)


def _too_deep(root: Path) -> int:
    """A chain of directories below *root* whose last levels lie beyond PATH_MAX: unreadable entries."""
    name = b"n" * 200
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    levels = PATH_MAX // len(name) + 2
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)
    return levels


@pytest.fixture
def source(xfs_dir: Path) -> Iterator[Path]:
    """A populated source on XFS; removed by ``rm`` (fts), which also removes chains beyond PATH_MAX."""
    root = xfs_dir / "src"
    root.mkdir()
    _populate(root)
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def _engine(tmp_path: Path, source: Path) -> Engine:
    return Engine(make_config(tmp_path, {"a": source, "b": source}, extra_fs={"allow_copy_snapshots": True}))


def _started_workers(logs: list[dict[str, object]]) -> list[int]:
    return [pid for e in logs if e["event"] == "archive_workers_started" for pid in e["pids"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("fs_kind", ["xfs", "btrfs", "copy"])
def test_workers_make_the_trees_one_process_makes(
    fs_kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same trees, same ids: a backup whose subdirectories went to workers has the root tree id of one
    made in a single process, restores identical, and an unchanged rerun reuses every tree."""
    source = {"xfs": "xfs_dir", "btrfs": "btrfs_subvol", "copy": "tmp_path"}[fs_kind]
    root = request.getfixturevalue(source) / "src"
    root.mkdir()
    _populate(root)
    engine = _engine(tmp_path, root)

    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)
    monkeypatch.setattr(pools, "ARCHIVE_PROCESSES", 3)  # this process and two workers, whatever the cores
    with structlog.testing.capture_logs() as logs:
        parallel = engine.create_backup(BackupRequest("fs-a"))
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10**9)
    single = engine.create_backup(BackupRequest("fs-b"))

    assert len(_started_workers(logs)) == 2
    assert parallel.lifecycle == single.lifecycle == Lifecycle.AVAILABLE
    assert parallel.root_tree == single.root_tree
    for field in ("files", "directories", "symlinks", "other", "bytes_total", "files_read", "bytes_read"):
        assert getattr(parallel.stats, field) == getattr(single.stats, field), field
    assert parallel.stats.bytes_uploaded > 0 and parallel.stats.blobs_new > 0
    assert engine.check(read_data=True).errors == []
    target = tmp_path / "out"
    target.mkdir()
    assert_trees_identical(root, engine.restore_backup(parallel.backup_id, target).path)

    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)
    (root / "dir03" / "inner" / "f1").write_bytes(b"changed")
    changed = engine.create_backup(BackupRequest("fs-a"))
    (root / "dir03" / "inner" / "f1").unlink()
    (root / "dir03" / "inner" / "f1").write_bytes(b"changed")  # new inode, same content
    os.utime(root / "dir03" / "inner" / "f1", ns=(1, 1))
    again = engine.create_backup(BackupRequest("fs-a"))
    unchanged = engine.create_backup(BackupRequest("fs-a"))

    assert changed.root_tree != parallel.root_tree and changed.stats.files_read == 1
    assert unchanged.root_tree == again.root_tree and unchanged.stats.files_read == 0
    assert unchanged.stats.files_unchanged == unchanged.stats.files
    out = tmp_path / "out2"
    out.mkdir()
    assert_trees_identical(root, engine.restore_backup(unchanged.backup_id, out).path)


def test_entries_a_worker_skips_are_counted_and_listed(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-entry problems met in a worker reach the record like those of the walk's own process.

    ``0deep`` sorts first, so it is the first directory the walk meets once its worker has started:
    a worker has room then, and gets it."""
    (source / "0deep").mkdir()
    levels = _too_deep(source / "0deep")
    engine = _engine(tmp_path, source)
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)
    monkeypatch.setattr(pools, "ARCHIVE_PROCESSES", 2)

    with structlog.testing.capture_logs() as logs:
        record = engine.create_backup(BackupRequest("fs-a"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.entries_skipped_with_errors == 1
    (skipped,) = record.stats.skipped_entries
    assert skipped["path"].startswith("0deep/" + "n" * 200) and skipped["errno"] == "ENAMETOOLONG"
    assert skipped["path"].count("/") < levels
    (logged,) = [e for e in logs if e["event"] == "entry_skipped"]
    assert logged["worker_pid"] in _started_workers(logs) and logged["path"] == skipped["path"]


def test_on_entry_error_fail_in_a_worker_fails_the_backup(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (source / "0deep").mkdir()
    _too_deep(source / "0deep")
    engine = Engine(make_config(tmp_path, {"a": source}, extra_fs={"on_entry_error": "fail"}))
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)
    monkeypatch.setattr(pools, "ARCHIVE_PROCESSES", 2)

    with pytest.raises(ZfsbackdError, match=r"0deep/n{200}.*cannot .*ENAMETOOLONG") as caught:
        engine.create_backup(BackupRequest("fs-a"))

    assert caught.value.code == "SnapshotFailed"
    (record,) = engine.own_records()
    assert record.lifecycle == Lifecycle.FAILED and "ENAMETOOLONG" in (record.failure_message or "")


def _cli_config(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "src"
    root.mkdir()
    _populate(root)
    return write_config(tmp_path, {"a": root}, extra_fs={"allow_copy_snapshots": True}), root


def _cli_env(fault_point: str | None = None) -> dict[str, str]:
    env = {**os.environ, "ZFSBACKD_PARALLEL_AFTER_ENTRIES": "10"}
    env.pop("ZFSBACKD_FAULT_POINT", None)
    if fault_point:
        env["ZFSBACKD_FAULT_POINT"] = fault_point
    return env


def _worker_pids(stderr: str) -> list[int]:
    started = [json.loads(line) for line in stderr.splitlines() if "archive_workers_started" in line]
    return [pid for event in started for pid in event["pids"]]


def _gone(pids: list[int], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.05)
    return False


def _restore_matches(config: Path, backup_id: str, root: Path, target: Path) -> None:
    target.mkdir()
    result = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))
    assert result.returncode == 0, result.stderr
    (restored,) = target.iterdir()
    assert_trees_identical(root, restored)


def test_a_worker_killed_fails_the_backup_and_the_next_one_is_whole(tmp_path: Path) -> None:
    """SIGKILL of a worker (as the OOM killer would) after its first directory: what it returned may
    be in a pack it never wrote, so the backup fails, classified; the next backup is complete."""
    config, root = _cli_config(tmp_path)
    command = cli_command(config, "-v", "create-backup", "--file-system-id", "fs-a", "--wait")

    failed = subprocess.run(command, capture_output=True, text=True, env=_cli_env("shard-archived:1"), timeout=120)

    assert failed.returncode == EXIT_BACKUP_FAILED, failed.stderr
    error = json.loads(failed.stderr[failed.stderr.index('{\n  "Error"') :])["Error"]
    assert error["Code"] == "WorkerProcessLost" and "killed by signal 9" in error["Message"]
    assert _gone(_worker_pids(failed.stderr))
    again = subprocess.run(command, capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)["Backup"]
    assert record["Lifecycle"] == "AVAILABLE"
    assert run_cli(config, "check", "--read-data").returncode == 0
    _restore_matches(config, record["BackupId"], root, tmp_path / "out")


def test_the_backup_killed_takes_its_workers_and_resumes(tmp_path: Path) -> None:
    """SIGKILL of the backup's own process while workers run: they die with it (no orphan keeps
    uploading), and the next run resumes the same backup and completes it."""
    config, root = _cli_config(tmp_path)
    command = cli_command(config, "-v", "create-backup", "--file-system-id", "fs-a", "--wait")

    killed = subprocess.run(
        command, capture_output=True, text=True, env=_cli_env("archive-result-received:1"), timeout=120
    )

    assert killed.returncode == -signal.SIGKILL
    pids = _worker_pids(killed.stderr)
    assert len(pids) == pools.ARCHIVE_PROCESSES - 1 and _gone(pids)
    resumed = subprocess.run(command, capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "backup_resuming" in resumed.stderr
    record = json.loads(resumed.stdout)["Backup"]
    assert record["Lifecycle"] == "AVAILABLE"
    _restore_matches(config, record["BackupId"], root, tmp_path / "out")


@pytest.mark.parametrize("held_at", ["shard-archived", "pack-uploaded"])
def test_sigterm_stops_the_workers_and_the_backup_resumes(held_at: str, tmp_path: Path) -> None:
    """SIGTERM to the backup's process while it waits for its worker, held after its first directory
    (``shard-archived``) or in its final flush (``pack-uploaded``: the tree is too small for a pack
    before): one cancellation path stops both, the command exits 130 at once, and the rerun completes."""
    config, root = _cli_config(tmp_path)
    hold = tmp_path / "hold"
    command = cli_command(config, "-v", "create-backup", "--file-system-id", "fs-a", "--wait")
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_cli_env(f"{held_at}:1:pause={hold}"),
    )
    deadline = time.monotonic() + 60
    while not Path(f"{hold}.paused").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the backup's process has seen it and SIGTERMed the worker, which holds on
    stopped_at = time.monotonic()
    hold.touch()
    _out, err = process.communicate(timeout=60)

    assert process.returncode == EXIT_INTERRUPTED, err
    assert time.monotonic() - stopped_at < 10
    assert _gone(_worker_pids(err), 1)
    assert "backup_interrupted" in err
    resumed = run_cli(config, "create-backup", "--file-system-id", "fs-a", "--wait")
    assert resumed.returncode == 0, resumed.stderr
    _restore_matches(config, json.loads(resumed.stdout)["Backup"]["BackupId"], root, tmp_path / "out")


def test_a_zfs_snapshot_is_never_handed_to_a_worker() -> None:
    """Its object map is kept from every directory of one process: pickling one must fail loudly."""
    from zfsbackd.snapshot.zfs import ZfsSnapshot

    snapshot = ZfsSnapshot.__new__(ZfsSnapshot)
    with pytest.raises(TypeError, match="not read by worker processes"):
        snapshot.__reduce__()
    assert not ZfsSnapshot.parallel_walk and Snapshot.parallel_walk


def test_worker_statistics_add_up() -> None:
    mine = BackupStats(files_read=2, bytes_read=10, skipped_entries=[{"path": "a"}] * 99)
    mine.add(BackupStats(files_read=3, bytes_read=5, skipped_entries=[{"path": "b"}] * 5), entries_kept=100)
    assert (mine.files_read, mine.bytes_read, len(mine.skipped_entries)) == (5, 15, 100)
    assert mine.skipped_entries[-1] == {"path": "b"}
    written = WriterStats(blobs_new=1, bytes_uploaded=7)
    written.add(WriterStats(blobs_new=2, bytes_uploaded=1, packs_uploaded=1))
    assert (written.blobs_new, written.bytes_uploaded, written.packs_uploaded) == (3, 8, 1)


def test_workers_that_cannot_start_leave_the_backup_to_its_own_process(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pids limit (EAGAIN from fork) met by the second worker: the first is stopped, a warning says
    so, and the backup is made whole in one process."""
    real = multiprocessing.get_context("spawn")
    started: list[multiprocessing.process.BaseProcess] = []

    class RefusingContext:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def Process(self, *args: object, **kwargs: object) -> object:
            process = real.Process(*args, **kwargs)
            if started:
                process.start = lambda: (_ for _ in ()).throw(OSError(errno.EAGAIN, "Resource temporarily unavailable"))
            started.append(process)
            return process

    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: RefusingContext())
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)
    monkeypatch.setattr(pools, "ARCHIVE_PROCESSES", 3)
    engine = _engine(tmp_path, source)

    with structlog.testing.capture_logs() as logs:
        record = engine.create_backup(BackupRequest("fs-a"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    (warning,) = [e for e in logs if e["event"] == "archive_workers_not_started"]
    assert warning["log_level"] == "warning" and warning["error"].startswith("EAGAIN")
    assert _started_workers(logs) == []
    first = started[0]
    first.join(10)
    assert first.exitcode is not None  # the worker that did start was stopped
    assert record.stats.files > DIRS * FILES
    target = tmp_path / "out"
    target.mkdir()
    assert_trees_identical(source, engine.restore_backup(record.backup_id, target).path)
