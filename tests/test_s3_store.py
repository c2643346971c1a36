"""The object-store contract, run over the local backend and over S3 (moto on 127.0.0.1), plus
what only S3 has: multipart uploads and their abort, the stale-upload sweep, retries and their
counting, and the messages for a missing bucket or a dead endpoint.

moto checks no signatures; credential errors are tested against Ceph in test_s3_integration.py.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3kit import (
    FaultPlan,
    FaultProxy,
    S3Server,
    conditional_put_rule,
    moto_bucket,
    moto_server,
    new_bucket_name,
    part_number_rule,
    remaining_uploads,
    write_credentials_file,
)

from zfsbackd.config import S3Region
from zfsbackd.errors import StoreError
from zfsbackd.objectstore import quickack, retry
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.factory import open_object_store
from zfsbackd.objectstore.local import LocalObjectStore
from zfsbackd.objectstore.s3 import S3ObjectStore, default_checksum_mode

# The fixtures imported from s3kit are requested by name; listing them here tells linters they are used.
__all__ = ["moto_bucket", "moto_server"]

MiB = 1024 * 1024
PREFIX = "tenant/zfsbackd/"


def s3_region(server: S3Server, bucket: str, tmp_path: Path, **overrides: object) -> S3Region:
    credentials = tmp_path / "credentials.ini"
    if not credentials.exists():
        write_credentials_file(credentials, server.access_key, server.secret_key)
    fields: dict[str, object] = {
        "name": "test-region",
        "bucket": bucket,
        "endpoint_url": server.endpoint,
        "prefix": PREFIX,
        "credentials_file": credentials,
        "addressing_style": "path",
        **overrides,
    }
    return S3Region(**fields)  # type: ignore[arg-type]


def s3_store(server: S3Server, bucket: str, tmp_path: Path, **overrides: object) -> S3ObjectStore:
    """A store with a 6 MiB multipart threshold and 5 MiB parts, so a 12 MiB object has 3 parts."""
    return S3ObjectStore(s3_region(server, bucket, tmp_path, **overrides), multipart_threshold=6 * MiB,
                         part_size=5 * MiB)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "store", create=True)
        return
    server: S3Server = request.getfixturevalue("moto_server")
    yield s3_store(server, request.getfixturevalue("moto_bucket"), tmp_path)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that exhaust retries on purpose need not wait for real backoff."""
    monkeypatch.setattr(retry, "RETRY_WAIT_BASE", 0.01)
    monkeypatch.setattr(retry, "RETRY_WAIT_MAX", 0.05)


# ----------------------------------------------------------------------------- the contract


def test_put_if_absent_creates_once_and_never_overwrites(store: ObjectStore) -> None:
    assert store.put_if_absent("config", b"first") is True
    assert store.put_if_absent("config", b"second") is False
    assert store.get("config") == b"first"
    if isinstance(store, S3ObjectStore):
        assert store.conditional_put_supported is True  # moto honours If-None-Match: *
        assert list(store.list("locks/")) == []  # the probe cleaned up after itself


def test_put_replaces(store: ObjectStore) -> None:
    store.put("backups/backup-1", b"CREATING")
    store.put("backups/backup-1", memoryview(b"AVAILABLE"))
    assert store.get("backups/backup-1") == b"AVAILABLE"


def test_missing_objects(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.get("index/nothing")
    with pytest.raises(FileNotFoundError):
        store.get_range("index/nothing", 0, 10)
    assert store.head("index/nothing") is None
    store.delete("index/nothing")  # absent keys are not an error


def test_get_range_and_head(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    before = time.time()
    store.put_if_absent("data/00/pack", data)
    assert store.get_range("data/00/pack", 0, 10) == data[:10]
    assert store.get_range("data/00/pack", 1000, 300) == data[1000:1300]
    assert store.get_range("data/00/pack", len(data) - 5, 100) == data[-5:]  # a range past the end is cut
    assert store.get_range("data/00/pack", len(data) + 10, 5) == b""
    assert store.get_range("data/00/pack", -8, 8) == data[-8:]  # negative offsets count from the end
    assert store.get_range("data/00/pack", -8, 3) == data[-8:-5]
    assert store.get_range("data/00/pack", -(len(data) + 50), 4) == data[:4]  # longer than the object
    info = store.head("data/00/pack")
    assert info is not None and info.key == "data/00/pack" and info.size == len(data)
    assert before - 5 <= info.mtime <= time.time() + 5


def test_list_by_prefix_and_delete(store: ObjectStore) -> None:
    for key in ("index/a1", "index/a2", "indexes/b", "backups/c", "data/ab/d"):
        store.put(key, key.encode())
    assert sorted(i.key for i in store.list("index/")) == ["index/a1", "index/a2"]
    assert sorted(i.key for i in store.list("index")) == ["index/a1", "index/a2", "indexes/b"]
    assert sorted(i.key for i in store.list("")) == ["backups/c", "data/ab/d", "index/a1", "index/a2", "indexes/b"]
    assert {i.key: i.size for i in store.list("data/")} == {"data/ab/d": 9}
    store.delete("index/a1")
    store.delete("index/a1")
    assert [i.key for i in store.list("index/")] == ["index/a2"]


def test_list_follows_pages_past_1000_keys(store: ObjectStore) -> None:
    keys = [f"backups/backup-{i:05d}" for i in range(1010)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: store.put(k, b"r"), keys))
    store.put("other/x", b"x")
    listed = [i.key for i in store.list("backups/")]
    assert sorted(listed) == keys
    if isinstance(store, S3ObjectStore):
        assert store.metrics.requests["list"] >= 2  # ListObjectsV2 returns at most 1000 keys a page


def test_large_objects_go_up_whole(store: ObjectStore, moto_server: S3Server) -> None:
    """12 MiB: above the 6 MiB threshold, so S3 uses three parts of ≤5 MiB; the result is one whole object."""
    data = random.Random(7).randbytes(12 * MiB)
    assert store.put_if_absent("data/7f/big", data) is True
    assert store.put_if_absent("data/7f/big", b"other") is False
    assert store.get("data/7f/big") == data
    assert store.get_range("data/7f/big", -100, 100) == data[-100:]
    replacement = data[::-1]
    store.put("data/7f/big", memoryview(replacement))
    assert store.get("data/7f/big") == replacement
    if isinstance(store, S3ObjectStore):
        assert store.metrics.requests["multipart"] >= 4  # create and complete, twice
        head = moto_server.client().head_object(Bucket=store.bucket, Key=PREFIX + "data/7f/big")
        assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag names its part count
        assert remaining_uploads(moto_server.client(), store.bucket) == []


def test_invalid_keys_are_refused(store: ObjectStore) -> None:
    for key in ("/abs", "a/../b"):
        with pytest.raises(ValueError):
            store.put(key, b"x")


# ----------------------------------------------------------------------------- S3 only


def test_factory_opens_s3_regions(moto_server: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    region = s3_region(moto_server, moto_bucket, tmp_path)
    store = open_object_store(region)
    assert isinstance(store, S3ObjectStore)
    assert store.location == f"s3://{moto_bucket}/{PREFIX} at {moto_server.endpoint} (region test-region)"
    store.check_reachable()


def test_checksum_mode_defaults_by_endpoint(moto_server: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    assert default_checksum_mode(S3Region("r", "b", endpoint_url="http://127.0.0.1:7480")) == "when_required"
    assert default_checksum_mode(S3Region("r", "b")) is None  # AWS: botocore's default
    assert default_checksum_mode(S3Region("r", "b", endpoint_url="https://s3.eu-west-1.amazonaws.com")) is None
    assert default_checksum_mode(S3Region("r", "b", endpoint_url="http://x", checksum_mode="when_supported")) == (
        "when_supported"
    )
    store = s3_store(moto_server, moto_bucket, tmp_path)
    assert store._client.meta.config.request_checksum_calculation == "when_required"
    assert store._client.meta.config.response_checksum_validation == "when_required"


def test_storage_class_applies_to_packs_only(moto_server: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    store = s3_store(moto_server, moto_bucket, tmp_path, storage_class="STANDARD_IA")
    store.put_if_absent("data/aa/small", b"pack")
    store.put_if_absent("data/aa/large", random.Random(1).randbytes(7 * MiB))
    store.put_if_absent("index/i", b"index")
    client = moto_server.client()

    def storage_class(key: str) -> str:
        return client.head_object(Bucket=moto_bucket, Key=PREFIX + key).get("StorageClass", "STANDARD")

    assert storage_class("data/aa/small") == "STANDARD_IA"
    assert storage_class("data/aa/large") == "STANDARD_IA"
    assert storage_class("index/i") == "STANDARD"


@pytest.mark.parametrize("server_kind", ["answers 501", "overwrites silently"])
def test_create_only_falls_back_to_head_then_put(
    server_kind: str, moto_server: S3Server, moto_bucket: str, tmp_path: Path
) -> None:
    """A server without If-None-Match support (Swift answers 501; some ignore the header) is detected by the
    probe, and put_if_absent still never overwrites."""
    if server_kind == "answers 501":
        plan = FaultPlan(error_rate=0, reset_rate=0, delay_rate=0, rule=conditional_put_rule)
    else:  # moto checks no signatures, so the proxy may drop the header
        plan = FaultPlan(error_rate=0, reset_rate=0, delay_rate=0, drop_headers=frozenset({"if-none-match"}))
    with FaultProxy(moto_server.endpoint, plan) as proxy:
        store = s3_store(moto_server, moto_bucket, tmp_path, endpoint_url=proxy.url)
        assert store.put_if_absent("config", b"first") is True
        assert store.conditional_put_supported is False
        assert store.put_if_absent("config", b"second") is False
        assert store.get("config") == b"first"
        assert list(store.list("locks/")) == []
    assert store.metrics.requests["head"] == 2  # one HEAD before each create
    assert store.metrics.errors.total() == 0


def test_a_failed_part_aborts_the_upload(
    moto_server: S3Server, moto_bucket: str, tmp_path: Path, fast_retries: None
) -> None:
    """Part 2 fails every time (500 through a proxy): the upload is aborted, nothing is left behind."""
    with FaultProxy(moto_server.endpoint, FaultPlan(error_rate=0, reset_rate=0, delay_rate=0,
                                                    rule=part_number_rule(2))) as proxy:
        store = S3ObjectStore(s3_region(moto_server, moto_bucket, tmp_path, endpoint_url=proxy.url),
                              multipart_threshold=6 * MiB, part_size=5 * MiB, max_attempts=3)
        with pytest.raises(StoreError) as err:
            store.put_if_absent("data/12/pack", random.Random(2).randbytes(12 * MiB))
    assert proxy.stats["rule_500"] == 3
    assert f"s3://{moto_bucket}/{PREFIX}data/12/pack" in err.value.message
    assert "failed after 3 attempts (500 InternalError)" in err.value.message
    assert remaining_uploads(moto_server.client(), moto_bucket) == []
    assert store.head("data/12/pack") is None
    assert store.metrics.retries["put"] == 2 and store.metrics.errors["put"] == 1


def test_sweep_aborts_our_stale_uploads_only(moto_server: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    client = moto_server.client()
    client.create_multipart_upload(Bucket=moto_bucket, Key=PREFIX + "data/ab/abandoned")
    client.create_multipart_upload(Bucket=moto_bucket, Key="someone-else/upload")
    store = s3_store(moto_server, moto_bucket, tmp_path)
    # moto dates every upload 2010-11-10, so only the prefix decides here; Ceph tests the age limit.
    assert store.sweep_stale_uploads(older_than_seconds=0) == 1
    assert remaining_uploads(client, moto_bucket) == ["someone-else/upload"]
    client.create_multipart_upload(Bucket=moto_bucket, Key=PREFIX + "data/cd/abandoned")
    store.check_reachable()  # sweeps too
    assert remaining_uploads(client, moto_bucket) == ["someone-else/upload"]


def test_missing_bucket_is_a_clear_error(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket_name()
    store = s3_store(moto_server, bucket, tmp_path)
    expected = (f"region test-region: bucket {bucket} does not exist at {moto_server.endpoint} — create it or fix "
                "regions.test-region.bucket")
    with pytest.raises(StoreError) as err:
        store.check_reachable()
    assert err.value.message == expected
    with pytest.raises(StoreError) as err:
        store.get("config")
    assert err.value.message == expected
    assert store.metrics.retries.total() == 0  # not retried: fails fast


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path, fast_retries: None) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = S3ObjectStore(s3_region(S3Server(endpoint, "a", "b"), "bucket", tmp_path), max_attempts=3)
    with pytest.raises(StoreError) as err:
        store.check_reachable()
    message = err.value.message
    assert message.startswith(f"region test-region: s3://bucket/tenant/zfsbackd/: cannot connect to {endpoint} "
                              "after 3 attempts")
    assert "check regions.test-region.endpoint_url" in message
    assert store.metrics.retries["head"] == 2 and store.metrics.errors["head"] == 1


def test_bad_credentials_file_is_a_clear_error(moto_server: S3Server, tmp_path: Path) -> None:
    secret = "s3cr3t-never-shown-0123456789"
    path = tmp_path / "other-profile.ini"
    path.write_text(f"[backup]\naws_access_key_id = AKID\naws_secret_access_key = {secret}\n")
    with pytest.raises(StoreError) as err:
        s3_store(moto_server, "bucket", tmp_path, credentials_file=path)
    assert f"credentials_file {path} has no complete [default] profile" in err.value.message
    assert secret not in err.value.message
    with pytest.raises(StoreError, match="cannot read credentials_file"):
        s3_store(moto_server, "bucket", tmp_path, credentials_file=tmp_path / "absent.ini")


def test_retries_hide_a_flaky_server(
    moto_server: S3Server, moto_bucket: str, tmp_path: Path, fast_retries: None
) -> None:
    """20% errors, 6% resets and delays between client and moto: every operation still gives the right answer."""
    plan = FaultPlan(error_rate=0.20, reset_rate=0.06, delay_rate=0.1, max_delay=0.05, seed=11)
    with FaultProxy(moto_server.endpoint, plan) as proxy:
        store = s3_store(moto_server, moto_bucket, tmp_path, endpoint_url=proxy.url)
        blobs = {f"index/{i:03d}": random.Random(i).randbytes(1000 + i) for i in range(60)}
        with ThreadPoolExecutor(max_workers=4) as pool:
            created = list(pool.map(lambda kv: store.put_if_absent(*kv), blobs.items()))
        assert all(created) or store.metrics.retries["put"] > 0  # False only after a lost answer
        big = random.Random(99).randbytes(12 * MiB)
        store.put_if_absent("data/99/big", big)
        assert store.get("data/99/big") == big
        for key, value in blobs.items():
            assert store.get(key) == value
            assert store.get_range(key, -10, 10) == value[-10:]
        assert sorted(i.key for i in store.list("index/")) == sorted(blobs)
        for key in list(blobs)[:20]:
            store.delete(key)
        assert len(list(store.list("index/"))) == 40
    assert proxy.faults > 10
    assert store.metrics.retries.total() > 0
    assert store.metrics.errors.total() == 0
    assert remaining_uploads(moto_server.client(), moto_bucket) == []


def test_exhausted_retries_name_the_key_and_count(
    moto_server: S3Server, moto_bucket: str, tmp_path: Path, fast_retries: None
) -> None:
    plan = FaultPlan(error_rate=1.0, reset_rate=0, delay_rate=0, max_faults_per_request=99)
    with FaultProxy(moto_server.endpoint, plan) as proxy:
        store = S3ObjectStore(s3_region(moto_server, moto_bucket, tmp_path, endpoint_url=proxy.url), max_attempts=4)
        with pytest.raises(StoreError) as err:
            store.head("backups/backup-0123456789abcdef0")
    assert err.value.message.startswith(
        f"region test-region: s3://{moto_bucket}/{PREFIX}backups/backup-0123456789abcdef0: head failed after 4 attempts"
    )
    assert "the server is overloaded or failing" in err.value.message
    assert proxy.stats["requests"] == 4
    assert store.metrics.requests["head"] == 4
    assert store.metrics.retries["head"] == 3
    assert store.metrics.errors["head"] == 1


def test_quick_acks_leave_an_unknown_client_alone() -> None:
    """A client whose http session botocore no longer keeps where expected is left as it is (slower, not broken)."""

    class Endpoint:
        http_session = object()

    class Client:
        _endpoint = Endpoint()

    assert quickack.install(Client()) is False
    assert quickack.installed(Client()) is False
