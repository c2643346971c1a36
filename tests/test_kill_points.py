"""SIGKILL at exact steps (zfsbackd/faults.py), then the next run: nothing lost, nothing redone.

Each case runs the real CLI in its own process with ``ZFSBACKD_FAULT_POINT`` set,
so the process kills itself at that step — deterministic, unlike sending a
signal after polling for files. Then it asserts the invariants: the store checks
clean, the interrupted work resumes reusing what was durable, and every backup
that was intact before restores identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from enginekit import REPO, cli_command, make_config, run_cli, store_bytes, write_config
from fsfixtures import assert_trees_identical, tree_manifest

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.faults import ENV_VAR
from zfsbackd.store.records import Lifecycle

MiB = 1024 * 1024


def run_killed(config: Path, point: str, *args: str) -> None:
    """Run ``zfsbackd ARGS`` and require that it died of SIGKILL at ``point``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV_VAR: point}
    proc = subprocess.run(cli_command(config, *args), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: rc={proc.returncode} {proc.stderr[-2000:]}"


def _restore(engine: Engine, backup_id: str, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    return engine.restore_backup(backup_id, target).path


def _check_clean(config: Path) -> None:
    check = run_cli(config, "check", "--read-data")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.json["Check"]["Errors"] == []


@pytest.mark.parametrize("point", ["pack-uploaded:1", "pack-uploaded:4", "index-written:1", "backup-data-durable:1"])
def test_backup_killed_at_a_step_resumes_and_reuses_every_durable_pack(
    point: str, xfs_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(point)
    for i in range(6):
        (xfs_dir / f"big-{i}.bin").write_bytes(rng.randbytes(12 * MiB))
    (xfs_dir / "small").mkdir()
    for i in range(50):
        (xfs_dir / "small" / f"{i}.txt").write_text(f"file {i}\n" * (i + 1))
    config = write_config(tmp_path, {"src": xfs_dir})
    run_killed(config, point, "create-backup", "--file-system-id", "fs-src")

    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    (interrupted,) = engine.describe_backups().records
    assert interrupted.lifecycle == Lifecycle.CREATING and interrupted.root_tree is None
    store = engine.store()
    store.load_index()
    durable = len(store.index)
    assert durable > 0

    rerun = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.json["Backup"]["BackupId"] == interrupted.backup_id
    record = engine.get_backup(interrupted.backup_id)
    assert record.lifecycle == Lifecycle.AVAILABLE
    assert record.stats.blobs_deduplicated >= durable, "every durable blob is reused, not uploaded again"
    _check_clean(config)
    assert_trees_identical(xfs_dir, _restore(engine, record.backup_id, tmp_path, "restore"))


@pytest.mark.parametrize("point", ["record-deleted:1", "pack-uploaded:1", "gc-index-replaced:1", "gc-pack-deleted:1"])
def test_delete_and_collection_killed_at_a_step_finish_on_the_next_run(
    point: str, xfs_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(point)
    # keep.bin and gone.bin share B1's pack: deleting B1 rewrites that pack (pack-uploaded fires in
    # the collection's writer) and deletes B1's second pack whole (gone2.bin).
    (xfs_dir / "keep.bin").write_bytes(rng.randbytes(3 * MiB))
    (xfs_dir / "gone.bin").write_bytes(rng.randbytes(3 * MiB))
    (xfs_dir / "gone2.bin").write_bytes(rng.randbytes(20 * MiB))
    config = write_config(tmp_path, {"src": xfs_dir}, grace=0)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, grace=0))
    b1 = engine.create_backup(BackupRequest("fs-src"))
    (xfs_dir / "gone.bin").unlink()
    (xfs_dir / "gone2.bin").unlink()
    (xfs_dir / "new.bin").write_bytes(rng.randbytes(2 * MiB))
    b2 = engine.create_backup(BackupRequest("fs-src"))
    manifest2 = tree_manifest(xfs_dir)
    before = store_bytes(tmp_path / "store")

    run_killed(config, point, "delete-backup", "--backup-id", b1.backup_id)
    assert engine.get_backup(b1.backup_id).lifecycle == Lifecycle.DELETED
    # Whatever step it died at, the surviving backup is whole at once, before any repair.
    assert tree_manifest(_restore(engine, b2.backup_id, tmp_path, "mid")) == manifest2

    gc = run_cli(config, "gc", "--grace-period", "0")
    assert gc.returncode == 0, gc.stderr
    _check_clean(config)
    freed = before - store_bytes(tmp_path / "store")
    assert 23 * MiB <= freed <= 24 * MiB, f"freed {freed} bytes: exactly gone.bin and gone2.bin"
    assert tree_manifest(_restore(engine, b2.backup_id, tmp_path, "after")) == manifest2


def test_copy_killed_after_a_pack_resumes_without_resending(xfs_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    for i in range(4):
        (xfs_dir / f"big-{i}.bin").write_bytes(rng.randbytes(12 * MiB))
    config = write_config(tmp_path, {"src": xfs_dir}, extra_regions={"far": tmp_path / "far"})
    loaded = make_config(tmp_path, {"src": xfs_dir}, extra_regions={"far": tmp_path / "far"})
    source = Engine(loaded).create_backup(BackupRequest("fs-src"))

    run_killed(
        config, "pack-uploaded:2", "copy-backup", "--source-backup-id", source.backup_id, "--destination-region", "far"
    )
    engine = Engine(loaded)
    (copy,) = engine.copies_in_progress(source.backup_id, "local")
    assert copy.lifecycle == Lifecycle.COPYING
    done = engine.run_copy(copy)
    assert done.lifecycle == Lifecycle.AVAILABLE
    assert done.stats.bytes_uploaded <= 2 * 12 * MiB + 2 * MiB, "the two durable packs were not sent again"
    check = run_cli(config, "check", "--read-data", "--region", "far")
    assert check.returncode == 0 and check.json["Check"]["Errors"] == [], check.stdout + check.stderr
    restored = engine.restore_backup(done.backup_id, _restore_target(tmp_path), region="far").path
    assert_trees_identical(xfs_dir, restored)


def _restore_target(tmp_path: Path) -> Path:
    target = tmp_path / "copy-restore"
    target.mkdir()
    return target


def test_restore_killed_mid_way_never_looks_like_a_finished_restore(xfs_dir: Path, tmp_path: Path) -> None:
    for i in range(30):
        (xfs_dir / f"f{i:02d}.txt").write_text(f"file {i}\n" * 100)
    config = write_config(tmp_path, {"src": xfs_dir})
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    backup = engine.create_backup(BackupRequest("fs-src"))
    target = tmp_path / "target"
    target.mkdir()

    run_killed(config, "restore-file-written:10", "restore-backup", "--backup-id", backup.backup_id,
               "--target", str(target))
    (left,) = list(target.iterdir())
    assert left.name.startswith("zfsbackd-incomplete-restore_"), left.name
    assert 10 <= len(list(left.iterdir())) < 30

    again = run_cli(config, "restore-backup", "--backup-id", backup.backup_id, "--target", str(target))
    assert again.returncode == 0, again.stderr
    restored = Path(again.json["Restore"]["Path"])
    assert restored.name.startswith("zfsbackd-restore_") and restored.parent == target
    assert_trees_identical(xfs_dir, restored)
