"""Load and validate the zfsbackd YAML configuration into frozen dataclasses.

The configuration is the interface administrators write and scripts generate,
so a bad file must never half-apply: :func:`load_config` either returns a
complete :class:`Config` or raises one :class:`~zfsbackd.errors.ConfigError`
that lists *every* problem, each naming its exact key path (for example
``file_systems[1].copy_to[0].region``) and how to fix it.  A reload with a bad
file therefore keeps the old configuration running (DESIGN.md, invariant 6).

Rules that hold for every key:

* Unknown keys are errors at every level (a misspelt key silently ignored is a
  backup silently not taken); the closest known key is suggested.
* A key written with no value (``null``) means "use the default".
* Booleans must be YAML booleans and numbers must be numbers: ``"yes"`` in
  quotes or ``true`` where a number belongs is refused rather than guessed.
* Paths must be absolute: the daemon's working directory is not the admin's.

The YAML is read with a loader that does not apply YAML 1.1's base-60 rule,
so an unquoted ``daily_backup_start_time: 14:30`` (or ``2:30``) stays text
instead of becoming the number 870 (or 150); duplicate keys in a mapping are refused
with both line numbers instead of keeping the last one silently.

Nothing here touches the disk beyond reading the file itself: key files,
credentials and directories are checked by the modules that use them, so
``zfsbackd config validate`` also works on a machine other than the target.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NoReturn, cast
from urllib.parse import urlsplit

import yaml

from zfsbackd.errors import BadRequest, ConfigError, FileSystemNotFound, InvalidRegion
from zfsbackd.validation import describe_value, show, tag_problems, validate_file_system_id

DEFAULT_CONFIG_PATH = Path("/etc/zfsbackd/zfsbackd.yaml")
CONFIG_ENV_VAR = "ZFSBACKD_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/zfsbackd")
DEFAULT_REGION_NAME = "local"
REGION_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")

AddressingStyle = Literal["auto", "path", "virtual"]
ChecksumMode = Literal["when_supported", "when_required"]
EntryErrorPolicy = Literal["skip", "fail"]

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class LocalRegion:
    """A store in a local directory (single host, tests, or a mounted NAS)."""

    name: str
    path: Path
    #: create a store on first use where none exists (the directory must exist; see README, "Stores")
    create_if_missing: bool = False
    type: Literal["local"] = "local"


@dataclass(frozen=True)
class S3Region:
    """A store in an S3-compatible bucket (AWS, Ceph RGW, MinIO).

    ``prefix`` is empty or ends with ``/`` so that object keys are simply
    ``prefix + key``.  ``checksum_mode`` ``None`` lets the backend decide by
    endpoint, because some S3-compatible servers reject the newer checksums.
    """

    name: str
    bucket: str
    endpoint_url: str | None = None
    prefix: str = ""
    region_name: str | None = None
    credentials_file: Path | None = None
    ca_bundle: Path | None = None
    addressing_style: AddressingStyle = "auto"
    storage_class: str | None = None
    checksum_mode: ChecksumMode | None = None
    #: create a store on first use where none exists (the bucket must exist; see README, "Stores")
    create_if_missing: bool = False
    type: Literal["s3"] = "s3"


Region = LocalRegion | S3Region


@dataclass(frozen=True)
class EncryptionConfig:
    """How packs are sealed; ``key_file`` is only a path here, read and permission-checked elsewhere."""

    mode: Literal["aes-256-gcm", "none"]
    key_file: Path | None


@dataclass(frozen=True)
class CopyRule:
    """Copy every new backup of a file system to another region."""

    region: str
    copy_tags: bool = True
    retention_days: int | None = None  # None: keep the copy until it is deleted


@dataclass(frozen=True)
class FileSystemConfig:
    """One configured file system: exactly one of ``source_path`` and ``source_zfs`` is set.

    ``pre_snapshot``/``post_snapshot`` are argv tuples; a hook written as a
    single string in YAML is stored as ``("/bin/sh", "-c", string)``.
    """

    id: str
    source_path: Path | None
    source_zfs: str | None
    recursive: bool = False
    daily_backup_start_time: datetime.time = datetime.time(2, 30)
    daily_backup_window_minutes: int = 30
    automatic_backup_retention_days: int = 7
    completion_window_minutes: int | None = None
    # Excluded from the hash so that the frozen dataclass stays hashable.
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    copy_tags_to_backups: bool = False
    copy_to: tuple[CopyRule, ...] = ()
    allow_copy_snapshots: bool = False
    pre_snapshot: tuple[str, ...] | None = None
    post_snapshot: tuple[str, ...] | None = None
    hook_timeout_seconds: int = 300
    #: an entry of the source that cannot be read: "skip" it (counted, listed in the backup's
    #: Stats, logged) and back up the rest, or "fail" the backup
    on_entry_error: EntryErrorPolicy = "skip"

    @property
    def source_description(self) -> str:
        """The source as a person would say it, for logs and messages."""
        if self.source_zfs is not None:
            return f"zfs {self.source_zfs}"
        return f"path {self.source_path}"


@dataclass(frozen=True)
class DaemonConfig:
    """Process-wide settings: how the CLI reaches the daemon, where metrics are served, concurrency."""

    control_socket: Path = Path("/run/zfsbackd/control.sock")
    control_group: str | None = None
    metrics_listen: str = "127.0.0.1:9810"
    max_parallel_backups: int = 2
    stop_timeout_seconds: int = 60
    #: days between the daemon's own `check` of every region's store (0 = never; the metrics say when it last ran)
    check_interval_days: int = 0


@dataclass(frozen=True)
class CopiesConfig:
    """Copy slots per destination region (FSx allows at most 5 copies in flight per region)."""

    max_in_flight_per_region: int = 5


@dataclass(frozen=True)
class GarbageCollectionConfig:
    """Unreferenced packs younger than the grace period are kept so a sweep never races a writer."""

    grace_period_seconds: int = 3600
    lease_seconds: int = 300
    """A writer's store lease not renewed for this long is expired: its holder is taken as dead."""
    deleted_records_retention_days: int = 30
    """A DELETED backup's record stays this long (store time since it was deleted), then collection
    removes it: answers about it ("already deleted", a retried client request token) hold that long."""


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``source`` is the file it came from, quoted in errors."""

    state_dir: Path
    host_name: str
    """This host in a store shared by several hosts: every record says which host made it."""
    home_region: str
    regions: Mapping[str, Region] = field(hash=False)
    encryption: EncryptionConfig
    file_systems: tuple[FileSystemConfig, ...]
    daemon: DaemonConfig
    copies: CopiesConfig
    garbage_collection: GarbageCollectionConfig
    source: str

    def file_system(self, fs_id: str) -> FileSystemConfig:
        """Return the configured file system ``fs_id`` or say which ids exist and where to add one."""
        for fs in self.file_systems:
            if fs.id == fs_id:
                return fs
        known = ", ".join(fs.id for fs in self.file_systems) or "none"
        raise FileSystemNotFound(
            f"file system {show(fs_id)} is not configured; known: {known}; "
            f"add it under file_systems in {self.source}"
        )

    def region(self, name: str | None = None) -> Region:
        """Return region ``name``, or the home region when ``name`` is None."""
        key = self.home_region if name is None else name
        try:
            return self.regions[key]
        except KeyError:
            raise InvalidRegion(
                f"region {show(key)} is not configured; known regions: {', '.join(self.regions)}; "
                f"add it under regions in {self.source}"
            ) from None


# --------------------------------------------------------------------------- known keys

_TOP_KEYS = ("state_dir", "host_name", "home_region", "regions", "encryption", "file_systems", "daemon", "copies",
             "garbage_collection")
_LOCAL_KEYS = ("type", "path", "create_if_missing")
_S3_KEYS = ("type", "endpoint_url", "bucket", "prefix", "region_name", "credentials_file", "ca_bundle",
            "addressing_style", "storage_class", "checksum_mode", "create_if_missing")
_ENCRYPTION_KEYS = ("key_file", "mode")
_FILE_SYSTEM_KEYS = ("id", "source", "daily_backup_start_time", "daily_backup_window_minutes",
                     "automatic_backup_retention_days", "completion_window_minutes", "tags",
                     "copy_tags_to_backups", "copy_to", "allow_copy_snapshots", "pre_snapshot",
                     "post_snapshot", "hook_timeout_seconds", "on_entry_error")
_SOURCE_KEYS = ("path", "zfs", "recursive")
_COPY_RULE_KEYS = ("region", "copy_tags", "retention_days")
_DAEMON_KEYS = ("control_socket", "control_group", "metrics_listen", "max_parallel_backups",
                "stop_timeout_seconds", "check_interval_days")
_COPIES_KEYS = ("max_in_flight_per_region",)
_GC_KEYS = ("grace_period_seconds", "lease_seconds", "deleted_records_retention_days")

_ENCRYPTION_MISSING = (
    "missing; set encryption.key_file to a key file (create one with "
    "`zfsbackd key generate --key-file /etc/zfsbackd/store.key`) or write `encryption: {mode: none}` "
    "to store backups unencrypted"
)
_REGION_NAME_RULE = "use 1 to 63 lowercase letters, digits and hyphens, starting with a letter or digit"

# --------------------------------------------------------------------------- YAML loading

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# PyYAML's YAML 1.1 int and float patterns without the base-60 ("sexagesimal") forms.
_NO_SEXAGESIMAL = {
    _INT_TAG: re.compile(
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    _FLOAT_TAG: re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
}


#: Largest config file read. Real ones are a few KiB even with hundreds of file
#: systems; a bigger file is a wrong path (a log, an image) and would only cost memory.
MAX_CONFIG_BYTES = 1024 * 1024
#: Deepest nesting accepted (counting what aliases expand to). A real config
#: nests 5 levels; PyYAML's composer recurses per level, so ``[[[…]]]`` 10,000
#: deep would otherwise end in RecursionError — on SIGHUP, inside the daemon.
MAX_NESTING = 64
#: Most nodes a document may expand to through aliases: ``&a [*a, *a, …]``
#: chains ("billion laughs") stay small as text but blow up for every consumer
#: that walks the values.
MAX_EXPANDED_NODES = 100_000
#: sun_path holds 108 bytes with the terminating NUL; a longer socket path cannot be bound
MAX_SOCKET_PATH_BYTES = 107


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping; its message already says how to fix it."""


class _LimitError(yaml.composer.ComposerError):
    """The document is nested too deeply or its aliases expand too far; the message says how to fix it."""


class _ScalarError(yaml.constructor.ConstructorError):
    """A scalar that matched a type (int, timestamp, ``!!bool``…) but has no value of that type."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand beyond MAX_NESTING levels or MAX_EXPANDED_NODES nodes.

    Aliases share nodes, so the graph is walked once (memoised per node, no
    recursion) while the expanded depth and size are summed; an alias used
    inside its own anchor (``&a [*a]``) is a cycle and has no finite expansion.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_EXPANDED_NODES or depth[key] > MAX_NESTING:
                raise _LimitError(
                    None, None,
                    f"the aliases (*name) in the value starting here expand to more than "
                    f"{MAX_EXPANDED_NODES:,} values or {MAX_NESTING} levels of nesting; write the "
                    "values out instead of nesting aliases in aliases",
                    node.start_mark,
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise _LimitError(
                None, None,
                "this anchor (&name) is used inside its own value through an alias (*name), which never "
                "ends; remove that alias",
                node.start_mark,
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps ``14:30`` as text, refuses duplicate keys and bounds hostile input.

    A duplicate key is nearly always a copy-paste mistake whose first value the
    admin believes is in force; YAML would keep the last one without a word.
    Nesting and alias expansion are bounded (MAX_NESTING, MAX_EXPANDED_NODES)
    and a scalar that cannot be converted to its type is a YAML error with its
    line, so that no file can make loading fail with anything but ConfigError.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # Checked before descending: the composer recurses once per level.
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _LimitError(
                    None, None,
                    f"values are nested more than {MAX_NESTING} levels deep here; a zfsbackd config "
                    "nests about 5 — check for unclosed or repeated [ and {",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            if not isinstance(node, yaml.ScalarNode):
                raise
            kind = node.tag.rsplit(":", 1)[-1]
            raise _ScalarError(
                None, None,
                f"{show(node.value)} is not a valid {kind}; put it in quotes if it is meant as text",
                node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[object, object]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Mark] = {}
            for key_node, _value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                first = seen.setdefault(key_node.value, key_node.start_mark)
                if first is not key_node.start_mark:
                    raise _DuplicateKeyError(
                        None, None,
                        f"the key {key_node.value!r} appears twice in one mapping (first on line "
                        f"{first.line + 1}); keep one of them",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, _NO_SEXAGESIMAL.get(tag, regexp)) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _fail(source: str, problems: Sequence[str]) -> NoReturn:
    """Raise one ConfigError carrying every problem, so a single run shows the admin all of them."""
    lines = "\n".join(f"  - {problem}" for problem in problems)
    raise ConfigError(f"{source}: {len(problems)} problem(s):\n{lines}", list(problems))


def _yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """Describe a YAML error by line and column, the only coordinates an editor understands."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        context = ""
        if exc.context and exc.context_mark is not None:
            context = f" ({exc.context} on line {exc.context_mark.line + 1})"
        if isinstance(exc, _DuplicateKeyError | _LimitError | _ScalarError):
            return f"{where}: {exc.problem}"
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(exc.problem):
            return f"{where}: {exc.problem}{context}; zfsbackd reads plain YAML only, remove the tag"
        if "'\\t'" in str(exc.problem):
            return f"{where}: {exc.problem}{context}; indent with spaces, YAML does not allow tabs"
        return (f"{where}: {exc.problem}{context}; fix the YAML there (check the indentation, and quote "
                "values that contain ': ', ' #' or start with a special character)")
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return (f"line {line}, column {column}: the character U+{exc.character:04X} is not allowed in "
                "YAML; remove it")
    return f"not valid YAML: {exc}"


def resolve_config_path(cli_value: str | None) -> Path:
    """Pick the config file: ``--config``, else ``$ZFSBACKD_CONFIG``, else :data:`DEFAULT_CONFIG_PATH`."""
    if cli_value:
        return Path(cli_value)
    env_value = os.environ.get(CONFIG_ENV_VAR)
    if env_value:
        return Path(env_value)
    return DEFAULT_CONFIG_PATH


def load_config(path: str | Path) -> Config:
    """Read, parse and validate the config file at ``path``; raise ConfigError listing every problem."""
    source = str(path)
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)  # bounded: --config may name a huge file or a device
        if len(raw) > MAX_CONFIG_BYTES:
            _fail(source, [f"larger than {MAX_CONFIG_BYTES // 1024} KiB, which no zfsbackd config is; check "
                           f"that --config or ${CONFIG_ENV_VAR} names the YAML file"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        _fail(source, ["file not found; create it (config/zfsbackd.example.yaml shows every key) or point "
                       f"--config or ${CONFIG_ENV_VAR} at the right file"])
    except IsADirectoryError:
        _fail(source, [f"is a directory; point --config or ${CONFIG_ENV_VAR} at the YAML file inside it"])
    except PermissionError:
        _fail(source, ["permission denied while reading the file; run zfsbackd as root or make the file "
                       "readable by this user (keep it unreadable by others: it names key files)"])
    except UnicodeDecodeError as exc:
        _fail(source, [f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                       "save the file as UTF-8"])
    except OSError as exc:
        _fail(source, [f"cannot read the file: {exc.strerror or exc}; check the path and its directories"])
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        _fail(source, [_yaml_problem(text, exc)])
    return parse_config(data, source)


# --------------------------------------------------------------------------- typed access with problems


def _unknown_key_problem(path: str, key: object, known: Sequence[str]) -> str:
    """Say which key is unknown, suggest the closest known one, and list them all."""
    known_list = f"known keys: {', '.join(known)}"
    if not isinstance(key, str):
        return (f"{path or 'top level'}: a key is {describe_value(key)}, not a known key name (YAML reads "
                f"unquoted yes/no/on/off as booleans and digits as numbers); {known_list}")
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    suggestion = f"did you mean `{close[0]}`? " if close else ""
    return f"{where}: unknown key; {suggestion}{known_list}"


class _Section:
    """One YAML mapping at a known key path.

    The typed getters record a problem and return None when a value is
    missing or wrong, so that parsing carries on and reports every problem in
    one pass; :func:`parse_config` raises once at the end if any were found.
    """

    def __init__(self, data: Mapping[object, object], path: str, known: Sequence[str],
                 problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        for key in data:
            if key not in known or not isinstance(key, str):
                problems.append(_unknown_key_problem(path, key, known))

    def at(self, key: str) -> str:
        """The full key path of ``key``, as it appears in messages."""
        return f"{self.path}.{key}" if self.path else key

    def add(self, key: str, text: str) -> None:
        self.problems.append(f"{self.at(key)}: {text}")

    def raw(self, key: str) -> object:
        """The value of ``key`` as YAML gave it; None when absent or null (both mean "default")."""
        return self.data.get(key)

    def require(self, key: str, hint: str) -> bool:
        """Record a "missing" problem unless ``key`` has a value."""
        if self.raw(key) is None:
            self.add(key, f"missing; {hint}")
            return False
        return True

    def opt_str(self, key: str, hint: str, allow_empty: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(key, f"expected text, got {describe_value(value)}; {hint}")
            return None
        if not value.strip() and not allow_empty:
            self.add(key, f"is empty; {hint}")
            return None
        return value

    def opt_bool(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"yes", "no", "true", "false", "on", "off"}:
            self.add(key, f"expected true or false, got {describe_value(value)}; write true or false "
                          "without quotes")
        else:
            self.add(key, f"expected true or false, got {describe_value(value)}")
        return None

    def opt_int(self, key: str, low: int, high: int, hint: str) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(key, f"expected a whole number from {low} to {high}, got {describe_value(value)}; "
                          f"{hint}")
            return None
        if not low <= value <= high:
            # The en dash matches the documented message format.
            self.add(key, f"{value} is out of range {low}–{high}; {hint}")
            return None
        return value

    def int_(self, key: str, default: int, low: int, high: int, hint: str) -> int:
        value = self.opt_int(key, low, high, hint)
        return default if value is None else value

    def bool_(self, key: str, default: bool) -> bool:
        value = self.opt_bool(key)
        return default if value is None else value

    def opt_path(self, key: str, hint: str) -> Path | None:
        """An absolute path: relative paths would depend on the daemon's working directory."""
        value = self.opt_str(key, hint)
        if value is None:
            return None
        if not value.startswith("/"):
            self.add(key, f"{show(value)} is not an absolute path; {hint}")
            return None
        if "\0" in value:
            self.add(key, f"{show(value)} contains a NUL character; {hint}")
            return None
        return Path(value)

    def opt_choice(self, key: str, choices: Sequence[str], hint: str = "") -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str) or value not in choices:
            suffix = f"; {hint}" if hint else ""
            self.add(key, f"got {describe_value(value)}; use one of: {', '.join(choices)}{suffix}")
            return None
        return value

    def section(self, key: str, known: Sequence[str], example: str) -> _Section:
        """The nested mapping at ``key`` (empty when absent or the wrong type, after recording that)."""
        value = self.raw(key)
        if value is None:
            value = {}
        elif not isinstance(value, Mapping):
            self.add(key, f"expected a mapping of keys, got {describe_value(value)}; for example {example}")
            value = {}
        return _Section(value, self.at(key), known, self.problems)


# --------------------------------------------------------------------------- value rules


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


def _bucket_problem(bucket: str) -> str | None:
    """Apply the S3 bucket naming rules, which every S3-compatible server we target accepts."""
    rule = ("bucket names are 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with "
            "a letter or digit")
    if not _BUCKET_RE.match(bucket):
        return f"{show(bucket)} is not a valid bucket name; {rule}"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return f"{show(bucket)} is not a valid bucket name; dots may not be next to each other or to a hyphen"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        pass
    else:
        return f"{show(bucket)} looks like an IP address, which S3 does not allow as a bucket name"
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        return (f"{show(bucket)} uses a prefix or suffix S3 reserves (xn--, sthree-, -s3alias, --ol-s3); "
                "choose another name")
    return None


_DATASET_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.: -]+\Z")


def _dataset_problem(name: str) -> str | None:
    """Check ZFS dataset name syntax (``pool`` or ``pool/child/...``) before ``zfs`` sees it."""
    if "@" in name or "#" in name:
        return (f"{show(name)} names a snapshot or bookmark; give the dataset name (the part before "
                f"{'@' if '@' in name else '#'})")
    if name.startswith("/"):
        return (f"{show(name)} starts with /, which makes it a path, not a dataset; write the dataset name "
                f"such as {name.strip('/') or 'tank/home'}, or use source: {{path: {name}}} for a directory")
    if len(name) > 255:
        return f"dataset name is {len(name)} characters long; ZFS allows at most 255"
    components = name.split("/")
    if any(not part for part in components):
        return f"{show(name)} has an empty component (a trailing or doubled /); write it as pool/dataset"
    for part in components:
        if part in {".", ".."} or not _DATASET_COMPONENT_RE.match(part):
            return (f"{show(name)} has the invalid component {show(part)}; dataset names use letters, "
                    "digits, _ - . : and spaces, separated by /")
    if not components[0][0].isalpha():
        return f"{show(name)} must start with the pool name, which begins with a letter"
    return None


_TIME_RE = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])\Z")


def _parse_time(section: _Section, key: str) -> datetime.time | None:
    """Parse ``HH:MM`` (UTC).

    Our loader keeps an unquoted 14:30 as text.  A number here means either a
    literal number or data loaded elsewhere with YAML 1.1's base-60 rule; the
    two cannot be told apart, so it is refused with the time it would mean.
    """
    value = section.raw(key)
    if value is None:
        return None
    if isinstance(value, str):
        match = _TIME_RE.match(value.strip())
        if match:
            return datetime.time(int(match.group(1)), int(match.group(2)))
    hint = 'write the time in UTC as "HH:MM" in quotes, from "00:00" to "23:59", e.g. "02:30"'
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 24 * 60:
        hours, minutes = divmod(value, 60)
        hint += (f" (if you wrote {hours}:{minutes:02d} without quotes, YAML 1.1 read it as the base-60 "
                 f'number {value}: write "{hours:02d}:{minutes:02d}")')
    section.add(key, f"expected a time, got {describe_value(value)}; {hint}")
    return None


def _parse_hook(section: _Section, key: str) -> tuple[str, ...] | None:
    """A hook is a shell command line (run with /bin/sh -c) or an argv list (run directly)."""
    value = section.raw(key)
    hint = ("write a shell command as text (run with /bin/sh -c), or a list of arguments such as "
            "[/usr/local/bin/db-freeze, --wait]")
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            section.add(key, f"is empty; {hint}, or remove the key")
            return None
        return ("/bin/sh", "-c", value)
    if isinstance(value, list):
        if not value:
            section.add(key, f"is an empty list; {hint}, or remove the key")
            return None
        bad = [i for i, arg in enumerate(value) if not isinstance(arg, str) or (i == 0 and not arg)]
        if bad:
            section.add(key, f"item {bad[0]} is {describe_value(value[bad[0]])}; every argument must be "
                             "text (quote numbers) and the program must not be empty")
            return None
        return tuple(value)
    section.add(key, f"expected text or a list, got {describe_value(value)}; {hint}")
    return None


def _parse_listen(section: _Section, key: str) -> str | None:
    """``host:port`` or ``[v6-address]:port``; port 0 asks the kernel for a free port (tests)."""
    value = section.raw(key)
    example = "write host:port, e.g. 127.0.0.1:9810, [::1]:9810 or 0.0.0.0:9810 for every address"
    if value is None:
        return None
    if not isinstance(value, str):
        section.add(key, f"expected host:port, got {describe_value(value)}; {example}")
        return None
    host, sep, port = value.rpartition(":")
    problem = None
    if not sep:
        problem = f"{show(value)} has no port"
    elif not host:
        problem = f"{show(value)} has an empty host"
    elif host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            problem = f"{show(host)} is not an IPv6 address"
    elif ":" in host:
        problem = f"{show(value)} has an IPv6 address without brackets"
    if problem is None and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        problem = f"the port {show(port)} is not a number from 0 to 65535"
    if problem:
        section.add(key, f"{problem}; {example}")
        return None
    return value


_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")


# --------------------------------------------------------------------------- sections


def _parse_regions(top: _Section, state_dir: Path) -> tuple[dict[str, Region], list[str], bool]:
    """Return the valid regions, every region name written (for membership checks), and whether defaulted.

    The names written include invalid ones so that a single bad region does
    not also produce "not in regions" noise everywhere it is referenced.
    """
    raw = top.raw("regions")
    if raw is None:
        default = LocalRegion(DEFAULT_REGION_NAME, state_dir / "store")
        return {default.name: default}, [default.name], True
    fix = f"define at least one region, or remove the key to use a local store at {state_dir / 'store'}"
    if not isinstance(raw, Mapping):
        top.add("regions", f"expected a mapping of region names to regions, got {describe_value(raw)}; {fix}")
        return {}, [], False
    if not raw:
        top.add("regions", f"is empty; {fix}")
        return {}, [], False
    regions: dict[str, Region] = {}
    names = [str(name) for name in raw]
    local_paths: dict[Path, str] = {}
    for name, body in raw.items():
        path = f"regions.{name}"
        if not isinstance(name, str) or not REGION_NAME_RE.match(name):
            top.problems.append(f"{path}: {describe_value(name)} is not a valid region name; "
                                f"{_REGION_NAME_RULE}, e.g. eu-west-1")
        if not isinstance(body, Mapping):
            top.problems.append(f"{path}: expected a mapping with type: local or type: s3, got "
                                f"{describe_value(body)}")
            continue
        kind = body.get("type")
        known = {"local": _LOCAL_KEYS, "s3": _S3_KEYS}.get(kind if isinstance(kind, str) else "",
                                                            tuple(dict.fromkeys(_LOCAL_KEYS + _S3_KEYS)))
        section = _Section(body, path, known, top.problems)
        if section.require("type", "set type: local (a directory) or type: s3 (an S3-compatible bucket)"):
            section.opt_choice("type", ("local", "s3"), "local is a directory, s3 an S3-compatible bucket")
        # Validated for every type (also an unknown one), so that all problems show at once.
        create_if_missing = section.bool_("create_if_missing", False)
        if kind == "local":
            local_hint = f"give the store directory as an absolute path, e.g. {state_dir / 'store'}"
            section.require("path", local_hint)
            store_path = section.opt_path("path", local_hint)
            if store_path is not None:
                other = local_paths.setdefault(store_path, str(name))
                if other != name:
                    section.add("path", f"{store_path} is also the path of region {other}; each region "
                                        "needs its own directory")
                regions[str(name)] = LocalRegion(str(name), store_path, create_if_missing=create_if_missing)
        elif kind == "s3":
            region = _parse_s3(section, str(name))
            if region is not None:
                regions[str(name)] = replace(region, create_if_missing=create_if_missing)
    return regions, names, False


def _parse_s3(section: _Section, name: str) -> S3Region | None:
    """Check an s3 region; nothing is contacted here, so validation works offline."""
    bucket_hint = "give the bucket name, e.g. bucket: backups-eu"
    section.require("bucket", bucket_hint)
    bucket = section.opt_str("bucket", bucket_hint)
    if bucket is not None:
        problem = _bucket_problem(bucket)
        if problem:
            section.add("bucket", problem)
            bucket = None
    endpoint_hint = "give the endpoint URL, e.g. https://s3.example.internal, or remove it to use AWS"
    endpoint_url = section.opt_str("endpoint_url", endpoint_hint)
    if endpoint_url is not None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            section.add("endpoint_url", f"{show(endpoint_url)} is not an http:// or https:// URL; "
                                        f"{endpoint_hint}")
            endpoint_url = None
    prefix = section.opt_str("prefix", "give a key prefix such as zfsbackd/, or remove it",
                             allow_empty=True) or ""
    if prefix.startswith("/"):
        section.add("prefix", f"{show(prefix)} starts with /; object keys have no leading slash, write "
                              f"{show(prefix.lstrip('/'))}")
    elif prefix and not prefix.endswith("/"):
        prefix += "/"
    region_name = section.opt_str("region_name", "give the signing region, e.g. us-east-1, or remove it")
    credentials_file = section.opt_path(
        "credentials_file", "give the absolute path of an AWS-style credentials file, or remove it to use "
                            "the standard AWS credential chain")
    ca_bundle = section.opt_path("ca_bundle", "give the absolute path of a PEM CA bundle, or remove it")
    addressing_style = section.opt_choice("addressing_style", ("auto", "path", "virtual"),
                                          "most Ceph and MinIO servers need path") or "auto"
    storage_class = section.opt_str("storage_class", "give a storage class such as STANDARD, or remove it")
    checksum_mode = section.opt_choice(
        "checksum_mode", ("when_supported", "when_required"),
        "or remove it to let zfsbackd decide by endpoint (use when_required for servers that reject "
        "newer checksums)")
    if bucket is None:
        return None
    return S3Region(name=name, bucket=bucket, endpoint_url=endpoint_url, prefix=prefix,
                    region_name=region_name, credentials_file=credentials_file, ca_bundle=ca_bundle,
                    addressing_style=cast(AddressingStyle, addressing_style), storage_class=storage_class,
                    checksum_mode=cast(ChecksumMode | None, checksum_mode))


def _parse_home_region(top: _Section, names: list[str], defaulted: bool) -> str:
    """The home region defaults to the only region; with several it must be named."""
    home = top.opt_str("home_region", f"name the region that receives backups; {_REGION_NAME_RULE}")
    if home is None:
        if top.raw("home_region") is None and len(names) > 1:
            top.add("home_region", "missing; with more than one region, name the one that receives "
                                   f"automatic and user backups, e.g. home_region: {names[0]} "
                                   f"(regions: {', '.join(names)})")
        return names[0] if len(names) == 1 else DEFAULT_REGION_NAME
    if names and home not in names:
        where = f"{DEFAULT_REGION_NAME} (the default local store)" if defaulted else ", ".join(names)
        top.add("home_region", f"{show(home)} is not one of the regions ({where}); set it to one of them or "
                               "add it under regions")
    return home


def _parse_encryption(top: _Section) -> EncryptionConfig:
    """Encryption must be chosen explicitly: silently storing plaintext is not a safe default."""
    raw = top.raw("encryption")
    if raw is None:
        top.add("encryption", _ENCRYPTION_MISSING)
        return EncryptionConfig("none", None)
    section = top.section("encryption", _ENCRYPTION_KEYS,
                          "encryption: {key_file: /etc/zfsbackd/store.key} or encryption: {mode: none}")
    mode = section.opt_choice("mode", ("aes-256-gcm", "none"),
                              "aes-256-gcm needs key_file; none stores backups unencrypted")
    key_file = section.opt_path("key_file", "give the absolute path of the key file, e.g. "
                                            "/etc/zfsbackd/store.key")
    has_key_file = section.raw("key_file") is not None
    if mode == "none":
        if has_key_file:
            section.add("key_file", "set together with `mode: none`; remove key_file to store backups "
                                    "unencrypted, or remove `mode: none` to encrypt with this key")
        return EncryptionConfig("none", None)
    if isinstance(raw, Mapping) and not has_key_file and (mode or section.raw("mode") is None):
        section.add("key_file", "missing; set it to a key file (create one with `zfsbackd key generate "
                                "--key-file /etc/zfsbackd/store.key`), or write `mode: none` to store "
                                "backups unencrypted")
    return EncryptionConfig("aes-256-gcm", key_file)


def _parse_source(fs: _Section) -> tuple[Path | None, str | None, bool]:
    hint = ("set source: {zfs: pool/dataset} for a ZFS dataset, or source: {path: /absolute/dir} for a "
            "directory on btrfs or XFS")
    raw = fs.raw("source")
    if raw is None:
        fs.add("source", f"missing; {hint}")
        return None, None, False
    if isinstance(raw, str):
        fix = f"source: {{path: {raw}}}" if raw.startswith("/") else f"source: {{zfs: {raw}}}"
        fs.add("source", f"expected a mapping, got {describe_value(raw)}; write {fix}")
        return None, None, False
    source = fs.section("source", _SOURCE_KEYS, "source: {zfs: tank/home}")
    has_path = source.raw("path") is not None
    has_zfs = source.raw("zfs") is not None
    if has_path and has_zfs:
        fs.add("source", "has both path and zfs; keep exactly one of them")
    elif not has_path and not has_zfs and isinstance(raw, Mapping):
        fs.add("source", f"needs exactly one of path or zfs; {hint}")
    path = source.opt_path("path", "give the directory as an absolute path, e.g. /srv/home")
    zfs = source.opt_str("zfs", "give the dataset name, e.g. tank/home")
    if zfs is not None:
        problem = _dataset_problem(zfs)
        if problem:
            source.add("zfs", problem)
            zfs = None
    recursive = source.opt_bool("recursive")
    if recursive is not None and not has_zfs:
        source.add("recursive", "only applies to zfs sources (it includes child datasets); remove it")
    return path, zfs, bool(recursive)


def _parse_copy_to(fs: _Section, names: list[str], home: str) -> tuple[CopyRule, ...]:
    """Copy rules may only name other existing regions, each once: a copy to home would duplicate data."""
    raw = fs.raw("copy_to")
    example = "copy_to: [{region: eu-west-1}]"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        fs.add("copy_to", f"expected a list of copy rules, got {describe_value(raw)}; e.g. {example}")
        return ()
    rules: list[CopyRule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = fs.at(f"copy_to[{i}]")
        if isinstance(item, str):
            fs.problems.append(f"{path}: expected a mapping, got {describe_value(item)}; write "
                               f"- region: {item}")
            continue
        if not isinstance(item, Mapping):
            fs.problems.append(f"{path}: expected a mapping, got {describe_value(item)}; e.g. {example}")
            continue
        rule = _Section(item, path, _COPY_RULE_KEYS, fs.problems)
        others = ", ".join(name for name in names if name != home) or "none defined yet"
        hint = f"name a region other than the home region ({others})"
        rule.require("region", hint)
        region = rule.opt_str("region", hint)
        if region is not None:
            if region not in names:
                rule.add("region", f"{show(region)} is not one of the regions; {hint}, or add it under "
                                   "regions")
            elif region == home:
                rule.add("region", f"{show(region)} is the home region, where backups are made already; "
                                   "copy to another region")
            elif region in seen:
                rule.add("region", f"{show(region)} is already listed in copy_to[{seen[region]}]; list each "
                                   "region once")
            seen.setdefault(region, i)
        copy_tags = rule.bool_("copy_tags", True)
        retention = rule.opt_int("retention_days", 1, 3650, "use a number of days from 1 to 3650, or remove "
                                                            "it to keep copies until they are deleted")
        rules.append(CopyRule(region or "", copy_tags, retention))
    return tuple(rules)


def _parse_tags(fs: _Section) -> dict[str, str]:
    """File system tags follow the same rules as --tag (zfsbackd.validation), reported by key path."""
    raw = fs.raw("tags")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        fs.add("tags", f"expected a mapping of tag keys to values, got {describe_value(raw)}; e.g. "
                       "tags: {team: storage}")
        return {}
    fs.problems.extend(tag_problems(raw, fs.at("tags")))
    return {str(key): str(value) for key, value in raw.items()}


def _parse_file_system(item: object, path: str, names: list[str], home: str,
                       problems: list[str]) -> FileSystemConfig | None:
    """Parse one ``file_systems`` entry; invalid values fall back to defaults so checking can go on."""
    if not isinstance(item, Mapping):
        problems.append(f"{path}: expected a mapping starting with `id: fs-...`, got {describe_value(item)}")
        return None
    fs = _Section(item, path, _FILE_SYSTEM_KEYS, problems)
    fs_id = ""
    if fs.require("id", "give the file system an id such as fs-home"):
        try:
            fs_id = validate_file_system_id(item["id"], fs.at("id"))
        except BadRequest as exc:
            problems.append(exc.message)
    source_path, source_zfs, recursive = _parse_source(fs)
    start = _parse_time(fs, "daily_backup_start_time")
    return FileSystemConfig(
        id=fs_id,
        source_path=source_path,
        source_zfs=source_zfs,
        recursive=recursive,
        daily_backup_start_time=start if start is not None else datetime.time(2, 30),
        daily_backup_window_minutes=fs.int_("daily_backup_window_minutes", 30, 1, 1440,
                                            "use a number of minutes from 1 to 1440 (a whole day)"),
        automatic_backup_retention_days=fs.int_(
            "automatic_backup_retention_days", 7, 0, 90,
            "use a number of days from 0 (no automatic backups) to 90"),
        completion_window_minutes=fs.opt_int(
            "completion_window_minutes", 1, 10080,
            "use a number of minutes from 1 to 10080 (7 days), or remove it for no limit"),
        tags=_parse_tags(fs),
        copy_tags_to_backups=fs.bool_("copy_tags_to_backups", False),
        copy_to=_parse_copy_to(fs, names, home),
        allow_copy_snapshots=fs.bool_("allow_copy_snapshots", False),
        pre_snapshot=_parse_hook(fs, "pre_snapshot"),
        post_snapshot=_parse_hook(fs, "post_snapshot"),
        hook_timeout_seconds=fs.int_("hook_timeout_seconds", 300, 1, 86400,
                                     "use a number of seconds from 1 to 86400 (a day)"),
        on_entry_error=cast(EntryErrorPolicy, fs.opt_choice(
            "on_entry_error", ("skip", "fail"),
            "skip backs up everything readable and lists what was not; fail fails the backup instead",
        ) or "skip"),
    )


def _parse_file_systems(top: _Section, names: list[str], home: str) -> tuple[FileSystemConfig, ...]:
    """Parse the list; ids must be unique because every command and metric is keyed by them."""
    raw = top.raw("file_systems")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        top.add("file_systems", f"expected a list (each item starting with `- id: fs-...`), got "
                                f"{describe_value(raw)}")
        return ()
    result: list[FileSystemConfig] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(raw):
        fs = _parse_file_system(item, f"file_systems[{i}]", names, home, top.problems)
        if fs is None:
            continue
        if fs.id and first_index.setdefault(fs.id, i) != i:
            top.problems.append(f"file_systems[{i}].id: {fs.id} is already used by "
                                f"file_systems[{first_index[fs.id]}]; give each file system its own id")
        result.append(fs)
    return tuple(result)


def _parse_daemon(top: _Section) -> DaemonConfig:
    """Parse ``daemon``; the group is not looked up, so the file validates on another host."""
    daemon = top.section("daemon", _DAEMON_KEYS, "daemon: {metrics_listen: 127.0.0.1:9810}")
    default = DaemonConfig()
    group_hint = "give a group name such as zfsbackd, or remove it so only root may use the socket"
    group = daemon.opt_str("control_group", group_hint)
    if group is not None and not _GROUP_RE.match(group):
        daemon.add("control_group", f"{show(group)} is not a valid group name; {group_hint}")
        group = None
    socket = daemon.opt_path("control_socket", f"give an absolute path, e.g. {default.control_socket}")
    if socket is not None and len(os.fsencode(socket)) > MAX_SOCKET_PATH_BYTES:
        daemon.add("control_socket", f"{show(str(socket))} is {len(os.fsencode(socket))} bytes long, but a Unix "
                                     f"socket path can have at most {MAX_SOCKET_PATH_BYTES}; choose a shorter path")
    return DaemonConfig(
        control_socket=socket or default.control_socket,
        control_group=group,
        metrics_listen=_parse_listen(daemon, "metrics_listen") or default.metrics_listen,
        max_parallel_backups=daemon.int_("max_parallel_backups", default.max_parallel_backups, 1, 64,
                                         "use a number of backups from 1 to 64"),
        stop_timeout_seconds=daemon.int_("stop_timeout_seconds", default.stop_timeout_seconds, 1, 3600,
                                         "use a number of seconds from 1 to 3600"),
        check_interval_days=daemon.int_("check_interval_days", default.check_interval_days, 0, 365,
                                        "use a number of days from 1 to 365, or 0 for no scheduled check"),
    )


def _parse_host_name(top: _Section) -> str:
    """``host_name``, default the system's host name (its first label, as `hostname -s` shows it)."""
    hint = "give 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit, e.g. db-01"
    name = top.opt_str("host_name", hint)
    if name is None:
        return default_host_name()
    if not HOST_NAME_RE.match(name):
        top.add("host_name", f"{show(name)} is not a valid host name; {hint}")
        return default_host_name()
    return name


def default_host_name() -> str:
    """The system's host name, cut to what ``host_name`` allows (a record must always name its host)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63].lstrip("._-")
    return name or "localhost"


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate an already-loaded YAML object; raise ConfigError listing every problem."""
    if data is None:
        _fail(source, ["the file is empty; at least `encryption` must be set (config/zfsbackd.example.yaml "
                       "shows every key)"])
    if not isinstance(data, Mapping):
        _fail(source, [f"top level: expected a mapping of keys ({', '.join(_TOP_KEYS)}), got "
                       f"{describe_value(data)}"])
    problems: list[str] = []
    top = _Section(data, "", _TOP_KEYS, problems)
    state_dir = top.opt_path("state_dir", f"give an absolute directory, e.g. {DEFAULT_STATE_DIR}") \
        or DEFAULT_STATE_DIR
    host_name = _parse_host_name(top)
    regions, names, defaulted = _parse_regions(top, state_dir)
    home = _parse_home_region(top, names, defaulted)
    encryption = _parse_encryption(top)
    file_systems = _parse_file_systems(top, names, home)
    daemon = _parse_daemon(top)
    copies = top.section("copies", _COPIES_KEYS, "copies: {max_in_flight_per_region: 5}")
    gc = top.section(
        "garbage_collection", _GC_KEYS, "garbage_collection: {grace_period_seconds: 3600, lease_seconds: 300}"
    )
    config = Config(
        state_dir=state_dir,
        host_name=host_name,
        home_region=home,
        regions=regions,
        encryption=encryption,
        file_systems=file_systems,
        daemon=daemon,
        copies=CopiesConfig(copies.int_(
            "max_in_flight_per_region", 5, 1, 5,
            "use 1 to 5; further copies to a region wait as PENDING")),
        garbage_collection=GarbageCollectionConfig(
            gc.int_("grace_period_seconds", 3600, 0, 604800,
                    "use a number of seconds from 0 to 604800 (7 days), longer than the longest backup or copy"),
            gc.int_("lease_seconds", 300, 3, 3600,
                    "use 3 to 3600 seconds: how long a crashed host's lease holds back garbage collection"),
            gc.int_("deleted_records_retention_days", 30, 1, 3650,
                    "use 1 to 3650 days: how long the record of a deleted backup is kept before collection "
                    "removes it")),
        source=source,
    )
    if problems:
        _fail(source, problems)
    return config
