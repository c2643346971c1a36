"""The ``zfs`` / ``zpool`` commands for what libzfs_core does not offer, with strict parsing.

libzfs_core has no listing, no property reads, no mounts and no ``diff``, so
those go through the command line tools, always in their machine-readable
form (``-H``: tab-separated, no header; ``-p``: exact numbers) and in the C
locale (stable error texts). Output is parsed strictly: a line with the wrong
number of fields, a number that is not a number, an unknown change type — any
surprise raises :class:`ZfsCommandError` naming the command, never a guess.

Every failure is a :class:`ZfsCommandError`, a
:class:`~zfsbackd.errors.SnapshotError`, so it reaches the user as a
``SnapshotFailed`` error that says what failed and how to fix it: a missing
dataset (:class:`DatasetMissing`) names the dataset and the config key, a pool
that is not imported (:class:`PoolNotImported`) says ``zpool import POOL``.

Dataset names are ``str`` (ZFS allows only ASCII letters, digits, ``-_.: /@#``
and space in them); paths from ``zfs diff`` are ``bytes``, exactly as on disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from zfsbackd.errors import SnapshotError

BACKUP_ID_PROPERTY = "zfsbackd:backup-id"
"""User property that marks a snapshot as taken by zfsbackd and names its backup."""
SET_HERE = ("local", "received")
"""The sources (``zfs get -s``) of a property set on the file system itself: not inherited, not a default."""

_SOURCE_FIX = "or fix file_systems[].source.zfs in the configuration"

CHANGE_TYPES = frozenset("-+MR")
"""``zfs diff`` change types: removed, added, modified, renamed."""
FILE_TYPES = frozenset("BC/>|@P=F")
"""``zfs diff -F`` file types: block/char device, directory, door, FIFO, symlink, event port, socket, file."""


class ZfsCommandError(SnapshotError):
    """A ``zfs``/``zpool`` command failed or printed output this module does not understand."""

    def __init__(self, message: str, command: list[str], returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stderr = stderr


class ZfsNotInstalled(ZfsCommandError):
    """The ``zfs`` or ``zpool`` program is not on PATH."""


class DatasetMissing(ZfsCommandError):
    """The dataset (or snapshot) a command was about does not exist."""

    def __init__(self, message: str, command: list[str], returncode: int | None, stderr: str, dataset: str) -> None:
        super().__init__(message, command, returncode, stderr)
        self.dataset = dataset


class PoolNotImported(DatasetMissing):
    """The dataset is missing because its pool is not imported (or does not exist)."""

    def __init__(
        self, message: str, command: list[str], returncode: int | None, stderr: str, dataset: str, pool: str
    ) -> None:
        super().__init__(message, command, returncode, stderr, dataset)
        self.pool = pool


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of a dataset from :func:`list_snapshots`."""

    name: str
    """Full name, ``pool/fs@snap``."""
    createtxg: int
    """Transaction group that created it: orders snapshots exactly (``creation`` has 1 s resolution)."""
    guid: int
    creation: int
    """Seconds since the epoch."""
    backup_id: str | None
    """Value of ``zfsbackd:backup-id`` when set on this snapshot itself (not inherited): it is ours."""

    @property
    def snapname(self) -> str:
        """The part after ``@``."""
        return self.name.split("@", 1)[1]


@dataclass(frozen=True)
class DiffEntry:
    """One line of ``zfs diff -FHt``."""

    ctime_ns: int
    """The inode change time ``zfs diff -t`` prints, in nanoseconds since the epoch."""
    change: str
    """``-`` removed, ``+`` added, ``M`` modified, ``R`` renamed."""
    file_type: str
    """One of :data:`FILE_TYPES` (``F`` file, ``/`` directory, ``@`` symlink, ...)."""
    path: bytes
    """Absolute path (under the dataset's mountpoint) as stored on disk, escapes decoded."""
    new_path: bytes | None = None
    """For ``R``: the path after the rename."""
    link_delta: int | None = None
    """For an ``M`` that only reports a link count change (a hard link added or removed): +N / -N."""

    @property
    def in_xattr_dir(self) -> bool:
        """Whether the path runs through ``<xattrdir>``: a directory-based xattr (``xattr=on``) changed.

        ``zfs diff`` reports a changed xattr as ``M`` of the file plus ``+``/``-``/``M``
        entries for ``FILE/<xattrdir>`` and ``FILE/<xattrdir>/NAME``. A real
        directory entry named ``<xattrdir>`` prints the same; when the parent is a
        directory, ``lstat`` it in the snapshot to tell them apart.
        """
        return b"/<xattrdir>/" in self.path + b"/"


# ---------------------------------------------------------------------------
# Running commands


def _fail_text(command: list[str]) -> str:
    return "`" + " ".join(command) + "`"


def _env() -> dict[str, str]:
    """The caller's environment in the C locale, so that error texts can be recognised."""
    return {**os.environ, "LC_ALL": "C"}


def _executable(program: str, command: list[str]) -> str:
    exe = shutil.which(program)
    if exe is None:
        raise ZfsNotInstalled(
            f"cannot run {_fail_text(command)}: the {program} command is not installed (not on PATH); "
            "install zfsutils-linux",
            command,
        )
    return exe


def _run(program: str, args: list[str], dataset: str | None = None) -> bytes:
    """Run ``program args`` in the C locale; return stdout or raise the matching ZfsCommandError."""
    command = [program, *args]
    proc = subprocess.run(
        [_executable(program, command), *args], stdin=subprocess.DEVNULL, capture_output=True, env=_env(), check=False
    )
    if proc.returncode != 0:
        raise _command_error(command, proc.returncode, proc.stderr.decode("utf-8", "replace").strip(), dataset)
    return proc.stdout


def _command_error(command: list[str], returncode: int, stderr: str, dataset: str | None) -> ZfsCommandError:
    """Classify a failed command by its (C locale) error text, adding how to fix it."""
    head = f"{_fail_text(command)} failed (exit status {returncode}): {stderr or 'no error message'}"
    pool_match = re.search(r"no such pool '([^']*)'", stderr)
    missing = "dataset does not exist" in stderr or "parent does not exist" in stderr
    if dataset is not None and (pool_match or missing):
        named = re.search(r"^cannot \w+ '([^']*)'", stderr)
        name = named.group(1) if named else dataset
        pool = pool_match.group(1) if pool_match else re.split(r"[/@#]", name, maxsplit=1)[0]
        if pool_match or not pool_imported(pool):
            fix = f"ZFS pool '{pool}' is not imported: import it with `zpool import {pool}` {_SOURCE_FIX}"
            return PoolNotImported(f"{head}. {fix}", command, returncode, stderr, name, pool)
        if "parent does not exist" in stderr:
            parent = name.rsplit("/", 1)[0]
            fix = f"the parent dataset '{parent}' does not exist: create it (`zfs create -p {parent}`) first"
        elif "@" in name:
            fix = f"ZFS snapshot '{name}' does not exist (destroyed by someone else?)"
        else:
            fix = f"ZFS dataset '{name}' does not exist: create it (`zfs create {name}`) {_SOURCE_FIX}"
        return DatasetMissing(f"{head}. {fix}", command, returncode, stderr, name)
    if "permission denied" in stderr.lower():
        fix = "run zfsbackd as root (or grant the permission with `zfs allow`)"
        return ZfsCommandError(f"{head}. {fix}", command, returncode, stderr)
    return ZfsCommandError(head, command, returncode, stderr)


def _unexpected(command: list[str], what: str, line: bytes | str) -> ZfsCommandError:
    return ZfsCommandError(f"{_fail_text(command)} printed unexpected output ({what}): {line!r}", command)


def _lines(output: bytes) -> list[bytes]:
    """Lines of ``-H`` output: split on ``\\n`` only (str.splitlines would also split on \\x1c etc.)."""
    if not output:
        return []
    if not output.endswith(b"\n"):
        return output.split(b"\n")
    return output[:-1].split(b"\n")


def _text(command: list[str], raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _unexpected(command, "not UTF-8", raw) from None


def _fields(command: list[str], line: bytes, count: int, *, rest_in: int | None = None) -> list[str]:
    """Split one ``-H`` line into exactly ``count`` fields.

    ``rest_in`` names the one field that may itself contain tabs (a user
    property value): the fields before and after it are taken from the ends.
    """
    parts = _text(command, line).split("\t")
    if rest_in is not None and len(parts) > count:
        after = count - rest_in - 1
        parts = [*parts[:rest_in], "\t".join(parts[rest_in : len(parts) - after]), *parts[len(parts) - after :]]
    if len(parts) != count:
        raise _unexpected(command, f"{len(parts)} tab-separated fields instead of {count}", line)
    return parts


def _number(command: list[str], value: str, line: bytes) -> int:
    if not value.isascii() or not value.isdigit():
        raise _unexpected(command, f"{value!r} is not a number", line)
    return int(value)


# ---------------------------------------------------------------------------
# Queries


def pool_imported(pool: str) -> bool:
    """Whether ``pool`` is imported on this host."""
    command = ["zpool", "list", "-H", "-o", "name", pool]
    try:
        out = _run("zpool", command[1:])
    except ZfsCommandError as err:
        if "no such pool" in err.stderr:
            return False
        raise
    names = [_text(command, line) for line in _lines(out)]
    if names != [pool]:
        raise _unexpected(command, f"expected the pool name {pool!r}", out)
    return True


@dataclass(frozen=True)
class MountInfo:
    """Where one file system from :func:`mounts_and_properties` is mounted."""

    name: str
    mountpoint: Path | None
    """None when it is not mounted (or has no mount point)."""


def mounts_and_properties(
    root: str, recursive: bool = True
) -> tuple[list[MountInfo], dict[str, dict[str, tuple[str, str]]]]:
    """Where ``root`` and, when ``recursive``, every file system below it (parents first) is mounted, and
    every property of each, ``(value, source)`` by name (``-p`` form; a source is ``local``, ``received``,
    ``default``, ``inherited from ...``, ``temporary`` or ``-``): one ``zfs get all`` (each ``zfs`` process
    costs its start-up, a few tenths of a second under emulation, on every backup)."""
    args = ["get", "-Hp", *(["-r"] if recursive else []), "-t", "filesystem", "-o", "name,property,value,source"]
    args += ["all", root]
    command = ["zfs", *args]
    props: dict[str, dict[str, tuple[str, str]]] = {}
    for line in _lines(_run("zfs", args, dataset=root)):
        name, prop, value, source = _fields(command, line, 4, rest_in=2)
        if name != root and not name.startswith(root + "/"):
            raise _unexpected(command, f"{name!r} is not {root!r} or below it", line)
        if prop in props.setdefault(name, {}):
            raise _unexpected(command, f"property {prop!r} twice", line)
        props[name][prop] = (value, source)
    if root not in props:
        raise _unexpected(command, f"{root!r} itself is missing", b"")
    mounts = []
    for name, values in props.items():
        mounted, where = values.get("mounted", ("", ""))[0], values.get("mountpoint", ("", ""))[0]
        if mounted not in ("yes", "no"):
            raise _unexpected(command, f"mounted of {name!r} is not yes/no", mounted.encode())
        path: Path | None = None
        if mounted == "yes":
            if where == "legacy":
                path = _legacy_mountpoint(name)
            elif where.startswith("/"):
                path = Path(where)
            else:
                why = f"the mountpoint of mounted {name!r} is not an absolute path"
                raise _unexpected(command, why, where.encode())
        mounts.append(MountInfo(name, path))
    return mounts, props


def set_here(props: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Of ``(value, source)`` properties, those set on the file system itself (locally or received): what
    distinguishes it from a freshly created one, so what a restore must set again."""
    return {prop: value for prop, (value, source) in props.items() if source in SET_HERE}


def list_snapshots(dataset: str) -> list[SnapshotInfo]:
    """The snapshots of ``dataset`` itself (not of its children), oldest first by ``createtxg``.

    Uses ``zfs get`` rather than ``zfs list`` so that the backup id counts only
    when it is set on the snapshot itself: a user property set on the file
    system is inherited by every snapshot, and those are not ours.
    """
    props = ("createtxg", "guid", "creation", BACKUP_ID_PROPERTY)
    args = ["get", "-Hp", "-d", "1", "-t", "snapshot", "-o", "name,property,value,source", ",".join(props), dataset]
    command = ["zfs", *args]
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    for line in _lines(_run("zfs", args, dataset=dataset)):
        name, prop, value, source = _fields(command, line, 4, rest_in=2)
        if not name.startswith(dataset + "@"):
            raise _unexpected(command, f"{name!r} is not a snapshot of {dataset!r}", line)
        if prop not in props or prop in rows.setdefault(name, {}):
            raise _unexpected(command, f"property {prop!r}", line)
        rows[name][prop] = (value, source)
    result = []
    for name, values in rows.items():
        if set(values) != set(props):
            raise _unexpected(command, f"{name!r} lacks {sorted(set(props) - set(values))}", name)
        value, source = values[BACKUP_ID_PROPERTY]
        result.append(
            SnapshotInfo(
                name=name,
                createtxg=_number(command, values["createtxg"][0], name.encode()),
                guid=_number(command, values["guid"][0], name.encode()),
                creation=_number(command, values["creation"][0], name.encode()),
                backup_id=value if source == "local" else None,
            )
        )
    result.sort(key=lambda snap: snap.createtxg)
    return result


def get_properties(
    dataset: str, names: Iterable[str] | None = None, sources: Iterable[str] | None = SET_HERE
) -> dict[str, str]:
    """Properties of ``dataset`` whose source is one of ``sources`` (None: any): name -> value (``-p`` form).

    The default, :data:`SET_HERE`, is what distinguishes a dataset
    from a freshly created one: what a restore must set again.
    """
    args = ["get", "-Hp", "-o", "property,value,source"]
    if sources is not None:
        args += ["-s", ",".join(sources)]
    args += [",".join(names) if names is not None else "all", dataset]
    command = ["zfs", *args]
    result: dict[str, str] = {}
    for line in _lines(_run("zfs", args, dataset=dataset)):
        prop, value, _source = _fields(command, line, 3, rest_in=1)
        if prop in result:
            raise _unexpected(command, f"property {prop!r} twice", line)
        result[prop] = value
    return result


def _single_value(prop: str, dataset: str) -> tuple[str, list[str]]:
    args = ["get", "-Hp", "-o", "value", prop, dataset]
    command = ["zfs", *args]
    lines = _lines(_run("zfs", args, dataset=dataset))
    if len(lines) != 1:
        raise _unexpected(command, f"{len(lines)} lines instead of 1", b"\n".join(lines))
    return _text(command, lines[0]), command


def is_mounted(dataset: str) -> bool:
    """Whether the file system is mounted (False for volumes and snapshots)."""
    value, command = _single_value("mounted", dataset)
    if value not in ("yes", "no", "-"):
        raise _unexpected(command, "mounted is not yes/no", value)
    return value == "yes"


def mountpoint(dataset: str) -> Path | None:
    """Where the file system is mounted or will be mounted; None when it has none.

    For ``mountpoint=legacy`` the answer is where it is mounted now (from
    /proc/self/mountinfo), None when it is not mounted; ``none`` and volumes
    give None.
    """
    value, command = _single_value("mountpoint", dataset)
    if value in ("none", "-"):
        return None
    if value == "legacy":
        return _legacy_mountpoint(dataset)
    if not value.startswith("/"):
        raise _unexpected(command, "mountpoint is not an absolute path", value)
    return Path(value)


def _legacy_mountpoint(dataset: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        fstype, source = fields[sep + 1], fields[sep + 2]
        if fstype == b"zfs" and _unescape_mountinfo(source) == dataset.encode():
            return Path(os.fsdecode(_unescape_mountinfo(fields[4])))
    return None


def _unescape_mountinfo(field: bytes) -> bytes:
    """/proc/self/mountinfo writes space, tab, newline and backslash as 3-digit octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


# ---------------------------------------------------------------------------
# Changes


def _check_property_name(name: str) -> None:
    if not name or "=" in name or any(ch in name for ch in "\t\n\0"):
        raise SnapshotError(f"invalid ZFS property name {name!r}")


def set_user_property(dataset: str, name: str, value: str) -> None:
    """Set a user property (its name must contain ``:``, e.g. ``zfsbackd:backup-id``)."""
    _check_property_name(name)
    if ":" not in name:
        raise SnapshotError(f"{name!r} is not a user property name: user properties contain ':' (module:property)")
    if "\0" in value:
        raise SnapshotError(f"the value for ZFS property {name!r} contains a NUL byte")
    _run("zfs", ["set", f"{name}={value}", dataset], dataset=dataset)


def set_property(dataset: str, name: str, value: str) -> None:
    """``zfs set name=value dataset`` for a native property (e.g. ``readonly``)."""
    _check_property_name(name)
    if "\0" in value:
        raise SnapshotError(f"the value for ZFS property {name!r} contains a NUL byte")
    _run("zfs", ["set", f"{name}={value}", dataset], dataset=dataset)


def rename(dataset: str, new_name: str) -> None:
    """``zfs rename dataset new_name`` (a failed restore's dataset is moved out of the way)."""
    _run("zfs", ["rename", dataset, new_name], dataset=dataset)


def create(dataset: str, props: Mapping[str, str] | None = None) -> None:
    """``zfs create -o k=v ... dataset`` (its parent must exist); mounts it if it has a mountpoint."""
    args = ["create"]
    for name, value in (props or {}).items():
        _check_property_name(name)
        args += ["-o", f"{name}={value}"]
    args.append(dataset)
    _run("zfs", args, dataset=dataset)


# ---------------------------------------------------------------------------
# zfs diff

_DIFF_ESCAPE = re.compile(rb"\\(?:([0-7]{4})|(.{0,4}))", re.DOTALL)
_TIMESTAMP = re.compile(rb" *([0-9]+)\.([0-9]{9})")
_LINK_DELTA = re.compile(rb"\(([+-][0-9]+)\)")


def decode_diff_path(escaped: bytes) -> bytes:
    """Undo ``zfs diff``'s escaping: every byte outside ``!``..``~`` (and ``\\``) is ``\\`` + 4 octal digits.

    OpenZFS on Linux (2.x) always writes four digits (``\\0040`` for a space,
    ``\\0012`` for a newline, ``\\0303`` for a byte of a UTF-8 sequence), so
    the result is the exact name bytes, valid UTF-8 or not. Anything else
    after a backslash is refused rather than guessed at.
    """

    def one(match: re.Match[bytes]) -> bytes:
        digits = match.group(1)
        if digits is None or int(digits, 8) > 0o377:
            raise ValueError(f"bad escape {match.group(0)!r} in zfs diff path {escaped!r}")
        return bytes([int(digits, 8)])

    return _DIFF_ESCAPE.sub(one, escaped)


def parse_diff_line(line: bytes) -> DiffEntry:
    """Parse one line of ``zfs diff -FHt`` output (without its newline); ValueError if malformed.

    Forms: ``ctime<TAB>change<TAB>type<TAB>path``, for renames ``...<TAB>path<TAB>new path``,
    and for a link count change ``ctime<TAB>M<TAB>type<TAB>path<TAB>(+1)``.
    """
    parts = line.split(b"\t")
    if len(parts) not in (4, 5):
        raise ValueError(f"{len(parts)} tab-separated fields instead of 4 or 5")
    stamp = _TIMESTAMP.fullmatch(parts[0])
    if stamp is None:
        raise ValueError(f"timestamp {parts[0]!r} is not seconds.nanoseconds")
    change, file_type = parts[1].decode("ascii", "replace"), parts[2].decode("ascii", "replace")
    if change not in CHANGE_TYPES or len(change) != 1:
        raise ValueError(f"unknown change type {parts[1]!r}")
    if file_type not in FILE_TYPES or len(file_type) != 1:
        raise ValueError(f"unknown file type {parts[2]!r}")
    ctime_ns = int(stamp.group(1)) * 1_000_000_000 + int(stamp.group(2))
    path = decode_diff_path(parts[3])
    if not path.startswith(b"/"):
        raise ValueError(f"path {path!r} is not absolute")
    if len(parts) == 4:
        if change == "R":
            raise ValueError("a rename without its new path")
        return DiffEntry(ctime_ns, change, file_type, path)
    if change == "R":
        new_path = decode_diff_path(parts[4])
        if not new_path.startswith(b"/"):
            raise ValueError(f"new path {new_path!r} is not absolute")
        return DiffEntry(ctime_ns, change, file_type, path, new_path=new_path)
    delta = _LINK_DELTA.fullmatch(parts[4])
    if change != "M" or delta is None:
        raise ValueError(f"unexpected fifth field {parts[4]!r} for change {change!r}")
    return DiffEntry(ctime_ns, change, file_type, path, link_delta=int(delta.group(1)))


class DiffStopped(Exception):
    """:func:`diff` was told to stop before ``zfs diff`` finished; what it yielded is incomplete."""


#: ``zfs diff`` runs this much nicer than the daemon
DIFF_NICENESS = 10
#: how often a diff that prints nothing checks whether it should stop
_DIFF_POLL_SECONDS = 0.2


def diff(snap_a: str, snap_b: str, stop: threading.Event | None = None) -> Iterator[DiffEntry]:
    """What changed from snapshot ``snap_a`` to ``snap_b`` (or to the live file system), as ``zfs diff -FHt``.

    A generator: entries are parsed while ``zfs diff`` still runs, so a diff of
    millions of files needs no memory for all of them. It raises
    :class:`ZfsCommandError` when the command fails or prints a line it cannot
    parse (after the entries before it), and :class:`DiffStopped` soon after
    ``stop`` is set (``zfs diff`` can think for minutes without printing a
    line, so the pipe is polled). Either way, and when the generator is closed
    early, the command is killed.
    """
    args = ["diff", "-FHt", snap_a, snap_b]
    command = ["zfs", *args]
    # stderr goes to a file: a pipe nobody reads while stdout is consumed could fill up and block zfs.
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(
            [_executable("zfs", command), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errfile,
            env=_env(),
        )
        assert proc.stdout is not None
        # It races the metadata walk (PendingChanges): when both want the CPU, the walk goes first.
        with contextlib.suppress(OSError):  # already gone: its output is still read below
            os.setpriority(os.PRIO_PROCESS, proc.pid, DIFF_NICENESS)
        try:
            for line in _output_lines(proc.stdout.fileno(), stop):
                try:
                    yield parse_diff_line(line)
                except ValueError as err:
                    raise _unexpected(command, str(err), line) from None
            if proc.wait() != 0:
                errfile.seek(0)
                stderr = errfile.read().decode("utf-8", "replace").strip()
                raise _command_error(command, proc.returncode, stderr, snap_a)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _output_lines(fd: int, stop: threading.Event | None) -> Iterator[bytes]:
    """The lines read from ``fd`` until end of file (without their newline); DiffStopped once ``stop`` is set."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    pending = b""
    while True:
        if stop is not None and stop.is_set():
            raise DiffStopped()
        if not poller.poll(_DIFF_POLL_SECONDS * 1000):
            continue
        block = os.read(fd, 1 << 16)
        if not block:
            break
        *lines, pending = (pending + block).split(b"\n")
        yield from lines
    if pending:
        yield pending
