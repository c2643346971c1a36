"""Copies between regions on a real S3 server (Ceph RGW), through a flaky network.

Both S3 regions are buckets on one Ceph cluster: a region is a bucket plus a
prefix, and the copy path only ever talks to two independent stores, so a
second cluster would add its start-up time without exercising anything new.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from enginekit import write_config
from fsfixtures import assert_trees_identical, populate_sample_tree
from s3kit import FaultPlan, FaultProxy, S3Server, ceph, new_bucket_name, write_credentials_file

from zfsbackd.config import load_config
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.store.records import Lifecycle

__all__ = ["ceph"]

MiB = 1024 * 1024


def _config(tmp_path: Path, source: Path, server: S3Server, endpoint: str, buckets: dict[str, str]) -> Path:
    config = write_config(tmp_path, {"src": source})
    data = yaml.safe_load(config.read_text())
    credentials = write_credentials_file(tmp_path / "s3.ini", server.access_key, server.secret_key)
    for region, bucket in buckets.items():
        data["regions"][region] = {
            "type": "s3",
            "endpoint_url": endpoint,
            "bucket": bucket,
            "prefix": "zfsbackd/",
            "credentials_file": str(credentials),
            "addressing_style": "path",
            "create_if_missing": True,
        }
    config.write_text(yaml.safe_dump(data))
    return config


def test_copies_to_and_between_s3_regions_survive_faults_and_stay_incremental(
    ceph: S3Server, xfs_dir: Path, tmp_path: Path
) -> None:
    populate_sample_tree(xfs_dir)
    rng = random.Random(21)
    for i in range(6):
        (xfs_dir / f"bulk{i}.bin").write_bytes(rng.randbytes(4 * MiB))
    client = ceph.client()
    buckets = {"eu-west-1": new_bucket_name(), "us-east-1": new_bucket_name()}
    for bucket in buckets.values():
        client.create_bucket(Bucket=bucket)
    plan = FaultPlan(error_rate=0.08, reset_rate=0.02, delay_rate=0.05, max_delay=0.2, seed=7)
    with FaultProxy(ceph.endpoint, plan) as proxy:
        engine = Engine(load_config(_config(tmp_path, xfs_dir, ceph, proxy.url, buckets)))
        first = engine.create_backup(BackupRequest("fs-src"))
        eu1 = engine.copy_backup(first.backup_id, destination_region="eu-west-1")
        us1 = engine.copy_backup(eu1.backup_id, source_region="eu-west-1", destination_region="us-east-1")
        (xfs_dir / "bulk2.bin").write_bytes(
            rng.randbytes(64 * 1024) + (xfs_dir / "bulk2.bin").read_bytes()[64 * 1024 :]
        )
        second = engine.create_backup(BackupRequest("fs-src"))
        eu2 = engine.copy_backup(second.backup_id, destination_region="eu-west-1")
        assert [c.lifecycle for c in (eu1, us1, eu2)] == [Lifecycle.AVAILABLE] * 3
        assert eu2.stats.bytes_uploaded < 0.1 * eu1.stats.bytes_uploaded, (eu2.stats.bytes_uploaded, eu1.stats)
        assert engine.check(region="eu-west-1", read_data=True).errors == []
        assert engine.check(region="us-east-1", read_data=True).errors == []
        target = tmp_path / "restore"
        target.mkdir()
        assert_trees_identical(xfs_dir, engine.restore_backup(eu2.backup_id, target, region="eu-west-1").path)
    retries = sum(engine.store(r).objects.metrics.retries.total() for r in buckets)
    assert proxy.faults > 0 and retries > 0
    assert all(engine.store(r).objects.metrics.errors.total() == 0 for r in buckets)
