"""The command line as a user meets it: JSON shapes, documented exit codes, clear errors."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import yaml
from enginekit import run_cli, write_config

from zfsbackd.errors import EXIT_BAD_REQUEST, EXIT_CONFLICT, EXIT_NOT_FOUND


def test_create_describe_delete_with_fsx_shapes(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f.txt").write_text("hello")
    config = write_config(tmp_path, {"src": xfs_dir})
    created = run_cli(
        config,
        "create-backup",
        "--file-system-id",
        "fs-src",
        "--name",
        "nightly run",
        "--tag",
        "team=storage",
        "--tag",
        "tier=gold",
    )
    assert created.returncode == 0, created.stderr
    backup = created.json["Backup"]
    assert backup["BackupId"].startswith("backup-") and len(backup["BackupId"]) == 24
    assert backup["Lifecycle"] == "AVAILABLE"
    assert backup["Type"] == "USER_INITIATED"
    assert backup["Name"] == "nightly run"
    assert backup["Tags"] == [{"Key": "team", "Value": "storage"}, {"Key": "tier", "Value": "gold"}]
    assert backup["CreationTime"].endswith("Z")
    assert backup["Snapshot"]["Provider"] == "reflink"
    assert backup["Stats"]["Files"] == 1

    for _ in range(2):
        assert run_cli(config, "create-backup", "--file-system-id", "fs-src").returncode == 0
    page1 = run_cli(config, "describe-backups", "--max-results", "2").json
    assert len(page1["Backups"]) == 2 and page1["NextToken"]
    page2 = run_cli(config, "describe-backups", "--max-results", "2", "--next-token", page1["NextToken"]).json
    assert len(page2["Backups"]) == 1 and "NextToken" not in page2
    ids = [b["BackupId"] for b in page1["Backups"] + page2["Backups"]]
    assert ids[0] == backup["BackupId"] and len(set(ids)) == 3

    filtered = run_cli(config, "describe-backups", "--filter", "file-system-id=fs-other").json
    assert filtered["Backups"] == []
    one = run_cli(config, "describe-backups", "--backup-id", ids[1]).json["Backups"]
    assert [b["BackupId"] for b in one] == [ids[1]]

    deleted = run_cli(config, "delete-backup", "--backup-id", ids[1])
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.json == {"BackupId": ids[1], "Lifecycle": "DELETED"}
    remaining = [b["BackupId"] for b in run_cli(config, "describe-backups").json["Backups"]]
    assert remaining == [ids[0], ids[2]]
    table = run_cli(config, "describe-backups", "--output", "table")
    assert "BackupId" in table.stdout.splitlines()[0] and ids[0] in table.stdout


def test_client_request_token_is_idempotent(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    config = write_config(tmp_path, {"src": xfs_dir})
    args = ("create-backup", "--file-system-id", "fs-src", "--client-request-token", "tok-1")
    first = run_cli(config, *args).json["Backup"]["BackupId"]
    assert run_cli(config, *args).json["Backup"]["BackupId"] == first
    other = run_cli(config, *args, "--name", "different")
    assert other.returncode == EXIT_BAD_REQUEST
    assert "tok-1" in other.error["Message"]
    assert len(run_cli(config, "describe-backups").json["Backups"]) == 1


def test_bad_config_exits_2_and_names_every_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "encryption": {"mode": "none"},
                "file_systems": [
                    {"id": "fs-a", "source": {"path": "/srv/a"}, "automatic_backup_retention_days": 120},
                    {"id": "fs-b", "sourc": {"path": "/srv/b"}},
                ],
            }
        )
    )
    result = run_cli(bad, "config", "validate")
    assert result.returncode == EXIT_BAD_REQUEST
    message = result.error["Message"]
    assert "file_systems[0].automatic_backup_retention_days: 120 is out of range 0–90" in message
    assert "file_systems[1].sourc" in message
    assert result.stdout == ""
    good = write_config(tmp_path, {"src": tmp_path})
    ok = run_cli(good, "config", "validate")
    assert ok.returncode == 0 and ok.json["Config"]["FileSystems"] == ["fs-src"]
    missing = run_cli(tmp_path / "nope.yaml", "config", "validate")
    assert missing.returncode == EXIT_BAD_REQUEST and "nope.yaml" in missing.error["Message"]


def test_bad_arguments_give_documented_errors(xfs_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"src": xfs_dir})
    unknown_fs = run_cli(config, "create-backup", "--file-system-id", "fs-nope")
    assert unknown_fs.returncode == EXIT_NOT_FOUND
    assert unknown_fs.error["Code"] == "FileSystemNotFound" and "fs-src" in unknown_fs.error["Message"]
    bad_id = run_cli(config, "describe-backups", "--backup-id", "backup-xyz")
    assert bad_id.returncode == EXIT_BAD_REQUEST and "--backup-id" in bad_id.error["Message"]
    missing = run_cli(config, "delete-backup", "--backup-id", "backup-0123456789abcdef0")
    assert missing.returncode == EXIT_NOT_FOUND and missing.error["Code"] == "BackupNotFound"
    bad_tag = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--tag", "novalue")
    assert bad_tag.returncode == EXIT_BAD_REQUEST and "--tag" in bad_tag.error["Message"]
    long_name = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--name", "x" * 257)
    assert long_name.returncode == EXIT_BAD_REQUEST and "--name" in long_name.error["Message"]
    bad_filter = run_cli(config, "describe-backups", "--filter", "colour=red")
    assert bad_filter.returncode == EXIT_BAD_REQUEST and "colour" in bad_filter.error["Message"]
    usage = run_cli(config, "create-backup")
    assert usage.returncode == EXIT_BAD_REQUEST and "--file-system-id" in usage.stderr
    # Nothing was created by any of the failed commands.
    assert run_cli(config, "describe-backups").json["Backups"] == []


def test_key_file_readable_by_others_is_refused(xfs_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"src": xfs_dir})
    key = tmp_path / "store.key"
    os.chmod(key, 0o644)
    result = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert result.returncode == EXIT_BAD_REQUEST
    assert result.error["Code"] == "InvalidKeyFile"
    assert f"chmod 600 {key}" in result.error["Message"]
    assert key.read_text().strip() not in result.stderr + result.stdout
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("backups/*"))


def test_wrong_key_is_a_clear_error(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    config = write_config(tmp_path, {"src": xfs_dir})
    assert run_cli(config, "create-backup", "--file-system-id", "fs-src").returncode == 0
    key = tmp_path / "store.key"
    key.unlink()
    assert run_cli(None, "key", "generate", "--key-file", str(key)).returncode == 0
    result = run_cli(config, "describe-backups")
    assert result.returncode == EXIT_BAD_REQUEST
    assert "created with another key" in result.error["Message"]


def test_second_backup_of_a_file_system_gets_backup_in_progress(xfs_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"src": xfs_dir})
    lock_dir = tmp_path / "state" / "locks"
    lock_dir.mkdir(parents=True)
    fd = os.open(lock_dir / "fs-backup-fs-src.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running backup in another process holds it
        result = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    finally:
        os.close(fd)
    assert result.returncode == EXIT_CONFLICT
    assert result.error["Code"] == "BackupInProgress"
    assert run_cli(config, "create-backup", "--file-system-id", "fs-src").returncode == 0


def test_file_system_without_copy_on_write_is_refused_clearly(tmp_path: Path) -> None:
    source = Path("/dev/shm") / f"zfsbackd-test-{os.getpid()}"
    source.mkdir()
    try:
        (source / "f").write_text("x")
        config = write_config(tmp_path, {"plain": source})
        result = run_cli(config, "create-backup", "--file-system-id", "fs-plain")
        assert result.returncode == EXIT_BAD_REQUEST
        assert "tmpfs" in result.error["Message"] and "allow_copy_snapshots" in result.error["Message"]
        failed = run_cli(config, "describe-backups").json["Backups"]
        assert [b["Lifecycle"] for b in failed] == ["FAILED"]
        assert "tmpfs" in failed[0]["FailureDetails"]["Message"]
        allowed = write_config(tmp_path, {"plain": source}, extra_fs={"allow_copy_snapshots": True})
        ok = run_cli(allowed, "create-backup", "--file-system-id", "fs-plain")
        assert ok.returncode == 0, ok.stderr
        assert ok.json["Backup"]["Snapshot"]["Provider"] == "copy"
    finally:
        (source / "f").unlink()
        source.rmdir()
