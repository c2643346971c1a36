"""Invariants that protect data: commit order and resume after SIGKILL, GC frees exactly
the unique data, reads verify, restores stay inside their target."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from enginekit import REPO, cli_command, make_config, pack_files, run_cli, store_bytes, write_config
from fsfixtures import assert_trees_identical, populate_sample_tree, tree_manifest

from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import IntegrityError, RestoreError
from zfsbackd.store.blobs import BlobType
from zfsbackd.store.packs import pack_key
from zfsbackd.store.records import BackupRecord, BackupType, Lifecycle, new_backup_id, utc_now
from zfsbackd.store.tree import serialize_tree
from zfsbackd.store.writer import PackWriter

MiB = 1024 * 1024


def _restore(engine: Engine, backup_id: str, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    return engine.restore_backup(backup_id, target).path


# ----------------------------------------------------------------------- GC
def test_delete_and_gc_free_exactly_the_unique_data(xfs_dir: Path, tmp_path: Path) -> None:
    populate_sample_tree(xfs_dir)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, grace=0))
    store_dir = tmp_path / "store"
    first = engine.create_backup(BackupRequest("fs-src"))
    manifest_first = tree_manifest(xfs_dir)
    size_first = store_bytes(store_dir)

    unique = xfs_dir / "unique.bin"
    unique.write_bytes(random.Random(1).randbytes(6 * MiB))  # incompressible: stored size ~ 6 MiB
    second = engine.create_backup(BackupRequest("fs-src"))
    unique.unlink()
    third = engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    unique_blobs = {bytes.fromhex(c[2]) for c in _file_chunks(engine, second, b"unique.bin")}
    assert unique_blobs and all(b in store.index for b in unique_blobs)
    size_before_delete = store_bytes(store_dir)
    assert size_before_delete > size_first + 6 * MiB

    engine.delete_backup(second.backup_id)

    size_after = store_bytes(store_dir)
    freed = size_before_delete - size_after
    assert 6 * MiB <= freed <= 6 * MiB + 256 * 1024, f"freed {freed} bytes"
    store.load_index(force=True)
    assert not any(b in store.index for b in unique_blobs)
    assert engine.describe_backups()[0] == [engine.get_backup(first.backup_id), engine.get_backup(third.backup_id)]
    assert tree_manifest(_restore(engine, first.backup_id, tmp_path, "r1")) == manifest_first
    assert_trees_identical(xfs_dir, _restore(engine, third.backup_id, tmp_path, "r3"))
    assert engine.check(read_data=True).errors == []


def _file_chunks(engine: Engine, record: BackupRecord, name: bytes) -> list[list]:
    from zfsbackd.store.tree import node_name, parse_tree

    store = engine.store()
    root = parse_tree(store.read_blob(bytes.fromhex(record.root_tree or ""), what="root"), what="root")[0]
    nodes = parse_tree(store.read_blob(bytes.fromhex(root["subtree"]), what="t"), what="t")
    (node,) = [n for n in nodes if node_name(n) == name]
    return node["chunks"]


def test_gc_keeps_young_packs_within_the_grace_period(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_bytes(random.Random(2).randbytes(MiB))
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}, grace=3600))
    record = engine.create_backup(BackupRequest("fs-src"))
    before = store_bytes(tmp_path / "store")
    engine.delete_backup(record.backup_id)
    assert store_bytes(tmp_path / "store") == before
    result = engine.collect_garbage(grace_seconds=0)
    assert result.packs_deleted >= 1
    assert store_bytes(tmp_path / "store") == 0


# ------------------------------------------------------------------ SIGKILL
@pytest.mark.parametrize("kill_after_packs", [1, 4, 9])
def test_sigkill_mid_backup_then_rerun_resumes_and_reuses_uploads(
    kill_after_packs: int, xfs_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(kill_after_packs)
    for i in range(20):
        (xfs_dir / f"big-{i:02d}.bin").write_bytes(rng.randbytes(16 * MiB))
    config = write_config(tmp_path, {"src": xfs_dir})
    store_dir = tmp_path / "store"
    # The process SIGKILLs itself right after its n-th pack is in the store.
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZFSBACKD_FAULT_POINT": f"pack-uploaded:{kill_after_packs}"}
    proc = subprocess.run(
        cli_command(config, "create-backup", "--file-system-id", "fs-src"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert len(pack_files(store_dir)) >= kill_after_packs

    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    (interrupted,) = engine.describe_backups()[0]
    assert interrupted.lifecycle == Lifecycle.CREATING
    assert interrupted.root_tree is None  # nothing points at data that may not be durable
    store = engine.store()
    store.load_index()
    blobs_before = len(store.index)
    assert blobs_before >= kill_after_packs  # uploaded packs are found again, indexed or not

    rerun = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert rerun.returncode == 0, rerun.stderr
    backup = rerun.json["Backup"]
    assert backup["BackupId"] == interrupted.backup_id, "the interrupted backup is resumed, not orphaned"
    assert backup["Lifecycle"] == "AVAILABLE"
    record = engine.get_backup(interrupted.backup_id)
    assert record.stats.blobs_deduplicated >= blobs_before
    total = 20 * 16 * MiB
    assert record.stats.bytes_deduplicated >= blobs_before * 256 * 1024
    assert record.stats.bytes_uploaded <= total - record.stats.bytes_deduplicated + MiB
    check = run_cli(config, "check", "--read-data")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.json["Check"]["Errors"] == []
    assert_trees_identical(xfs_dir, _restore(engine, interrupted.backup_id, tmp_path, "restore"))


# --------------------------------------------------------------- corruption
def test_flipped_byte_in_a_pack_is_detected_and_named(xfs_dir: Path, tmp_path: Path) -> None:
    victim = xfs_dir / "docs" / "victim.bin"
    victim.parent.mkdir()
    victim.write_bytes(random.Random(3).randbytes(100_000))
    config = write_config(tmp_path, {"src": xfs_dir})
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    record = engine.create_backup(BackupRequest("fs-src"))
    (chunk,) = _file_chunks_in(engine, record, b"docs", b"victim.bin")
    loc = engine.store().index.get(bytes.fromhex(chunk[2]))
    assert loc is not None
    pack = tmp_path / "store" / pack_key(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x01
    pack.write_bytes(bytes(data))

    check = run_cli(config, "check", "--read-data")
    assert check.returncode == 6
    errors = check.json["Check"]["Errors"]
    assert any(pack_key(loc.pack_id) in e and record.backup_id in e and "/docs/victim.bin" in e for e in errors), errors

    target = tmp_path / "restore"
    target.mkdir()
    restore = run_cli(config, "restore-backup", "--backup-id", record.backup_id, "--target", str(target))
    assert restore.returncode == 6
    assert restore.error["Code"] == "IntegrityError"
    assert record.backup_id in restore.error["Message"] and "/docs/victim.bin" in restore.error["Message"]
    assert [p.name.startswith("zfsbackd-failed-restore_") for p in target.iterdir()] == [True]


def _file_chunks_in(engine: Engine, record: BackupRecord, directory: bytes, name: bytes) -> list[list]:
    from zfsbackd.store.tree import node_name, parse_tree

    store = engine.store()
    root = parse_tree(store.read_blob(bytes.fromhex(record.root_tree or ""), what="root"), what="root")[0]
    top = {node_name(n): n for n in parse_tree(store.read_blob(bytes.fromhex(root["subtree"]), what="t"), what="t")}
    sub = parse_tree(store.read_blob(bytes.fromhex(top[directory]["subtree"]), what="t"), what="t")
    (node,) = [n for n in sub if node_name(n) == name]
    return node["chunks"]


# ---------------------------------------------------------- crafted trees
def _crafted_backup(engine: Engine, nodes_by_dir: dict[str, list[dict]]) -> str:
    """Write a backup whose trees are given verbatim (as an attacker with the key could)."""
    store = engine.store()
    store.load_index()
    with PackWriter(store) as writer:

        def tree(nodes: list[dict]) -> str:
            return writer.add(BlobType.TREE, serialize_tree(nodes))[0].hex()

        content, _ = writer.add(BlobType.DATA, b"pwned\n")
        file_node = {
            "type": "file",
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 0,
            "ctime_ns": 0,
            "inode": 1,
            "size": 6,
            "chunks": [[0, 6, content.hex()]],
        }
        top = [{**file_node, **n} if n.get("type", "file") == "file" else n for n in nodes_by_dir["/"]]
        sub_id = tree([{**file_node, "name": "x"}])
        for n in top:
            if n.get("type") == "dir":
                n.setdefault("subtree", sub_id)
        root = {
            "name": ".",
            "type": "dir",
            "mode": 0o755,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 0,
            "ctime_ns": 0,
            "inode": 2,
            "subtree": tree(top),
        }
        root_id = tree([root])
        writer.flush()
    record = BackupRecord(
        new_backup_id(),
        "fs-src",
        store.region,
        BackupType.USER_INITIATED,
        Lifecycle.AVAILABLE,
        utc_now(),
        root_tree=root_id,
    )
    store.save_record(record)
    return record.backup_id


@pytest.mark.parametrize(
    "evil",
    [
        {"name": "../escaped"},
        {"name": "/tmp/absolute-escape"},
        {"name": "a/../../escaped"},
        {"name": ".."},
        {"name": "nul\u0000byte"},
    ],
)
def test_crafted_tree_names_never_write_outside_the_target(evil: dict, tmp_path: Path, xfs_dir: Path) -> None:
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    backup_id = _crafted_backup(engine, {"/": [{"name": "fine.txt"}, evil]})
    target = tmp_path / "nest" / "target"
    target.mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts and "state" not in p.parts)
    with pytest.raises(RestoreError, match="unsafe entry name"):
        engine.restore_backup(backup_id, target)
    after = sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts and "state" not in p.parts)
    new = [p for p in after if p not in before]
    assert all(p.is_relative_to(target) for p in new), new
    assert not Path("/tmp/absolute-escape").exists()
    assert [p.name.startswith("zfsbackd-failed-restore_") for p in target.iterdir()] == [True]


def test_symlink_in_backup_is_never_followed_while_restoring(tmp_path: Path, xfs_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    link = {
        "name": "a",
        "type": "symlink",
        "target": str(outside),
        "mode": 0o777,
        "uid": 0,
        "gid": 0,
        "mtime_ns": 0,
        "ctime_ns": 0,
        "inode": 5,
    }
    directory = {
        "name": "a",
        "type": "dir",
        "mode": 0o755,
        "uid": 0,
        "gid": 0,
        "mtime_ns": 0,
        "ctime_ns": 0,
        "inode": 6,
    }
    backup_id = _crafted_backup(engine, {"/": [link, directory]})
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises((RestoreError, FileExistsError)):
        engine.restore_backup(backup_id, target)
    assert list(outside.iterdir()) == []


def test_restore_path_arguments_cannot_escape(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    config = write_config(tmp_path, {"src": xfs_dir})
    backup_id = run_cli(config, "create-backup", "--file-system-id", "fs-src").json["Backup"]["BackupId"]
    target = tmp_path / "target"
    target.mkdir()
    for bad in ("../etc/passwd", "a/../../x"):
        result = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target), "--path", bad)
        assert result.returncode == 2, result.stderr
        assert "--path" in result.error["Message"]
    missing = run_cli(config, "restore-backup", "--backup-id", backup_id, "--target", str(target), "--path", "nope")
    assert missing.returncode == 2
    assert "is not in backup" in missing.error["Message"]


def test_reads_verify_blob_ids(xfs_dir: Path, tmp_path: Path) -> None:
    """A blob whose sealed bytes are swapped for another valid blob's fails: ids are bound in."""
    (xfs_dir / "a").write_bytes(b"A" * 1000)
    (xfs_dir / "b").write_bytes(b"B" * 2000)
    engine = Engine(make_config(tmp_path, {"src": xfs_dir}))
    engine.create_backup(BackupRequest("fs-src"))
    store = engine.store()
    ids = [bid for bid in store.index.blob_ids() if store.blob_type(bid) == BlobType.DATA]
    loc_a, loc_b = store.index.get(ids[0]), store.index.get(ids[1])
    assert loc_a and loc_b
    sealed_b = store.objects.get_range(pack_key(loc_b.pack_id), loc_b.offset, loc_b.length)
    with pytest.raises(IntegrityError):
        store.codec.decode(ids[0], sealed_b, what="swapped blob")
