"""The engine on a real S3 server: Ceph RGW on 127.0.0.1 (../shared/s3/ceph-rgw.sh), one bucket per test.

Ceph checks SigV4 signatures, honours ``If-None-Match: *`` and keeps real
upload dates, so it is where credentials, the create-only probe and the age
limit of the stale-upload sweep are proven.  The fault test puts a proxy that
fails, resets and delays requests between the engine and Ceph.
"""

from __future__ import annotations

import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog
from enginekit import run_cli
from fsfixtures import assert_trees_identical, populate_sample_tree
from s3kit import (
    FaultPlan,
    FaultProxy,
    S3Server,
    ceph,
    ceph_bucket,
    new_bucket_name,
    remaining_uploads,
    write_credentials_file,
    write_s3_config,
)

from zfsbackd.config import S3Region, load_config
from zfsbackd.engine.engine import BackupRequest, Engine
from zfsbackd.errors import StoreError
from zfsbackd.objectstore import quickack, s3
from zfsbackd.objectstore.s3 import S3ObjectStore
from zfsbackd.store.records import Lifecycle

# The fixtures imported from s3kit are requested by name; listing them here tells linters they are used.
__all__ = ["ceph", "ceph_bucket"]

MiB = 1024 * 1024
PREFIX = "zfsbackd/"


@pytest.fixture
def small_multipart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every store the engine opens sends its 16 MiB packs as multipart uploads of 5 MiB parts."""
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 8 * MiB)
    monkeypatch.setattr(s3, "PART_SIZE", 5 * MiB)


def _credentials(tmp_path: Path, server: S3Server, *, secret: str | None = None, access: str | None = None) -> Path:
    return write_credentials_file(tmp_path / "s3-credentials.ini", access or server.access_key,
                                  secret or server.secret_key)


def _region(server: S3Server, bucket: str, credentials: Path, endpoint: str | None = None) -> S3Region:
    return S3Region(name="s3home", bucket=bucket, endpoint_url=endpoint or server.endpoint, prefix=PREFIX,
                    credentials_file=credentials, addressing_style="path")


def _populate(source: Path, big_files: int, seed: int) -> None:
    """The sample tree plus incompressible 12 MiB files, so the engine fills several 16 MiB packs."""
    populate_sample_tree(source, seed=seed)
    rng = random.Random(seed)
    for i in range(big_files):
        (source / f"big-{i}.bin").write_bytes(rng.randbytes(12 * MiB))


def _restore(engine: Engine, backup_id: str, tmp_path: Path) -> Path:
    target = tmp_path / "restore"
    target.mkdir()
    return engine.restore_backup(backup_id, target).path


def _pack_etags(server: S3Server, bucket: str) -> list[str]:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=PREFIX + "data/").get("Contents", [])]
    return [client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"') for key in keys]


def test_backup_restore_check_round_trip_with_multipart_packs(
    ceph: S3Server, ceph_bucket: str, xfs_dir: Path, tmp_path: Path, small_multipart: None
) -> None:
    _populate(xfs_dir, big_files=3, seed=1)
    config = write_s3_config(tmp_path, {"src": xfs_dir}, endpoint=ceph.endpoint, bucket=ceph_bucket,
                             credentials_file=_credentials(tmp_path, ceph))
    engine = Engine(load_config(config))

    record = engine.create_backup(BackupRequest("fs-src"))

    assert record.lifecycle == Lifecycle.AVAILABLE
    etags = _pack_etags(ceph, ceph_bucket)
    assert sum(1 for etag in etags if "-" in etag) >= 2, f"expected multipart packs, ETags: {etags}"
    assert remaining_uploads(ceph.client(), ceph_bucket) == []
    objects = engine.store().objects
    assert isinstance(objects, S3ObjectStore) and objects.conditional_put_supported is True

    assert_trees_identical(xfs_dir, _restore(engine, record.backup_id, tmp_path))
    check = engine.check(read_data=True)
    assert check.errors == []
    assert check.bytes_read >= 36 * MiB

    # A second engine (another process, in effect) reads the same bucket and adds an incremental backup.
    (xfs_dir / "new.txt").write_text("changed\n")
    second = Engine(load_config(config)).create_backup(BackupRequest("fs-src"))
    assert second.stats.bytes_uploaded < 1 * MiB
    assert objects.metrics.errors.total() == 0


def test_conditional_put_probe_detects_support_and_cleans_up(
    ceph: S3Server, ceph_bucket: str, tmp_path: Path
) -> None:
    store = S3ObjectStore(_region(ceph, ceph_bucket, _credentials(tmp_path, ceph)))
    assert store.put_if_absent("config", b"one") is True
    assert store.conditional_put_supported is True
    assert store.put_if_absent("config", b"two") is False
    assert store.get("config") == b"one"
    assert list(store.list("locks/")) == []
    assert store.metrics.requests["head"] == 0  # create-only writes need no HEAD where If-None-Match works


def test_every_reply_is_read_with_quick_acks(
    ceph: S3Server, ceph_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ceph RGW holds a reply's body until the client ACKs its headers; delayed ACKs made each request 44 ms.

    Every response must be read on a socket in quick-ACK mode: a botocore that
    no longer takes the connection classes (install returns False) fails here
    instead of silently making every request 40 ms slower.
    """
    armed: list[int] = []
    arm = quickack._ack_replies_at_once

    def arm_and_record(sock: socket.socket | None) -> None:
        arm(sock)
        assert sock is not None
        armed.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK))

    monkeypatch.setattr(quickack, "_ack_replies_at_once", arm_and_record)
    store = S3ObjectStore(_region(ceph, ceph_bucket, _credentials(tmp_path, ceph)))
    assert quickack.installed(store._client)
    for i in range(4):
        store.put(f"records/r{i}", b"x" * 100)
        assert store.get(f"records/r{i}") == b"x" * 100
        assert len(list(store.list("records/"))) == i + 1
    assert armed == [1] * sum(store.metrics.requests.values())
    assert len(armed) >= 12


def test_listing_follows_continuation_tokens(ceph: S3Server, ceph_bucket: str, tmp_path: Path) -> None:
    """Ceph may end a page early while more keys follow: every key must come back, each once."""
    store = S3ObjectStore(_region(ceph, ceph_bucket, _credentials(tmp_path, ceph)))
    keys = [f"index/{i:05d}" for i in range(1234)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: store.put(k, b"i"), keys))
    listed = [info.key for info in store.list("index/")]
    assert len(listed) == len(keys) and sorted(listed) == keys
    assert store.metrics.requests["list"] >= 2


@pytest.mark.parametrize(
    ("which", "code"), [("secret", "SignatureDoesNotMatch"), ("access_key", "InvalidAccessKeyId")]
)
def test_wrong_credentials_fail_fast_without_the_secret(
    which: str, code: str, ceph: S3Server, ceph_bucket: str, tmp_path: Path
) -> None:
    secret = "wrong-secret-" + "9" * 27 if which == "secret" else ceph.secret_key
    access = "WRONGACCESSKEY" if which == "access_key" else ceph.access_key
    credentials = _credentials(tmp_path, ceph, secret=secret, access=access)
    store = S3ObjectStore(_region(ceph, ceph_bucket, credentials))
    with structlog.testing.capture_logs() as logs, pytest.raises(StoreError) as err:
        store.check_reachable()
    message = err.value.message
    assert message == (f"region s3home: s3://{ceph_bucket}/{PREFIX}: access denied (403 {code}) — check the "
                       f"credentials in regions.s3home.credentials_file ({credentials})")
    assert secret not in message and secret not in repr(logs)
    assert store.metrics.retries.total() == 0  # not retried

    # The same through the CLI, a real process: a clear error, exit code 5, the secret nowhere.
    config = write_s3_config(tmp_path, {"src": tmp_path / "src"}, endpoint=ceph.endpoint, bucket=ceph_bucket,
                             credentials_file=credentials)
    result = run_cli(config, "describe-backups", timeout=120)
    assert result.returncode == 5
    assert result.error["Code"] == "StoreUnavailable"
    assert f"access denied (403 {code})" in result.error["Message"]
    assert secret not in result.stdout + result.stderr


def test_missing_bucket_is_a_clear_error(ceph: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket_name()
    credentials = _credentials(tmp_path, ceph)
    expected = (f"region s3home: bucket {bucket} does not exist at {ceph.endpoint} — create it or fix "
                "regions.s3home.bucket")
    with pytest.raises(StoreError) as err:
        S3ObjectStore(_region(ceph, bucket, credentials)).check_reachable()
    assert err.value.message == expected
    config = write_s3_config(tmp_path, {"src": tmp_path / "src"}, endpoint=ceph.endpoint, bucket=bucket,
                             credentials_file=credentials)
    with pytest.raises(StoreError) as err:  # the store is opened before any snapshot is taken
        Engine(load_config(config)).create_backup(BackupRequest("fs-src"))
    assert err.value.message == expected


def test_sweep_aborts_only_stale_uploads(ceph: S3Server, ceph_bucket: str, tmp_path: Path) -> None:
    client = ceph.client()
    client.create_multipart_upload(Bucket=ceph_bucket, Key=PREFIX + "data/aa/interrupted")
    store = S3ObjectStore(_region(ceph, ceph_bucket, _credentials(tmp_path, ceph)))
    store.check_reachable()  # sweeps uploads older than a day: this one is young
    assert remaining_uploads(client, ceph_bucket) == [PREFIX + "data/aa/interrupted"]
    time.sleep(1.1)  # upload dates have a resolution of a second
    assert store.sweep_stale_uploads(older_than_seconds=1) == 1
    assert remaining_uploads(client, ceph_bucket) == []


def test_backup_and_check_through_a_flaky_network(
    ceph: S3Server, ceph_bucket: str, xfs_dir: Path, tmp_path: Path, small_multipart: None
) -> None:
    """~10% of requests answered 503/500, ~3% of connections reset, ~10% delayed: nothing fails, nothing is
    corrupt, and the retries that hid the faults are counted."""
    _populate(xfs_dir, big_files=2, seed=2)
    plan = FaultPlan(error_rate=0.10, reset_rate=0.03, delay_rate=0.10, max_delay=0.3, seed=4)
    with FaultProxy(ceph.endpoint, plan) as proxy, structlog.testing.capture_logs() as logs:
        config = write_s3_config(tmp_path, {"src": xfs_dir}, endpoint=proxy.url, bucket=ceph_bucket,
                                 credentials_file=_credentials(tmp_path, ceph))
        engine = Engine(load_config(config))
        record = engine.create_backup(BackupRequest("fs-src"))
        assert record.lifecycle == Lifecycle.AVAILABLE
        check = engine.check(read_data=True)
        restored = _restore(engine, record.backup_id, tmp_path)
    assert check.errors == []
    assert_trees_identical(xfs_dir, restored)
    metrics = engine.store().objects.metrics
    assert proxy.faults >= 5, proxy.stats
    assert metrics.retries.total() > 0
    assert metrics.errors.total() == 0
    retry_events = [e for e in logs if e["event"] == "object_store_retry"]
    assert len(retry_events) == metrics.retries.total()
    assert ceph.secret_key not in repr(logs)
    assert remaining_uploads(ceph.client(), ceph_bucket) == []
    assert any("-" in etag for etag in _pack_etags(ceph, ceph_bucket))
