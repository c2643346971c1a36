"""Hosts sharing one store: each record names its host, and a host's scheduling, resumption and
retention touch only its own records (two hosts may both have an ``fs-home``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from enginekit import run_cli, write_config, write_host_config

from zfsbackd.config import default_host_name, load_config
from zfsbackd.daemon.service import Daemon
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import ConfigError
from zfsbackd.store.records import BackupType, Lifecycle


def _host(tmp_path: Path, name: str, source: Path, shared: Path | None = None, **fs: object) -> Path:
    """A config for host ``name`` with ``fs-home`` backing up ``source``, on ``shared``'s store if given."""
    return write_host_config(tmp_path, name, {"home": source}, shared=shared, extra_fs=fs or None)


def _two_hosts(xfs_dir: Path, tmp_path: Path, **fs: object) -> tuple[Path, Path, Path, Path]:
    src_a, src_b = xfs_dir / "a", xfs_dir / "b"
    for src in (src_a, src_b):
        src.mkdir()
        (src / "who").write_text(src.name)
    config_a = _host(tmp_path, "host-a", src_a, **fs)
    config_b = _host(tmp_path, "host-b", src_b, shared=tmp_path / "host-a", **fs)
    return config_a, config_b, src_a, src_b


def test_records_name_their_host_and_listing_shows_this_hosts_by_default(xfs_dir: Path, tmp_path: Path) -> None:
    config_a, config_b, _src_a, _src_b = _two_hosts(xfs_dir, tmp_path)
    a, b = Engine(load_config(config_a)), Engine(load_config(config_b))
    backup_a = a.create_backup(BackupRequest("fs-home"))
    backup_b = b.create_backup(BackupRequest("fs-home"))
    assert (backup_a.host_name, backup_b.host_name) == ("host-a", "host-b")
    assert backup_b.parent_backup_id is None, "host-b's fs-home is not an incremental of host-a's"

    assert [r.backup_id for r in a.describe_backups().records] == [backup_a.backup_id]
    assert [r.backup_id for r in a.describe_backups(filters={"host": ["host-b"]}).records] == [backup_b.backup_id]
    assert {r.backup_id for r in a.describe_backups(all_hosts=True).records} == {backup_a.backup_id, backup_b.backup_id}
    assert a.describe_backups(backup_ids=[backup_b.backup_id]).records[0].host_name == "host-b"

    listing = run_cli(config_b, "describe-backups")
    assert listing.returncode == 0, listing.stderr
    assert [(x["BackupId"], x["HostName"]) for x in listing.json["Backups"]] == [(backup_b.backup_id, "host-b")]
    everyone = run_cli(config_b, "describe-backups", "--all-hosts")
    assert {x["HostName"] for x in everyone.json["Backups"]} == {"host-a", "host-b"}

    # Disaster recovery: any host restores any host's backup.
    target = tmp_path / "dr"
    target.mkdir()
    restored = a.restore_backup(backup_b.backup_id, target).path
    assert (restored / "who").read_text() == "b"


def test_a_host_never_resumes_another_hosts_interrupted_backup(xfs_dir: Path, tmp_path: Path) -> None:
    config_a, config_b, _src_a, _src_b = _two_hosts(xfs_dir, tmp_path)
    b = Engine(load_config(config_b))
    store = b.store()
    stuck = b.create_backup(BackupRequest("fs-home")).with_changes(lifecycle=Lifecycle.CREATING, root_tree=None)
    store.save_record(stuck)  # host-b died mid-backup

    a = Engine(load_config(config_a))
    mine = a.create_backup(BackupRequest("fs-home"))
    assert mine.backup_id != stuck.backup_id and mine.lifecycle == Lifecycle.AVAILABLE
    assert a.get_backup(stuck.backup_id).lifecycle == Lifecycle.CREATING
    resumed = b.create_backup(BackupRequest("fs-home"))
    assert resumed.backup_id == stuck.backup_id, "its own host resumes it"


def test_retention_never_deletes_another_hosts_backups(xfs_dir: Path, tmp_path: Path) -> None:
    config_a, config_b, _src_a, _src_b = _two_hosts(
        xfs_dir, tmp_path, daily_backup_start_time="02:30", automatic_backup_retention_days=1
    )
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=5)
    b = Engine(load_config(config_b), clock=lambda: old)
    theirs = b.create_backup(BackupRequest("fs-home", BackupType.AUTOMATIC))
    a = Engine(load_config(config_a), clock=lambda: old)
    mine = a.create_backup(BackupRequest("fs-home", BackupType.AUTOMATIC))

    daemon = Daemon(config_a, clock=lambda: now, serve=False)
    try:
        daemon.tick()
        assert daemon.runner.wait_idle(120)
        daemon.tick()
    finally:
        daemon.runner.shutdown()
    assert a.get_backup(mine.backup_id).lifecycle == Lifecycle.DELETED, "its own expired backup goes"
    assert a.get_backup(theirs.backup_id).lifecycle == Lifecycle.AVAILABLE, "host-b's is host-b's business"


def test_host_name_defaults_to_the_system_name_and_is_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    assert load_config(config).host_name == default_host_name()
    data = yaml.safe_load(config.read_text())
    data["host_name"] = "no spaces/allowed"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert any("host_name" in e for e in raised.value.errors)


def test_a_client_request_token_names_one_hosts_request(xfs_dir: Path, tmp_path: Path) -> None:
    config_a, config_b, _src_a, _src_b = _two_hosts(xfs_dir, tmp_path)
    a, b = Engine(load_config(config_a)), Engine(load_config(config_b))
    mine = a.create_backup(BackupRequest("fs-home", client_request_token="nightly-1"))
    assert a.create_backup(BackupRequest("fs-home", client_request_token="nightly-1")).backup_id == mine.backup_id
    theirs = b.create_backup(BackupRequest("fs-home", client_request_token="nightly-1"))
    assert theirs.backup_id != mine.backup_id and theirs.host_name == "host-b"
