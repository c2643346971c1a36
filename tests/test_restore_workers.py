"""Restore worker processes (zfsbackd.engine.restore_workers): the same restore as one process makes,
and every way a worker or the restore's own process can stop.

A batch is cut at ``BATCH_DIRS`` directories, so a tree of a few hundred small directories is restored
in several batches; workers start once a restore has batched ``PARALLEL_AFTER_ENTRIES`` files, which the
tests lower (``pools`` in this process, ``ZFSBACKD_PARALLEL_AFTER_ENTRIES`` for a CLI process). Kills are
fault points (``restore-batch-written`` in a worker,
``restore-result-received`` in the restore's process), never timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from enginekit import cli_command, make_config, run_cli, write_config
from fsfixtures import assert_trees_identical, populate_sample_tree, remove_tree

from zfsbackd import pools
from zfsbackd.engine import restorer
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import EXIT_BACKUP_FAILED, EXIT_INTERRUPTED
from zfsbackd.store.records import Lifecycle

DIRS, FILES = 3 * restorer.BATCH_DIRS, 3  # three batches and then some


def _populate(root: Path) -> None:
    populate_sample_tree(root)
    for d in range(DIRS):
        directory = root / "many" / f"d{d:03}"
        directory.mkdir(parents=True)
        for f in range(FILES):
            (directory / f"f{f}").write_bytes(os.urandom(1 + 31 * f + d))
        os.link(directory / "f0", directory / "link-to-f0")  # hard links whose first name a worker writes
        os.setxattr(directory / "f1", "user.n", str(d).encode())


@pytest.fixture
def source(xfs_dir: Path) -> Iterator[Path]:
    root = xfs_dir / "src"
    root.mkdir()
    _populate(root)
    yield root
    remove_tree(root)


def _started(logs: list[dict[str, object]]) -> list[int]:
    return [pid for e in logs if e["event"] == "restore_workers_started" for pid in e["pids"]]  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_restore_what_one_process_restores(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole and --path restores with two workers are identical to the source (data, hard links,
    xattrs, sparse files, devices, times), count every file and byte, and leave no worker behind."""
    engine = Engine(make_config(tmp_path, {"a": source}))
    record = engine.create_backup(BackupRequest("fs-a"))
    monkeypatch.setattr(pools, "RESTORE_PROCESSES", 3)
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", 10)

    out = tmp_path / "out"
    out.mkdir()
    with structlog.testing.capture_logs() as logs:
        result = engine.restore_backup(record.backup_id, out)
    pids = _started(logs)
    assert len(pids) == 2
    assert_trees_identical(source, result.path)
    monkeypatch.setattr(pools, "RESTORE_PROCESSES", 1)
    alone = tmp_path / "alone"
    alone.mkdir()
    single = engine.restore_backup(record.backup_id, alone)
    assert (result.files, result.directories, result.bytes) == (single.files, single.directories, single.bytes)
    assert result.files == record.stats.files and result.bytes > 0
    assert not any(_alive(pid) for pid in pids)

    monkeypatch.setattr(pools, "RESTORE_PROCESSES", 3)
    part = tmp_path / "part"
    part.mkdir()
    with structlog.testing.capture_logs() as logs:
        selected = engine.restore_backup(record.backup_id, part, paths=["many"])
    assert len(_started(logs)) == 2
    assert_trees_identical(source / "many", selected.path / "many")


def test_a_small_restore_stays_in_one_process(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several batches, but fewer files than PARALLEL_AFTER_ENTRIES: no worker is worth its start."""
    root = source
    engine = Engine(make_config(tmp_path, {"a": root}))
    record = engine.create_backup(BackupRequest("fs-a"))
    monkeypatch.setattr(pools, "RESTORE_PROCESSES", 3)
    monkeypatch.setattr(pools, "PARALLEL_AFTER_ENTRIES", record.stats.files + 1)
    out = tmp_path / "out"
    out.mkdir()
    with structlog.testing.capture_logs() as logs:
        result = engine.restore_backup(record.backup_id, out)
    assert record.stats.files > 2 * restorer.BATCH_DIRS  # several batches
    assert _started(logs) == []
    assert_trees_identical(root, result.path)


def _cli_backup(tmp_path: Path, source: Path) -> tuple[Path, str]:
    config = write_config(tmp_path, {"a": source})
    made = run_cli(config, "create-backup", "--file-system-id", "fs-a", "--wait")
    assert made.returncode == 0, made.stderr
    backup = made.json["Backup"]
    assert backup["Lifecycle"] == Lifecycle.AVAILABLE.value
    return config, backup["BackupId"]


def _env(fault: str) -> dict[str, str]:
    """A restore's environment: workers after 10 files, and the fault point armed."""
    return {**os.environ, "ZFSBACKD_FAULT_POINT": fault, "ZFSBACKD_PARALLEL_AFTER_ENTRIES": "10"}


def _worker_pids(stderr: str) -> list[int]:
    started = [json.loads(line) for line in stderr.splitlines() if "restore_workers_started" in line]
    return [pid for event in started for pid in event["pids"]]


def test_a_worker_killed_fails_the_restore_and_the_next_one_is_whole(source: Path, tmp_path: Path) -> None:
    """SIGKILL of a worker after its first batch: WorkerProcessLost (exit 7) naming it, the partial restore
    kept as failed, nothing left running; the same restore then succeeds."""
    config, backup_id = _cli_backup(tmp_path, source)
    target = tmp_path / "target"
    target.mkdir()
    command = cli_command(config, "-v", "restore-backup", "--backup-id", backup_id, "--target", str(target))

    failed = subprocess.run(command, capture_output=True, text=True, env=_env("restore-batch-written:1"), timeout=120)

    assert failed.returncode == EXIT_BACKUP_FAILED, failed.stderr
    error = json.loads(failed.stderr[failed.stderr.index('{\n  "Error"') :])["Error"]
    assert error["Code"] == "WorkerProcessLost", error
    assert "restore worker process" in error["Message"] and "signal 9" in error["Message"], error
    (left,) = list(target.iterdir())
    assert left.name.startswith(restorer.FAILED_PREFIX) and str(left) in error["Message"]
    assert not any(_alive(pid) for pid in _worker_pids(failed.stderr))

    ok = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))
    assert ok.returncode == 0, ok.stderr
    assert_trees_identical(source, Path(ok.json["Restore"]["Path"]))


def test_the_restore_killed_takes_its_workers(source: Path, tmp_path: Path) -> None:
    """SIGKILL of the restore's process as it receives a worker's first result: its workers die with it
    (PR_SET_PDEATHSIG), what is left is named incomplete, and the restore runs again whole."""
    config, backup_id = _cli_backup(tmp_path, source)
    target = tmp_path / "target"
    target.mkdir()
    command = cli_command(config, "-v", "restore-backup", "--backup-id", backup_id, "--target", str(target))

    killed = subprocess.run(
        command, capture_output=True, text=True, env=_env("restore-result-received:1"), timeout=120
    )

    assert killed.returncode == -signal.SIGKILL
    pids = _worker_pids(killed.stderr)
    assert pids, killed.stderr
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    (left,) = list(target.iterdir())
    assert left.name.startswith(restorer.INCOMPLETE_PREFIX)

    ok = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target))
    assert ok.returncode == 0, ok.stderr
    assert_trees_identical(source, Path(ok.json["Restore"]["Path"]))


def test_ctrl_c_stops_the_restore_and_its_workers(source: Path, tmp_path: Path) -> None:
    """SIGINT to the restore's process while its worker is held after its first batch: the command exits
    130 soon after the worker is let go, the worker is gone, the partial restore is kept as failed."""
    config, backup_id = _cli_backup(tmp_path, source)
    target = tmp_path / "target"
    target.mkdir()
    hold = tmp_path / "hold"
    command = cli_command(config, "-v", "restore-backup", "--backup-id", backup_id, "--target", str(target))
    env = _env(f"restore-batch-written:1:pause={hold}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not Path(f"{hold}.paused").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the restore's process has stopped and SIGTERMed its worker, which is held
    let_go = time.monotonic()
    hold.touch()
    _out, err = process.communicate(timeout=60)

    assert process.returncode == EXIT_INTERRUPTED, err
    assert time.monotonic() - let_go < 10
    assert not any(_alive(pid) for pid in _worker_pids(err))
    (left,) = list(target.iterdir())
    assert left.name.startswith(restorer.FAILED_PREFIX)
