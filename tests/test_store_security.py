"""The store ``config`` object and store creation (issue 9, hardening).

* the config is authenticated with the key file: it cannot be downgraded to
  unencrypted, changed, extended, or swapped for another store's;
* the chunker seed is secret (wrapped with the keys) in an encrypted store;
* format 1 is refused, a corrupt config is an IntegrityError (exit 6);
* stores are created only deliberately (``zfsbackd store init`` or
  ``create_if_missing: true``), never in a missing directory, never over
  foreign objects, and never in place of a store this host used before;
* a full file system is a classified StoreError that keeps earlier backups;
* a killed writer's leftovers are listed and removed by ``stale_writes``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from enginekit import REPO, run_cli, write_config
from fsfixtures import make_loop_fs
from s3kit import S3Server, moto_bucket, moto_server, remaining_uploads, write_credentials_file, write_s3_config

from zfsbackd.config import LocalRegion, S3Region, load_config
from zfsbackd.engine.engine import Engine
from zfsbackd.errors import (
    EXIT_BAD_REQUEST,
    EXIT_INTEGRITY,
    EXIT_NOT_FOUND,
    EXIT_STORE,
    ConfigError,
    IntegrityError,
    KeyFileError,
    StoreError,
    StoreNotInitialized,
)
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.objectstore.factory import open_object_store
from zfsbackd.objectstore.local import LocalObjectStore
from zfsbackd.objectstore.s3 import S3ObjectStore
from zfsbackd.store.crypto import generate_key_file, load_key_file
from zfsbackd.store.repository import CONFIG_KEY, STORE_FORMAT, Store

# The fixtures imported from s3kit are requested by name; listing them here tells linters they are used.
__all__ = ["moto_bucket", "moto_server"]

MiB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers


def _key(tmp_path: Path, name: str = "store.key") -> bytes:
    path = tmp_path / name
    if not path.exists():
        generate_key_file(path)
    return load_key_file(path)


def _objects(root: Path, region: str = "local") -> ObjectStore:
    return open_object_store(LocalRegion(region, root))


def _new_store(tmp_path: Path, *, encrypted: bool = True, name: str = "store") -> tuple[Path, bytes | None, Store]:
    root = tmp_path / name
    root.mkdir()
    material = _key(tmp_path) if encrypted else None
    store = Store.open(_objects(root), region="local", key_material=material, create=True)
    assert store.created
    return root, material, store


def _read_config(root: Path) -> dict[str, Any]:
    return json.loads((root / CONFIG_KEY).read_bytes())


def _write_config(root: Path, cfg: dict[str, Any] | bytes) -> None:
    (root / CONFIG_KEY).write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())


def _open(root: Path, material: bytes | None, **kwargs: Any) -> Store:
    return Store.open(_objects(root), region="local", key_material=material, **kwargs)


def _edit_config(config: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(config.read_text())
    edit(data)
    config.write_text(yaml.safe_dump(data))
    return config


def _no_create_if_missing(data: dict[str, Any]) -> None:
    for region in data["regions"].values():
        region.pop("create_if_missing", None)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the config object


def test_encrypted_config_shows_no_secret_and_round_trips(tmp_path: Path) -> None:
    root, material, store = _new_store(tmp_path)
    cfg = _read_config(root)
    assert cfg["format"] == STORE_FORMAT == 2
    assert cfg["encryption"] == "aes-256-gcm"
    assert set(cfg["chunker"]) == {"min_size", "avg_size", "max_size"}  # no seed
    assert set(cfg["keys"]) == {"check", "wrapped"}
    text = (root / CONFIG_KEY).read_text()
    assert store.keys.data_key is not None
    for secret in (store.keys.id_key.hex(), store.keys.data_key.hex(), str(store.chunker.seed)):
        assert secret not in text
    assert store.chunker.seed == store.keys.chunker_seed != 0

    again = _open(root, material)
    assert not again.created
    assert (again.store_id, again.keys, again.chunker) == (store.store_id, store.keys, store.chunker)


def test_unencrypted_config_keeps_its_seed_visible(tmp_path: Path) -> None:
    """Nothing is secret without a key file; the seed is stored in plain text there (documented)."""
    root, _, store = _new_store(tmp_path, encrypted=False)
    cfg = _read_config(root)
    assert cfg["encryption"] == "none"
    assert cfg["keys"] == {"id_key": store.keys.id_key.hex(), "chunker_seed": store.chunker.seed}
    assert _open(root, None).chunker == store.chunker


def test_downgrade_to_an_unencrypted_config_is_refused(tmp_path: Path) -> None:
    """Whoever can write the bucket replaces ``config`` with an unencrypted one: a configured key refuses it."""
    root, material, _ = _new_store(tmp_path)
    cfg = _read_config(root)
    forged = {
        **{k: v for k, v in cfg.items() if k != "keys"},
        "encryption": "none",
        "keys": {"id_key": os.urandom(32).hex(), "chunker_seed": 12345},
    }
    _write_config(root, forged)
    with pytest.raises(IntegrityError) as err:
        _open(root, material)
    message = err.value.message
    assert "unencrypted" in message and "encryption.key_file is configured" in message
    assert "encryption: {mode: none}" in message and "restore the `config` object" in message


def test_an_unencrypted_store_never_opens_with_a_key_file(tmp_path: Path) -> None:
    root, _, _ = _new_store(tmp_path, encrypted=False)
    with pytest.raises(IntegrityError, match="is unencrypted"):
        _open(root, _key(tmp_path))


def test_an_encrypted_store_never_opens_without_a_key_file(tmp_path: Path) -> None:
    root, _, _ = _new_store(tmp_path)
    with pytest.raises(KeyFileError, match=r"is encrypted but the configuration has `encryption: \{mode: none\}`"):
        _open(root, None)


def _flip_wrapped(cfg: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(cfg["keys"]["wrapped"]))
    raw[-1] ^= 1
    cfg["keys"]["wrapped"] = base64.b64encode(bytes(raw)).decode()


TAMPERING: dict[str, Callable[[dict[str, Any]], None]] = {
    "smaller chunks": lambda c: c["chunker"].update(avg_size=512 * 1024),
    "another creation time": lambda c: c.update(created="2020-01-01T00:00:00Z"),
    "another store id": lambda c: c.update(store_id=os.urandom(16).hex()),
    "an added field": lambda c: c.update(note="harmless?"),
    "a flipped bit in the sealed keys": _flip_wrapped,
}


@pytest.mark.parametrize("change", TAMPERING, ids=list(TAMPERING))
def test_every_config_field_is_authenticated(change: str, tmp_path: Path) -> None:
    root, material, _ = _new_store(tmp_path)
    cfg = _read_config(root)
    TAMPERING[change](cfg)
    _write_config(root, cfg)
    with pytest.raises(IntegrityError, match="failed authentication with the key file"):
        _open(root, material)


CORRUPTION: dict[str, Callable[[bytes], bytes]] = {
    "garbage bytes": lambda raw: os.urandom(300),
    "truncated JSON": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "a JSON list": lambda raw: b"[1, 2]",
    "no format": lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "format"}).encode(),
    "a missing field": lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "created"}).encode(),
    "a malformed store id": lambda raw: json.dumps({**json.loads(raw), "store_id": "../../x"}).encode(),
    "an unknown mode": lambda raw: json.dumps({**json.loads(raw), "encryption": "rot13"}).encode(),
    "keys with an extra field": lambda raw: json.dumps(
        {**json.loads(raw), "keys": {**json.loads(raw)["keys"], "id_key": "00" * 32}}
    ).encode(),
}


@pytest.mark.parametrize("damage", CORRUPTION, ids=list(CORRUPTION))
def test_a_corrupt_config_is_an_integrity_error(damage: str, tmp_path: Path) -> None:
    root, material, _ = _new_store(tmp_path)
    _write_config(root, CORRUPTION[damage]((root / CONFIG_KEY).read_bytes()))
    with pytest.raises(IntegrityError) as err:
        _open(root, material)
    assert "the store in region local" in err.value.message


def test_an_unencrypted_config_with_bad_chunker_sizes_is_refused(tmp_path: Path) -> None:
    """Unencrypted configs cannot be authenticated, but their values are still checked."""
    root, _, _ = _new_store(tmp_path, encrypted=False)
    cfg = _read_config(root)
    cfg["chunker"] = {"min_size": 1, "avg_size": 0, "max_size": 2**40}
    _write_config(root, cfg)
    with pytest.raises(IntegrityError, match="`chunker` must hold"):
        _open(root, None)


def test_another_key_file_is_a_key_error_not_tampering(tmp_path: Path) -> None:
    root, _, store = _new_store(tmp_path)
    other = _key(tmp_path, "other.key")
    with pytest.raises(KeyFileError) as err:
        _open(root, other)
    assert f"(id {store.store_id}) was created with another key" in err.value.message


def test_format_1_and_future_formats_are_refused_clearly(tmp_path: Path) -> None:
    root, material, _ = _new_store(tmp_path)
    # What the pre-release format 1 wrote: the seed in the clear, keys wrapped without authenticating the rest.
    _write_config(root, {
        "format": 1, "store_id": "ab" * 16, "created": "2024-01-01T00:00:00Z",
        "chunker": {"min_size": 262144, "avg_size": 1048576, "max_size": 4194304, "seed": 42},
        "keys": {"mode": "aes-256-gcm", "wrapped": "AAAA"},
    })
    with pytest.raises(StoreError) as err:
        _open(root, material)
    assert "has store format 1" in err.value.message
    assert "reads format 2 only" in err.value.message and "zfsbackd store init --region local" in err.value.message
    _write_config(root, {"format": 3})
    with pytest.raises(StoreError, match=r"has store format 3, newer than this zfsbackd reads.*upgrade zfsbackd"):
        _open(root, material)


def test_an_unreachable_store_stays_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot read the store in region local"):
        _open(tmp_path / "file" / "store", None)


def test_a_config_swapped_in_from_another_store_is_refused(tmp_path: Path) -> None:
    """Both stores use the same key file, so only the remembered store id can tell them apart."""
    root_a, material, a = _new_store(tmp_path, name="a")
    root_b = tmp_path / "b"
    root_b.mkdir()
    b = Store.open(_objects(root_b), region="local", key_material=material, create=True)
    _write_config(root_a, (root_b / CONFIG_KEY).read_bytes())
    with pytest.raises(IntegrityError) as err:
        _open(root_a, material, used_before=a.store_id)
    assert f"holds another store (id {b.store_id})" in err.value.message
    assert f"this host used there before (id {a.store_id})" in err.value.message
    assert "regions.local.path" in err.value.message and "zfsbackd store init --region local" in err.value.message


# ----------------------------------------------------------------------------- the CLI and the engine


def test_downgraded_config_stops_backups_before_anything_is_written(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "secret.txt").write_text("not for the attacker\n")
    config = write_config(tmp_path, {"src": xfs_dir})
    assert run_cli(config, "create-backup", "--file-system-id", "fs-src").returncode == 0
    store_dir = tmp_path / "store"
    cfg = _read_config(store_dir)
    _write_config(store_dir, {
        **{k: v for k, v in cfg.items() if k != "keys"},
        "encryption": "none",
        "keys": {"id_key": os.urandom(32).hex(), "chunker_seed": 7},
    })
    before = _files(store_dir)

    result = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--no-daemon")

    assert result.returncode == EXIT_INTEGRITY, result.stderr
    assert result.error["Code"] == "IntegrityError" and "unencrypted" in result.error["Message"]
    assert _files(store_dir) == before
    assert not any(b"not for the attacker" in p.read_bytes() for p in before)


def test_corrupt_config_exits_6_through_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    assert run_cli(config, "store", "init").returncode == 0
    _write_config(tmp_path / "store", b'{"format": 2, "store_id": "ab')  # truncated
    result = run_cli(config, "describe-backups", "--no-daemon")
    assert result.returncode == EXIT_INTEGRITY and result.error["Code"] == "IntegrityError"
    assert "not valid JSON" in result.error["Message"]


def test_a_missing_store_is_not_created_without_create_if_missing(tmp_path: Path) -> None:
    config = _edit_config(write_config(tmp_path, {}), _no_create_if_missing)
    store_dir = tmp_path / "store"  # exists and is empty, like an unmounted mount point
    assert list(store_dir.iterdir()) == []

    with pytest.raises(StoreNotInitialized):
        Engine(load_config(config)).store()
    result = run_cli(config, "describe-backups", "--no-daemon")

    assert result.returncode == EXIT_NOT_FOUND == StoreNotInitialized.exit_code
    assert result.error["Code"] == "StoreNotInitialized"
    message = result.error["Message"]
    assert "regions.local.path" in message and str(store_dir) in message
    assert "zfsbackd store init --region local" in message and "create_if_missing: true" in message
    assert list(store_dir.iterdir()) == []


def test_create_if_missing_never_creates_the_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    (tmp_path / "store").rmdir()
    with pytest.raises(StoreNotInitialized) as err:
        Engine(load_config(config)).store()
    assert "regions.local.path" in err.value.message and "does not exist" in err.value.message
    assert "zfsbackd store init --region local" in err.value.message
    assert not (tmp_path / "store").exists()


def test_create_if_missing_creates_a_store_in_an_empty_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    store = Engine(load_config(config)).store()
    assert store.created and (tmp_path / "store" / CONFIG_KEY).exists()
    remembered = json.loads((tmp_path / "state" / "stores" / "local.json").read_text())
    assert remembered["StoreId"] == store.store_id and remembered["Region"] == "local"


def test_store_init_creates_the_store_and_is_idempotent(tmp_path: Path) -> None:
    config = _edit_config(write_config(tmp_path, {}), _no_create_if_missing)
    store_dir = tmp_path / "deep" / "store"
    _edit_config(config, lambda d: d["regions"]["local"].update(path=str(store_dir)))

    first = run_cli(config, "store", "init")
    assert first.returncode == 0, first.stderr
    created = first.json["Store"]
    assert created["Region"] == "local" and created["Created"] is True
    assert created["Location"] == f"local directory {store_dir}"
    assert created["StoreId"] == _read_config(store_dir)["store_id"]

    second = run_cli(config, "store", "init")
    assert second.returncode == 0 and second.json["Store"] == {**created, "Created": False}
    assert run_cli(config, "describe-backups", "--no-daemon").json["Backups"] == []


def test_store_init_of_another_region_shares_the_home_id_key(tmp_path: Path) -> None:
    config = _edit_config(write_config(tmp_path, {}, extra_regions={"eu": tmp_path / "eu"}), _no_create_if_missing)
    refused = run_cli(config, "describe-backups", "--region", "eu", "--no-daemon")
    assert refused.returncode == EXIT_NOT_FOUND  # the home region has no store either
    assert run_cli(config, "store", "init").returncode == 0
    eu_missing = run_cli(config, "describe-backups", "--region", "eu", "--no-daemon")
    assert eu_missing.returncode == EXIT_NOT_FOUND and "regions.eu.path" in eu_missing.error["Message"]

    init = run_cli(config, "store", "init", "--region", "eu")

    assert init.returncode == 0 and init.json["Store"]["Created"] is True and init.json["Store"]["Region"] == "eu"
    engine = Engine(load_config(config))
    assert engine.store("eu").keys.id_key == engine.store().keys.id_key
    assert engine.store("eu").keys.data_key != engine.store().keys.data_key


def test_a_store_used_before_that_is_gone_is_refused_even_with_create_if_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    store_dir = tmp_path / "store"
    old = Engine(load_config(config)).store()
    # The NAS is unmounted: the mount point is an empty directory again.
    store_dir.rename(tmp_path / "nas-contents")
    store_dir.mkdir()

    result = run_cli(config, "describe-backups", "--no-daemon")

    assert result.returncode == EXIT_STORE and result.error["Code"] == "StoreUnavailable"
    message = result.error["Message"]
    assert f"the store in region local (id {old.store_id}) that this host used before is gone" in message
    assert "is the file system mounted" in message.lower() and "regions.local.path" in message
    assert list(store_dir.iterdir()) == []
    # Deliberately replacing it is possible, and is remembered.
    init = run_cli(config, "store", "init")
    assert init.returncode == 0 and init.json["Store"]["Created"] is True
    assert init.json["Store"]["StoreId"] != old.store_id
    assert Engine(load_config(config)).store().store_id == init.json["Store"]["StoreId"]


def test_a_replaced_store_is_refused_until_accepted_with_store_init(tmp_path: Path) -> None:
    config = write_config(tmp_path, {}, extra_regions={"other": tmp_path / "other"})
    engine = Engine(load_config(config))
    home, other = engine.store(), engine.store("other")
    _write_config(tmp_path / "store", (tmp_path / "other" / CONFIG_KEY).read_bytes())

    result = run_cli(config, "describe-backups", "--no-daemon")

    assert result.returncode == EXIT_INTEGRITY
    assert f"holds another store (id {other.store_id})" in result.error["Message"]
    assert f"(id {home.store_id})" in result.error["Message"]
    accepted = run_cli(config, "store", "init")
    assert accepted.returncode == 0 and accepted.json["Store"]["StoreId"] == other.store_id
    assert accepted.json["Store"]["Created"] is False


@pytest.mark.parametrize(("stray", "error"), [("notes.txt", StoreError), ("data/ab/pack", IntegrityError)])
def test_a_store_is_never_created_over_existing_objects(stray: str, error: type[Exception], tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    path = tmp_path / "store" / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("someone's data")
    with pytest.raises(error, match=r"holds objects \(.*\) but no `config` object"):
        Engine(load_config(config)).store()
    assert not (tmp_path / "store" / CONFIG_KEY).exists()


def test_a_store_directory_emptied_while_open_receives_nothing(tmp_path: Path) -> None:
    """The file system is unmounted under a running daemon: its writes must not land on the mount point."""
    root, _, store = _new_store(tmp_path)
    (root / CONFIG_KEY).rename(tmp_path / "config.moved")
    with pytest.raises(StoreError, match=r"no longer holds the store .* is its file system still mounted"):
        store.objects.put_if_absent("data/ab/" + "ab" * 32, b"pack bytes")
    assert not (root / "data").exists()


def test_create_if_missing_is_validated(tmp_path: Path) -> None:
    config = _edit_config(write_config(tmp_path, {}), lambda d: d["regions"]["local"].update(create_if_missing="yes"))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "regions.local.create_if_missing: expected true or false" in err.value.errors[0]
    assert run_cli(config, "config", "validate").returncode == EXIT_BAD_REQUEST


def test_shipped_configs_do_not_create_stores_implicitly() -> None:
    for name in ("zfsbackd.yaml", "zfsbackd.example.yaml"):
        config = load_config(REPO / "config" / name)
        assert not any(region.create_if_missing for region in config.regions.values()), name
    assert "store init" in (REPO / "scripts" / "demo.sh").read_text()


# ----------------------------------------------------------------------------- S3 (moto)


def test_s3_store_is_created_only_deliberately(moto_server: S3Server, moto_bucket: str, tmp_path: Path) -> None:
    credentials = write_credentials_file(tmp_path / "s3.ini", moto_server.access_key, moto_server.secret_key)
    config = write_s3_config(tmp_path, {"src": tmp_path / "src"}, endpoint=moto_server.endpoint, bucket=moto_bucket,
                             credentials_file=credentials)
    _edit_config(config, _no_create_if_missing)
    with pytest.raises(StoreNotInitialized) as err:
        Engine(load_config(config)).store()
    assert "regions.s3home.bucket and regions.s3home.prefix" in err.value.message
    assert "zfsbackd store init --region s3home" in err.value.message
    assert remaining_objects(moto_server, moto_bucket) == []

    created = Engine(load_config(config)).init_store()
    assert created.created
    assert remaining_objects(moto_server, moto_bucket) == ["zfsbackd/config"]
    again = Engine(load_config(config)).store()
    assert not again.created and again.store_id == created.store_id and again.keys == created.keys


def remaining_objects(server: S3Server, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


# ----------------------------------------------------------------------------- interrupted writes


def test_local_stale_writes_lists_and_removes_a_killed_writers_temp_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    objects = LocalObjectStore(root, create=True)
    objects.put_if_absent("config", b"{}")
    # A writer killed after writing its pack, before linking it into place (fsync never returns).
    code = (
        "import os, sys, time\n"
        "from zfsbackd.objectstore.local import LocalObjectStore\n"
        "os.fsync = lambda fd: time.sleep(600)\n"
        "LocalObjectStore(sys.argv[1]).put_if_absent('data/ab/' + 'ab' * 32, b'x' * (3 * 1024 * 1024))\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(root)], env={**os.environ, "PYTHONPATH": str(REPO)})

    def written() -> bool:
        return any(p.stat().st_size == 3 * MiB for p in root.glob("data/ab/.tmp-*"))

    try:
        deadline = time.monotonic() + 60
        while not written():
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never wrote its temp file"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    (leftover,) = (root / "data" / "ab").glob(".tmp-*")
    fresh = root / "data" / "cd" / ".tmp-fresh"
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(b"a live writer's")
    hour_ago = time.time() - 3600
    os.utime(leftover, (hour_ago, hour_ago))
    assert [info.key for info in objects.list("data/")] == []  # never listed as objects

    (stale,) = objects.stale_writes(time.time() - 60)

    assert stale.key == f"data/ab/{leftover.name}" and stale.size == 3 * MiB and stale.mtime == pytest.approx(hour_ago)
    assert objects.stale_writes(hour_ago - 1) == []
    assert objects.remove_stale_writes(time.time() - 60) == 1
    assert not leftover.exists() and fresh.exists()
    assert objects.stale_writes(time.time() - 60) == []


def test_s3_stale_writes_are_incomplete_multipart_uploads(
    moto_server: S3Server, moto_bucket: str, tmp_path: Path
) -> None:
    client = moto_server.client()
    credentials = write_credentials_file(tmp_path / "s3.ini", moto_server.access_key, moto_server.secret_key)
    region = S3Region("r", moto_bucket, endpoint_url=moto_server.endpoint, prefix="p/", credentials_file=credentials,
                      addressing_style="path")
    objects = S3ObjectStore(region)
    upload = client.create_multipart_upload(Bucket=moto_bucket, Key="p/data/ab/abandoned")["UploadId"]
    client.upload_part(Bucket=moto_bucket, Key="p/data/ab/abandoned", UploadId=upload, PartNumber=1,
                       Body=b"x" * (5 * MiB))
    client.create_multipart_upload(Bucket=moto_bucket, Key="other/upload")
    # moto dates every upload 2010-11-10, so "older than now" lists it and "older than 2010" does not.
    (stale,) = objects.stale_writes(time.time())
    assert (stale.key, stale.size) == ("data/ab/abandoned", 5 * MiB)
    assert objects.stale_writes(datetime(2010, 1, 1, tzinfo=UTC).timestamp()) == []

    assert objects.remove_stale_writes(time.time()) == 1

    assert remaining_uploads(client, moto_bucket) == ["other/upload"]
    assert objects.stale_writes(time.time()) == []
    assert objects.sweep_stale_uploads(older_than_seconds=0) == 0  # the old API still works


# ----------------------------------------------------------------------------- a full file system


def test_a_full_file_system_is_a_store_error_and_keeps_earlier_backups(xfs_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop-mounted file systems need root")
    small = make_loop_fs("ext4", 24, tmp_path / "small")
    try:
        store_dir = small.mountpoint / "store"
        config = _edit_config(
            write_config(tmp_path, {"src": xfs_dir}), lambda d: d["regions"]["local"].update(path=str(store_dir))
        )
        _edit_config(config, _no_create_if_missing)
        assert run_cli(config, "store", "init").returncode == 0
        rng = random.Random(9)
        first_data = rng.randbytes(2 * MiB)
        (xfs_dir / "first.bin").write_bytes(first_data)
        first = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--no-daemon")
        assert first.returncode == 0, first.stderr
        (xfs_dir / "big.bin").write_bytes(rng.randbytes(64 * MiB))  # incompressible, far more than fits

        full = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--no-daemon")

        assert full.returncode == EXIT_STORE, full.stderr
        assert full.error["Code"] == "StoreUnavailable"
        message = full.error["Message"]
        assert str(store_dir) in message and "regions.local.path" in message
        assert "file system is full (ENOSPC)" in message and "free space" in message
        assert LocalObjectStore(store_dir).stale_writes(time.time() + 60) == []  # no temp file left behind
        engine = Engine(load_config(config))
        target = tmp_path / "restore"
        target.mkdir()
        restored = engine.restore_backup(first.json["Backup"]["BackupId"], target).path
        assert (restored / "first.bin").read_bytes() == first_data
    finally:
        small.cleanup()
