"""Tests for zfsbackd.config: good files load to the documented values, bad files name every problem."""

from __future__ import annotations

import datetime
import pickle
import textwrap
from pathlib import Path

import pytest

from zfsbackd import config as config_module
from zfsbackd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    CopyRule,
    DaemonConfig,
    EncryptionConfig,
    LocalRegion,
    S3Region,
    load_config,
    parse_config,
    resolve_config_path,
)
from zfsbackd.errors import ConfigError, FileSystemNotFound, InvalidRegion

REPO = Path(__file__).resolve().parent.parent

# A valid base: two regions and one file system. Bad-config tests append to it.
BASE = """\
home_region: local
regions:
  local: {type: local, path: /srv/store}
  eu-west-1: {type: s3, bucket: backups-eu}
encryption: {key_file: /etc/zfsbackd/store.key}
"""
NONE = "encryption: {mode: none}\n"
REGION = NONE + "regions:\n  r: "
ITEM = BASE + "file_systems:\n  - "


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "zfsbackd.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.errors


# --------------------------------------------------------------------------- good configs


def test_shipped_default_config_parses() -> None:
    config = load_config(REPO / "config" / "zfsbackd.yaml")
    assert config.state_dir == Path("/var/lib/zfsbackd")
    assert config.home_region == "local"
    assert config.region() == LocalRegion("local", Path("/var/lib/zfsbackd/store"))
    assert config.encryption == EncryptionConfig("aes-256-gcm", Path("/etc/zfsbackd/store.key"))
    fs = config.file_system("fs-demo")
    assert fs.source_path == Path("/srv/zfsbackd-demo")
    assert fs.source_zfs is None
    assert fs.daily_backup_start_time == datetime.time(2, 30)
    assert fs.automatic_backup_retention_days == 7
    assert [f.id for f in config.file_systems] == ["fs-demo"]


def test_shipped_example_config_parses_and_shows_every_key() -> None:
    config = load_config(REPO / "config" / "zfsbackd.example.yaml")
    assert set(config.regions) == {"local", "eu-west-1"}
    s3 = config.region("eu-west-1")
    assert isinstance(s3, S3Region)
    assert s3.bucket == "backups-eu"
    assert s3.prefix == "zfsbackd/"
    home = config.file_system("fs-home")
    assert home.source_zfs == "tank/home"
    assert home.recursive is True
    assert home.copy_to == (CopyRule("eu-west-1", copy_tags=True, retention_days=30),)
    assert config.file_system("fs-projects").source_path == Path("/srv/projects")
    # Every known key appears in the example at least once, so it documents them all.
    text = (REPO / "config" / "zfsbackd.example.yaml").read_text(encoding="utf-8")
    keys = (config_module._TOP_KEYS + config_module._S3_KEYS + config_module._LOCAL_KEYS
            + config_module._FILE_SYSTEM_KEYS + config_module._SOURCE_KEYS + config_module._COPY_RULE_KEYS
            + config_module._DAEMON_KEYS + config_module._COPIES_KEYS + config_module._GC_KEYS
            + config_module._ENCRYPTION_KEYS)
    missing = [key for key in keys if f"{key}:" not in text]
    assert missing == []


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "encryption: {mode: none}\n")
    assert config.state_dir == Path("/var/lib/zfsbackd")
    assert config.home_region == "local"
    assert dict(config.regions) == {"local": LocalRegion("local", Path("/var/lib/zfsbackd/store"))}
    assert config.encryption == EncryptionConfig("none", None)
    assert config.file_systems == ()
    assert config.daemon == DaemonConfig()
    assert config.daemon.metrics_listen == "127.0.0.1:9810"
    assert config.daemon.control_socket == Path("/run/zfsbackd/control.sock")
    assert config.daemon.max_parallel_backups == 2
    assert config.daemon.stop_timeout_seconds == 60
    assert config.copies.max_in_flight_per_region == 5
    assert config.garbage_collection.grace_period_seconds == 3600
    assert config.source == str(tmp_path / "zfsbackd.yaml")


def test_default_region_follows_state_dir(tmp_path: Path) -> None:
    config = load(tmp_path, "state_dir: /data/zb\nencryption: {mode: none}\n")
    assert config.region() == LocalRegion("local", Path("/data/zb/store"))


def test_file_system_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "file_systems:\n  - {id: fs-a, source: {zfs: tank}}\n")
    fs = config.file_system("fs-a")
    assert fs.source_zfs == "tank"
    assert fs.source_path is None
    assert fs.recursive is False
    assert fs.daily_backup_start_time == datetime.time(2, 30)
    assert fs.daily_backup_window_minutes == 30
    assert fs.automatic_backup_retention_days == 7
    assert fs.completion_window_minutes is None
    assert dict(fs.tags) == {}
    assert fs.copy_tags_to_backups is False
    assert fs.copy_to == ()
    assert fs.allow_copy_snapshots is False
    assert fs.pre_snapshot is None
    assert fs.post_snapshot is None
    assert fs.hook_timeout_seconds == 300
    assert fs.source_description == "zfs tank"


def test_full_file_system_and_regions(tmp_path: Path) -> None:
    config = load(tmp_path, BASE.replace("{type: s3, bucket: backups-eu}", """
    type: s3
    endpoint_url: http://minio.local:9000
    bucket: backups.eu-1
    prefix: zb
    region_name: eu-west-1
    credentials_file: /etc/zfsbackd/eu.ini
    ca_bundle: /etc/ssl/ca.pem
    addressing_style: path
    storage_class: STANDARD_IA
    checksum_mode: when_required""") + """
file_systems:
  - id: fs-home
    source: {path: /srv/home}
    daily_backup_start_time: 23:59
    daily_backup_window_minutes: 1440
    automatic_backup_retention_days: 0
    completion_window_minutes: 10080
    tags: {team: storage, "cost center": "4711"}
    copy_tags_to_backups: yes
    copy_to:
      - {region: eu-west-1, copy_tags: false, retention_days: 3650}
    allow_copy_snapshots: true
    pre_snapshot: "sync && fsfreeze -f /srv/home"
    post_snapshot: [/sbin/fsfreeze, -u, /srv/home]
    hook_timeout_seconds: 1
daemon:
  control_socket: /run/zb.sock
  control_group: zfsbackd
  metrics_listen: "[::1]:0"
  max_parallel_backups: 64
  stop_timeout_seconds: 3600
copies: {max_in_flight_per_region: 1}
garbage_collection: {grace_period_seconds: 0}
""")
    s3 = config.region("eu-west-1")
    assert s3 == S3Region(
        name="eu-west-1", bucket="backups.eu-1", endpoint_url="http://minio.local:9000", prefix="zb/",
        region_name="eu-west-1", credentials_file=Path("/etc/zfsbackd/eu.ini"),
        ca_bundle=Path("/etc/ssl/ca.pem"), addressing_style="path", storage_class="STANDARD_IA",
        checksum_mode="when_required")
    fs = config.file_system("fs-home")
    assert fs.source_path == Path("/srv/home")
    assert fs.source_description == "path /srv/home"
    assert fs.daily_backup_start_time == datetime.time(23, 59)
    assert fs.daily_backup_window_minutes == 1440
    assert fs.automatic_backup_retention_days == 0
    assert fs.completion_window_minutes == 10080
    assert dict(fs.tags) == {"team": "storage", "cost center": "4711"}
    assert fs.copy_tags_to_backups is True
    assert fs.copy_to == (CopyRule("eu-west-1", copy_tags=False, retention_days=3650),)
    assert fs.allow_copy_snapshots is True
    assert fs.pre_snapshot == ("/bin/sh", "-c", "sync && fsfreeze -f /srv/home")
    assert fs.post_snapshot == ("/sbin/fsfreeze", "-u", "/srv/home")
    assert fs.hook_timeout_seconds == 1
    assert config.daemon == DaemonConfig(Path("/run/zb.sock"), "zfsbackd", "[::1]:0", 64, 3600)
    assert config.copies.max_in_flight_per_region == 1
    assert config.garbage_collection.grace_period_seconds == 0


@pytest.mark.parametrize(("written", "expected"), [
    ("2:30", datetime.time(2, 30)),  # unquoted: plain YAML 1.1 would make this the number 150
    ("14:30", datetime.time(14, 30)),  # ... and this 870
    ("02:30", datetime.time(2, 30)),
    ('"02:30"', datetime.time(2, 30)),
    ("'2:05'", datetime.time(2, 5)),
    ("0:00", datetime.time(0, 0)),
    ("12:00", datetime.time(12, 0)),
])
def test_start_time_quoted_or_not(tmp_path: Path, written: str, expected: datetime.time) -> None:
    config = load(tmp_path, BASE + f"file_systems:\n  - id: fs-a\n    source: {{path: /a}}\n"
                                   f"    daily_backup_start_time: {written}\n")
    assert config.file_system("fs-a").daily_backup_start_time == expected


def test_other_numbers_still_load_as_numbers(tmp_path: Path) -> None:
    """Removing base-60 parsing must not change plain ints, hex, floats or timestamps."""
    data = config_module.yaml.load("a: 150\nb: 0x10\nc: 1.5\nd: 2024-01-02\ne: 1_000\n",
                                   Loader=config_module._Loader)
    assert data == {"a": 150, "b": 16, "c": 1.5, "d": datetime.date(2024, 1, 2), "e": 1000}


def test_single_region_is_home_by_default(tmp_path: Path) -> None:
    config = load(tmp_path, "regions:\n  main: {type: local, path: /srv/s}\nencryption: {mode: none}\n")
    assert config.home_region == "main"
    assert config.region().name == "main"


def test_null_means_default(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "daemon:\ncopies:\nfile_systems:\n  - id: fs-a\n    source: {path: /a}\n"
                                   "    automatic_backup_retention_days:\n")
    assert config.daemon == DaemonConfig()
    assert config.file_system("fs-a").automatic_backup_retention_days == 7


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + """
file_systems:
  - &first {id: fs-a, source: {path: /a}, automatic_backup_retention_days: 30}
  - <<: *first
    id: fs-b
""")
    assert config.file_system("fs-b").automatic_backup_retention_days == 30
    assert config.file_system("fs-b").source_path == Path("/a")


def test_config_is_hashable_and_picklable() -> None:
    config = load_config(REPO / "config" / "zfsbackd.example.yaml")
    assert hash(config) == hash(load_config(REPO / "config" / "zfsbackd.example.yaml"))
    assert pickle.loads(pickle.dumps(config)) == config


# --------------------------------------------------------------------------- lookups


def test_file_system_lookup_error_lists_known_ids(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "file_systems:\n  - {id: fs-a, source: {path: /a}}\n"
                                   "  - {id: fs-b, source: {path: /b}}\n")
    with pytest.raises(FileSystemNotFound) as info:
        config.file_system("fs-c")
    assert "known: fs-a, fs-b" in info.value.message
    assert f"add it under file_systems in {tmp_path / 'zfsbackd.yaml'}" in info.value.message


def test_region_lookup(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.region() is config.regions["local"]
    assert config.region("eu-west-1").name == "eu-west-1"
    with pytest.raises(InvalidRegion) as info:
        config.region("us-east-1")
    assert "known regions: local, eu-west-1" in info.value.message


def test_resolve_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZFSBACKD_CONFIG", raising=False)
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/zfsbackd/zfsbackd.yaml")
    monkeypatch.setenv("ZFSBACKD_CONFIG", "/tmp/env.yaml")
    assert resolve_config_path(None) == Path("/tmp/env.yaml")
    assert resolve_config_path("/tmp/cli.yaml") == Path("/tmp/cli.yaml")
    monkeypatch.setenv("ZFSBACKD_CONFIG", "")
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- file-level problems


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.errors == [info.value.errors[0]]
    assert "file not found" in info.value.message
    assert str(tmp_path / "nope.yaml") in info.value.message
    assert info.value.exit_code == 2


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "encryption: {mode: none}\n")

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    # Root reads any file regardless of its mode, so simulate the refusal
    # (tests/test_hostile_input.py also checks it for real, as another user).
    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"state_dir: /var/\xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff at offset 16\)"):
        load_config(path)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (NONE + "daemon:\n  metrics_listen: a\n    bad: 1\n", 4, "mapping values"),
    ("encryption: {mode: none\n", 2, ""),
    ("file_systems:\n- id: fs-a\n  - x\n", 3, ""),
    ("a: 1\na: 2\n", 2, "the key 'a' appears twice in one mapping (first on line 1)"),
    (NONE + "state_dir: /x\x07\n", 2, "U+0007"),
    ("encryption: !!python/object:os.system {}\n", 1, "remove the tag"),
    ("regions:\n\tlocal: {}\n", 2, "indent with spaces"),
])
def test_yaml_errors_give_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    (error,) = problems(tmp_path, text)
    assert error.startswith(f"line {line}, column ")
    assert fragment in error


def test_empty_file_and_wrong_top_level(tmp_path: Path) -> None:
    assert "the file is empty" in problems(tmp_path, "")[0]
    assert "top level: expected a mapping" in problems(tmp_path, "- a\n- b\n")[0]
    assert "top level: expected a mapping" in problems(tmp_path, "just text\n")[0]


def test_parse_config_without_file() -> None:
    config = parse_config({"encryption": {"mode": "none"}})
    assert config.source == "<config>"
    with pytest.raises(ConfigError, match=r"^mine: 1 problem\(s\):\n  - encryption: missing"):
        parse_config({}, "mine")


def test_parse_config_refuses_base60_number_with_recovered_time() -> None:
    data = {"encryption": {"mode": "none"},
            "file_systems": [{"id": "fs-a", "source": {"path": "/a"}, "daily_backup_start_time": 150}]}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    (error,) = info.value.errors
    assert error.startswith("file_systems[0].daily_backup_start_time: expected a time, got the number 150")
    assert 'if you wrote 2:30 without quotes' in error
    assert 'write "02:30"' in error


# --------------------------------------------------------------------------- bad values, one at a time

FS = "file_systems:\n  - id: fs-a\n    source: {path: /a}\n"


@pytest.mark.parametrize(("text", "expected"), [
    # encryption
    ("regions:\n  local: {type: local, path: /s}\n",
     "encryption: missing; set encryption.key_file to a key file (create one with `zfsbackd key generate "
     "--key-file /etc/zfsbackd/store.key`) or write `encryption: {mode: none}` to store backups unencrypted"),
    ("encryption: {}\n", "encryption.key_file: missing"),
    ("encryption: {mode: aes-256-gcm}\n", "encryption.key_file: missing"),
    ("encryption: {mode: none, key_file: /k}\n", "encryption.key_file: set together with `mode: none`"),
    ("encryption: {mode: rot13}\n", "encryption.mode: got the text 'rot13'; use one of: aes-256-gcm, none"),
    ("encryption: {key_file: store.key}\n", "encryption.key_file: 'store.key' is not an absolute path"),
    ("encryption: none\n", "encryption: expected a mapping of keys, got the text 'none'"),
    ("encryption: {key_fle: /k}\n", "encryption.key_fle: unknown key; did you mean `key_file`?"),
    # top level
    (NONE + "statedir: /x\n", "statedir: unknown key; did you mean `state_dir`?"),
    (NONE + "state_dir: relative\n", "state_dir: 'relative' is not an absolute path"),
    (NONE + "home_region: eu\n",
     "home_region: 'eu' is not one of the regions (local (the default local store))"),
    # regions
    (NONE + "regions: {}\n", "regions: is empty; define at least one region"),
    (NONE + "regions: [local]\n", "regions: expected a mapping of region names to regions, got a list"),
    (NONE + "regions:\n  a: {type: local, path: /a}\n  b: {type: local, path: /b}\n",
     "home_region: missing; with more than one region"),
    (BASE.replace("home_region: local", "home_region: moon"),
     "home_region: 'moon' is not one of the regions"),
    (BASE + "regions:\n  x: {type: local, path: /x}\n", "line 6, column 1: the key 'regions' appears twice"),
    (NONE + "regions:\n  Local: {type: local, path: /x}\n",
     "regions.Local: the text 'Local' is not a valid region name"),
    (REGION + "{path: /x}\n", "regions.r.type: missing"),
    (REGION + "{type: nfs, path: /x}\n",
     "regions.r.type: got the text 'nfs'; use one of: local, s3"),
    (REGION + "{type: local}\n", "regions.r.path: missing"),
    (REGION + "{type: local, path: /x, bucket: b}\n",
     "regions.r.bucket: unknown key; known keys: type, path"),
    (REGION + "{type: s3}\n", "regions.r.bucket: missing"),
    (REGION + "{type: s3, bucket: ab}\n", "regions.r.bucket: 'ab' is not a valid"),
    (REGION + "{type: s3, bucket: My_Bucket}\n", "regions.r.bucket:"),
    (REGION + "{type: s3, bucket: a..b}\n", "regions.r.bucket:"),
    (REGION + "{type: s3, bucket: 192.168.1.1}\n", "like an IP address"),
    (REGION + "{type: s3, bucket: xn--abc}\n", "reserves"),
    (REGION + "{type: s3, bucket: bkt, endpoint_url: s3.local}\n",
     "regions.r.endpoint_url: 's3.local' is not an http:// or https:// URL"),
    (REGION + "{type: s3, bucket: bkt, prefix: /zb/}\n",
     "regions.r.prefix: '/zb/' starts with /"),
    (REGION + "{type: s3, bucket: bkt, addressing_style: dns}\n",
     "regions.r.addressing_style: got the text 'dns'; use one of: auto, path, virtual"),
    (REGION + "{type: s3, bucket: bkt, checksum_mode: always}\n",
     "regions.r.checksum_mode: got the text 'always'; use one of: when_supported, when_required"),
    (REGION + "{type: s3, bucket: bkt, credentials_file: eu.ini}\n",
     "regions.r.credentials_file: 'eu.ini' is not an absolute path"),
    (REGION + "{type: s3, bucket: bkt, path: /x}\n",
     "regions.r.path: unknown key"),
    (NONE + "regions:\n  a: {type: local, path: /x}\n  b: {type: local, path: /x}\n"
     "home_region: a\n", "regions.b.path: /x is also the path of region a"),
    # file systems
    (BASE + "file_systems: {id: fs-a}\n", "file_systems: expected a list"),
    (ITEM + "fs-a\n", "file_systems[0]: expected a mapping starting with `id: fs-...`"),
    (ITEM + "source: {path: /a}\n", "file_systems[0].id: missing"),
    (ITEM + "{id: home, source: {path: /a}}\n",
     "file_systems[0].id: 'home' is not a file system id (did you mean fs-home?)"),
    (BASE + FS + "  - {id: fs-a, source: {path: /b}}\n",
     "file_systems[1].id: fs-a is already used by file_systems[0]; give each file system its own id"),
    (BASE + FS + "    sourc: {path: /b}\n",
     "file_systems[0].sourc: unknown key; did you mean `source`? known keys: "
     "id, source, daily_backup_start_time,"),
    (ITEM + "{id: fs-a}\n", "file_systems[0].source: missing"),
    (ITEM + "{id: fs-a, source: /srv/a}\n",
     "file_systems[0].source: expected a mapping, got the text '/srv/a'; write source: {path: /srv/a}"),
    (ITEM + "{id: fs-a, source: tank/a}\n", "write source: {zfs: tank/a}"),
    (ITEM + "{id: fs-a, source: {}}\n", "file_systems[0].source: needs exactly one of path or zfs"),
    (ITEM + "{id: fs-a, source: {path: /a, zfs: tank/a}}\n",
     "file_systems[0].source: has both path and zfs"),
    (ITEM + "{id: fs-a, source: {path: srv/a}}\n",
     "file_systems[0].source.path: 'srv/a' is not an absolute path"),
    (ITEM + "{id: fs-a, source: {path: /a, recursive: true}}\n",
     "file_systems[0].source.recursive: only applies to zfs sources"),
    (ITEM + "{id: fs-a, source: {zfs: /tank/a}}\n",
     "file_systems[0].source.zfs: '/tank/a' starts with /"),
    (ITEM + "{id: fs-a, source: {zfs: tank/a@snap}}\n",
     "file_systems[0].source.zfs: 'tank/a@snap' names a snapshot"),
    (ITEM + "{id: fs-a, source: {zfs: tank//a}}\n", "has an empty component"),
    (ITEM + "{id: fs-a, source: {zfs: tank/a/}}\n", "has an empty component"),
    (ITEM + "{id: fs-a, source: {zfs: tank/a*b}}\n", "has the invalid component 'a*b'"),
    (ITEM + "{id: fs-a, source: {zfs: 1tank/a}}\n", "begins with a letter"),
    (ITEM + "{id: fs-a, source: {zfs: 5}}\n", "source.zfs: expected text, got the number 5"),
    (BASE + FS + "    daily_backup_start_time: '24:00'\n",
     "file_systems[0].daily_backup_start_time: expected a time, got the text '24:00'"),
    (BASE + FS + "    daily_backup_start_time: 2.30\n", "expected a time, got the number 2.3"),
    (BASE + FS + "    daily_backup_start_time: '02:60'\n", "expected a time"),
    (BASE + FS + "    daily_backup_window_minutes: 0\n",
     "file_systems[0].daily_backup_window_minutes: 0 is out of range 1–1440"),
    (BASE + FS + "    automatic_backup_retention_days: 120\n",
     "file_systems[0].automatic_backup_retention_days: 120 is out of range 0–90; use a number of days "
     "from 0 (no automatic backups) to 90"),
    (BASE + FS + "    automatic_backup_retention_days: -1\n", "-1 is out of range"),
    (BASE + FS + "    automatic_backup_retention_days: '7'\n",
     "automatic_backup_retention_days: expected a whole number from 0 to 90, got the text '7'"),
    (BASE + FS + "    automatic_backup_retention_days: true\n", "got the boolean true"),
    (BASE + FS + "    automatic_backup_retention_days: 7.0\n", "got the number 7.0"),
    (BASE + FS + "    completion_window_minutes: 10081\n",
     "completion_window_minutes: 10081 is out of range"),
    (BASE + FS + "    copy_tags_to_backups: 'yes'\n",
     "file_systems[0].copy_tags_to_backups: expected true or false, got the text 'yes'; write true or false"),
    (BASE + FS + "    allow_copy_snapshots: 1\n",
     "allow_copy_snapshots: expected true or false, got the number 1"),
    (BASE + FS + "    tags: [team]\n", "file_systems[0].tags: expected a mapping"),
    (BASE + FS + "    tags: {aws:owner: me}\n",
     "file_systems[0].tags: tag key 'aws:owner' starts with 'aws:'"),
    (BASE + FS + "    tags: {cost: 4711}\n",
     "file_systems[0].tags: the value of tag 'cost' is the number 4711"),
    (BASE + FS + "    tags: {on: x}\n", "file_systems[0].tags: tag key the boolean true is not text"),
    (BASE + FS + "    copy_to: eu-west-1\n", "file_systems[0].copy_to: expected a list"),
    (BASE + FS + "    copy_to: [eu-west-1]\n", "file_systems[0].copy_to[0]: expected a mapping"),
    (BASE + FS + "    copy_to: [{region: mars}]\n",
     "file_systems[0].copy_to[0].region: 'mars' is not one of the regions"),
    (BASE + FS + "    copy_to: [{region: local}]\n",
     "file_systems[0].copy_to[0].region: 'local' is the home region"),
    (BASE + FS + "    copy_to: [{region: eu-west-1}, {region: eu-west-1}]\n",
     "file_systems[0].copy_to[1].region: 'eu-west-1' is already listed in copy_to[0]"),
    (BASE + FS + "    copy_to: [{copy_tags: true}]\n", "file_systems[0].copy_to[0].region: missing"),
    (BASE + FS + "    copy_to: [{region: eu-west-1, retention_days: 0}]\n",
     "file_systems[0].copy_to[0].retention_days: 0 is out of range 1–3650"),
    (BASE + FS + "    copy_to: [{region: eu-west-1, copytags: true}]\n",
     "file_systems[0].copy_to[0].copytags: unknown key; did you mean `copy_tags`?"),
    (BASE + FS + "    pre_snapshot: ''\n", "file_systems[0].pre_snapshot: is empty"),
    (BASE + FS + "    post_snapshot: []\n", "file_systems[0].post_snapshot: is an empty list"),
    (BASE + FS + "    post_snapshot: [/bin/sleep, 5]\n",
     "file_systems[0].post_snapshot: item 1 is the number 5"),
    (BASE + FS + "    pre_snapshot: {cmd: x}\n", "file_systems[0].pre_snapshot: expected text or a list"),
    (BASE + FS + "    hook_timeout_seconds: 0\n", "file_systems[0].hook_timeout_seconds: 0 is out of range"),
    # daemon, copies, garbage collection
    (BASE + "daemon: {metrics_listen: 9810}\n",
     "daemon.metrics_listen: expected host:port, got the number 9810"),
    (BASE + "daemon: {metrics_listen: localhost}\n", "daemon.metrics_listen: 'localhost' has no port"),
    (BASE + "daemon: {metrics_listen: ':9810'}\n", "daemon.metrics_listen: ':9810' has an empty host"),
    (BASE + "daemon: {metrics_listen: 'h:65536'}\n", "the port '65536' is not a number from 0 to 65535"),
    (BASE + "daemon: {metrics_listen: 'h:http'}\n", "the port 'http' is not a number"),
    (BASE + "daemon: {metrics_listen: '::1:9810'}\n", "IPv6 address without brackets"),
    (BASE + "daemon: {metrics_listen: '[nope]:9810'}\n", "'[nope]' is not an IPv6 address"),
    (BASE + "daemon: {control_socket: run/zb.sock}\n",
     "daemon.control_socket: 'run/zb.sock' is not an absolute"),
    (BASE + "daemon: {control_group: 'wheel users'}\n",
     "daemon.control_group: 'wheel users' is not a valid group"),
    (BASE + "daemon: {max_parallel_backups: 65}\n",
     "daemon.max_parallel_backups: 65 is out of range 1–64"),
    (BASE + "daemon: {stop_timeout_seconds: 0}\n", "daemon.stop_timeout_seconds: 0 is out of range"),
    (BASE + "daemon: {metrics: x}\n", "daemon.metrics: unknown key; did you mean `metrics_listen`?"),
    (BASE + "daemon: [x]\n", "daemon: expected a mapping of keys, got a list"),
    (BASE + "copies: {max_in_flight_per_region: 6}\n",
     "copies.max_in_flight_per_region: 6 is out of range 1–5"),
    (BASE + "garbage_collection: {grace_period_seconds: 604801}\n",
     "garbage_collection.grace_period_seconds: 604801 is out of range"),
    (BASE + "yes: 1\n", "top level: a key is the boolean true, not a known key name"),
])
def test_bad_value_is_named_by_key_path(tmp_path: Path, text: str, expected: str) -> None:
    errors = problems(tmp_path, text)
    assert any(expected in error for error in errors), errors


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path) -> None:
    errors = problems(tmp_path, BASE + "copies: {zzz: 1}\n")
    assert errors == ["copies.zzz: unknown key; known keys: max_in_flight_per_region"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
regions:
  local: {type: local, path: relative}
file_systems:
  - id: fs-a
    sourc: {path: /a}
    automatic_backup_retention_days: 120
  - id: fs-b
    source: {zfs: tank/b}
    copy_tags_to_backups: "no"
    copy_to: [{region: nowhere}]
daemon: {max_parallel_backups: 0}
"""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    errors = info.value.errors
    expected = [
        "regions.local.path: 'relative' is not an absolute path",
        "encryption: missing",
        "file_systems[0].sourc: unknown key",
        "file_systems[0].source: missing",
        "file_systems[0].automatic_backup_retention_days: 120 is out of range",
        "file_systems[1].copy_tags_to_backups: expected true or false",
        "file_systems[1].copy_to[0].region: 'nowhere' is not one of the regions",
        "daemon.max_parallel_backups: 0 is out of range",
    ]
    for fragment in expected:
        assert any(error.startswith(fragment) for error in errors), (fragment, errors)
    assert len(errors) == len(expected)
    source = str(tmp_path / "zfsbackd.yaml")
    assert info.value.message.startswith(f"{source}: {len(expected)} problem(s):\n  - ")
    assert info.value.message.count("\n  - ") == len(expected)
