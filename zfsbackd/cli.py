"""The ``zfsbackd`` command: FSx-style verbs that print JSON (or a table for people).

Errors print ``{"Error": {"Code", "Message"}}`` on stderr and exit with the
codes in README.md ("Exit codes"). Long operations draw progress on stderr
when it is a terminal and stay quiet when piped.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jmespath
import jmespath.exceptions
import jmespath.parser

from zfsbackd import __version__
from zfsbackd.clidoc import completion_script
from zfsbackd.config import load_config, resolve_config_path
from zfsbackd.daemon.client import DaemonClient, DaemonUnavailable
from zfsbackd.engine.archiver import BackupCancelled
from zfsbackd.engine.engine import FILTER_NAMES, BackupRequest, Engine
from zfsbackd.engine.locks import SlotWaitCancelled
from zfsbackd.engine.progress import Progress
from zfsbackd.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BackupFailed,
    BadRequest,
    ConfigError,
    DaemonNotRunning,
    KeyFileError,
    ZfsbackdError,
)
from zfsbackd.logs import configure_logging
from zfsbackd.output import render
from zfsbackd.runtime import tune_process
from zfsbackd.snapshot.zfs_encryption import KEY_FORMATS, TargetEncryption
from zfsbackd.store.crypto import generate_key_file
from zfsbackd.validation import parse_tags, validate_client_request_token, validate_file_system_id


# ------------------------------------------------------------------ rendering
def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class TerminalProgress:
    """Draws one updating status line on a terminal; does nothing when stderr is piped."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.enabled = sys.stderr.isatty()

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        eta = p.eta_seconds
        eta_text = f" · ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else ""
        pct = f" · {p.percent}%" if p.total_bytes else ""
        done, rate = _human_bytes(p.bytes_done), _human_bytes(p.rate)
        sys.stderr.write(f"\r{self.verb}: {p.files} files · {done} · {rate}/s{pct}{eta_text}\033[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Print a result: ``--query`` (JMESPath) selects from the JSON document, ``--output`` lays it out."""
    query = getattr(args, "query", None)
    data = query.search(payload) if query is not None else payload
    print(render(data, getattr(args, "output", "json")))


# ------------------------------------------------------------------- commands
def _engine(args: argparse.Namespace) -> Engine:
    return Engine(load_config(resolve_config_path(args.config)))


def _parse_filters(values: Sequence[str], aws_style: Sequence[str] = ()) -> dict[str, list[str]]:
    """Merge ``--filter NAME=V1,V2`` and the AWS CLI's ``--filters Name=NAME,Values=V1,V2`` into one mapping."""
    filters: dict[str, list[str]] = {}
    for raw in values:
        name, sep, value = raw.partition("=")
        if not sep or not value:
            raise BadRequest(f"--filter {raw!r}: expected NAME=VALUE with NAME one of {', '.join(FILTER_NAMES)}")
        filters.setdefault(name, []).extend(v for v in value.split(",") if v)
    for raw in aws_style:
        for name, filter_values in _aws_filters(raw):
            filters.setdefault(name, []).extend(filter_values)
    return filters


def _aws_filters(raw: str) -> list[tuple[str, list[str]]]:
    """One ``--filters`` value as (name, values) pairs: the shorthand ``Name=N,Values=A,B`` or the JSON form.

    The JSON form (``[{"Name": …, "Values": […]}]``) is what ``aws … --generate-cli-skeleton``
    and scripts that build filters programmatically produce; the shorthand is what people type.
    """
    usage = f"--filters {raw!r}: expected Name=NAME,Values=VALUE[,VALUE…] with NAME one of {', '.join(FILTER_NAMES)}"
    if raw.lstrip().startswith(("[", "{")):
        try:
            items = json.loads(raw)
        except ValueError:
            raise BadRequest(f"{usage}, or a JSON list of {{\"Name\": …, \"Values\": […]}}") from None
        items = [items] if isinstance(items, dict) else items
        ok = isinstance(items, list) and all(
            isinstance(i, dict)
            and set(i) == {"Name", "Values"}
            and isinstance(i["Name"], str)
            and isinstance(i["Values"], list)
            and all(isinstance(v, str) for v in i["Values"])
            for i in items
        )
        if not ok:
            raise BadRequest(f"{usage}, or a JSON list of {{\"Name\": …, \"Values\": […]}}")
        return [(i["Name"], i["Values"]) for i in items]
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep and key in ("Name", "Values") and key not in fields:
            current = fields[key] = [value] if value else []
        elif current is not None and current is fields.get("Values") and part:
            current.append(part)  # Values=A,B: a comma continues the list
        else:
            raise BadRequest(usage)
    if len(fields.get("Name", [])) != 1 or not fields.get("Values"):
        raise BadRequest(usage)
    return [(fields["Name"][0], fields["Values"])]


def _with_interrupt(fn: Any) -> Any:
    """Run ``fn(cancel)`` so that SIGTERM/SIGINT stop it at a checkpoint instead of mid-write."""
    cancel = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(_signum: int, _frame: object) -> None:
        cancel.set()

    for sig in previous:
        signal.signal(sig, stop)
    try:
        return fn(cancel)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _daemon(args: argparse.Namespace) -> DaemonClient | None:
    """A client of the running daemon, or None (then the command works in-process)."""
    if getattr(args, "no_daemon", False):
        return None
    config = load_config(resolve_config_path(args.config))
    try:
        return DaemonClient(config.daemon.control_socket)
    except DaemonUnavailable:
        return None


def _wait_remote(client: DaemonClient, backup: dict[str, Any]) -> dict[str, Any]:
    """Follow a backup the daemon runs until it leaves CREATING, drawing its progress."""
    bar = TerminalProgress("backup")
    try:
        while backup["Lifecycle"] in ("CREATING", "PENDING", "COPYING"):
            time.sleep(1.0)
            (backup,) = client.call("DescribeBackups", BackupIds=[backup["BackupId"]], Region=backup["Region"])[
                "Backups"
            ]
            if bar.enabled:
                sys.stderr.write(f"\rbackup {backup['BackupId']}: {backup.get('ProgressPercent', 0)}%\033[K")
    finally:
        bar.done()
    return backup


def _remote_backup(args: argparse.Namespace, client: DaemonClient, action: str, **params: Any) -> int:
    """Ask the daemon to create or copy a backup; with --wait, follow it to the end.

    The final record goes to stdout either way (scripts read it); a backup that
    ended FAILED is also an error (BackupFailed, exit 7) naming the backup and
    quoting the reason the daemon recorded, since the record is all we get.
    """
    with client:
        backup = client.call(action, **params)["Backup"]
        if args.wait:
            backup = _wait_remote(client, backup)
    _emit(args, {"Backup": backup})
    if backup["Lifecycle"] == "FAILED":
        reason = backup.get("FailureDetails", {}).get("Message") or "no reason was recorded"
        what = "copy" if action == "CopyBackup" else "backup"
        raise BackupFailed(
            f"{what} {backup['BackupId']} of {backup['FileSystemId']} ended FAILED: {reason}",
            backup["BackupId"],
            backup.get("Region"),
        )
    return 0


def cmd_create_backup(args: argparse.Namespace) -> int:
    validate_file_system_id(args.file_system_id)
    if args.client_request_token is not None:  # before asking the daemon: a typo is refused the same way
        validate_client_request_token(args.client_request_token)
    request = BackupRequest(
        file_system_id=args.file_system_id,
        name=args.name,
        tags=parse_tags(args.tag or []),
        client_request_token=args.client_request_token,
    )
    client = _daemon(args)
    if client is not None:
        return _remote_backup(
            args,
            client,
            "CreateBackup",
            FileSystemId=request.file_system_id,
            Name=request.name,
            Tags=request.tags,
            ClientRequestToken=request.client_request_token,
        )
    engine = _engine(args)
    bar = TerminalProgress("backup")
    progress = Progress(on_update=bar)
    created: list[str] = []
    try:
        record = _with_interrupt(
            lambda cancel: engine.create_backup(
                request, progress=progress, cancel=cancel, on_record=lambda r: created.append(r.backup_id)
            )
        )
    except ZfsbackdError as error:
        # The failure keeps its own code and exit code; once the record exists (now FAILED) the
        # error names it, as the daemon path's BackupFailed does.
        error.backup_id = created[-1] if created else None  # type: ignore[attr-defined]
        raise
    finally:
        bar.done()
    _emit(args, {"Backup": record.to_api()})
    return 0


def cmd_describe_backups(args: argparse.Namespace) -> int:
    filters = _parse_filters(args.filter or [], args.filters or [])
    client = _daemon(args)
    if client is not None:
        with client:
            payload = client.call(
                "DescribeBackups",
                Region=args.region,
                BackupIds=args.backup_id or [],
                Filters=filters,
                MaxResults=args.max_results,
                NextToken=args.next_token,
                AllHosts=args.all_hosts,
            )
        _emit(args, payload)
        return 0
    page = _engine(args).describe_backups(
        region=args.region,
        backup_ids=args.backup_id or [],
        filters=filters,
        max_results=args.max_results,
        next_token=args.next_token,
        all_hosts=args.all_hosts,
    )
    _emit(args, page.to_api())
    return 0


def cmd_delete_backup(args: argparse.Namespace) -> int:
    client = _daemon(args)
    if client is not None:
        with client:
            _emit(args, client.call("DeleteBackup", BackupId=args.backup_id, Region=args.region))
        return 0
    record = _engine(args).delete_backup(args.backup_id, region=args.region)
    _emit(args, {"BackupId": record.backup_id, "Lifecycle": record.lifecycle.value})
    return 0


def cmd_copy_backup(args: argparse.Namespace) -> int:
    tags = parse_tags(args.tag or [])
    client = _daemon(args)
    if client is not None:
        return _remote_backup(
            args,
            client,
            "CopyBackup",
            SourceBackupId=args.source_backup_id,
            SourceRegion=args.source_region,
            DestinationRegion=args.destination_region,
            CopyTags=args.copy_tags,
            Tags=tags,
        )
    engine = _engine(args)
    record = _with_interrupt(
        lambda cancel: engine.copy_backup(
            args.source_backup_id,
            destination_region=args.destination_region,
            source_region=args.source_region,
            copy_tags=args.copy_tags,
            tags=tags,
            cancel=cancel,
        )
    )
    _emit(args, {"Backup": record.to_api()})
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _daemon(args)
    if client is None:
        config = load_config(resolve_config_path(args.config))
        raise DaemonNotRunning(
            f"no zfsbackd daemon listens on {config.daemon.control_socket}; start it with "
            "`systemctl start zfsbackd` (or `zfsbackd daemon`)"
        )
    with client:
        _emit(args, client.call("Status"))
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    configure_logging(stream=sys.stdout, level=logging.INFO)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack to the journal
    # Imported here: the service's scheduler, control server and metrics (asyncio, prometheus_client) are
    # ~30 ms that every one-shot command would pay at start.
    from zfsbackd.daemon.service import DEFAULT_TICK_SECONDS, Daemon

    tick_seconds = DEFAULT_TICK_SECONDS if args.tick_seconds is None else args.tick_seconds
    return Daemon(resolve_config_path(args.config), tick_seconds=tick_seconds).run()


def cmd_restore_backup(args: argparse.Namespace) -> int:
    engine = _engine(args)
    bar = TerminalProgress("restore")
    progress = Progress(on_update=bar)
    try:
        result = engine.restore_backup(
            args.backup_id,
            Path(args.target) if args.target else None,
            target_dataset=args.target_dataset,
            encryption=TargetEncryption(args.encryption_key_location, args.encryption_key_format, args.no_encryption),
            paths=args.path or [],
            region=args.region,
            progress=progress,
        )
    finally:
        bar.done()
    _emit(args, {"Restore": result.to_api()})
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    engine = _engine(args)
    result = engine.check(region=args.region, read_data=args.read_data)
    _emit(args, {"Check": result.to_api()})
    return 6 if result.errors else 0


def cmd_gc(args: argparse.Namespace) -> int:
    engine = _engine(args)
    result = engine.collect_garbage(args.region, grace_seconds=args.grace_period)
    _emit(args, {"GarbageCollection": result.to_api()})
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    config = load_config(path)
    _emit(
        args,
        {
            "Config": {
                "Path": str(path),
                "Valid": True,
                "HomeRegion": config.home_region,
                "Regions": sorted(config.regions),
                "FileSystems": [fs.id for fs in config.file_systems],
            }
        },
    )
    return 0


def cmd_store_init(args: argparse.Namespace) -> int:
    """Create the region's store deliberately (idempotent: an existing store the key opens is reported)."""
    store = _engine(args).init_store(args.region)
    _emit(
        args,
        {
            "Store": {
                "Region": store.region,
                "Location": store.objects.location,
                "StoreId": store.store_id,
                "Created": store.created,
            }
        },
    )
    return 0


def cmd_key_generate(args: argparse.Namespace) -> int:
    if not args.key_file:
        raise BadRequest("--key-file: the path is empty; give the file to create, e.g. /etc/zfsbackd/store.key")
    path = Path(args.key_file)
    try:
        generate_key_file(path)
    except OSError as exc:  # a directory that cannot be created, a read-only or special file system
        raise KeyFileError(
            f"--key-file {path}: cannot create it ({exc.strerror or exc}); choose a path in a writable "
            "directory on a real file system, e.g. /etc/zfsbackd/store.key"
        ) from None
    _emit(args, {"KeyFile": {"Path": str(path), "Mode": "0600"}})
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    """Print a completion script made from the parser itself, so it never lags behind the options."""
    sys.stdout.write(completion_script(build_parser(), args.shell))
    return 0


# --------------------------------------------------------------------- parser
class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises BadRequest instead of printing usage and exiting.

    A wrong argument is a bad request like any other: it gets the same
    ``{"Error": …}`` document on stderr and exit code 2, so scripts need one
    way to read failures. Subcommand parsers are made of this class too.
    """

    def error(self, message: str) -> NoReturn:
        raise BadRequest(f"{self.prog}: {message}; see `{self.prog} --help`")


def _number_at_least(kind: type[int] | type[float], low: float) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` of at least ``low`` (``nan``, ``inf`` and negatives are refused)."""

    def parse(text: str) -> float:
        value = kind(text)  # ValueError: argparse reports "invalid <name> value"
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a number of at least {low:g}, got {text!r}")
        return value

    parse.__name__ = "whole number" if kind is int else "number"
    return parse


#: the AWS CLI's output formats (``--output``)
OUTPUT_FORMATS = ("json", "table", "text")
REGION_HELP = "a region of the config (default: the home region)"
#: what the global options mean when given nowhere (see _global_options)
GLOBAL_DEFAULTS: dict[str, Any] = {
    "config": None,
    "output": "json",
    "query": None,
    "verbose": False,
    "no_daemon": False,
}


def _jmespath(text: str) -> jmespath.parser.ParsedResult:
    """An argparse type: a compiled JMESPath expression, so a typo fails before any work is done."""
    try:
        return jmespath.compile(text)
    except jmespath.exceptions.JMESPathError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JMESPath expression ({first_line}); e.g. --query 'Backups[].BackupId'"
        ) from None


def _global_options() -> argparse.ArgumentParser:
    """The options every command takes, accepted before or after the subcommand (as the AWS CLI's are).

    They are defined on the top parser and on every subcommand parser with the
    default SUPPRESS: a parser then records only what was given to it, so a value
    given before the subcommand is not overwritten by the subcommand parser's
    default, and main() fills in GLOBAL_DEFAULTS for what was given nowhere.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--config", metavar="FILE", help="config file (default: $ZFSBACKD_CONFIG, then /etc/zfsbackd/zfsbackd.yaml)"
    )
    common.add_argument(
        "--output",
        choices=OUTPUT_FORMATS,
        help="json (default), table for people, or text: tab-separated lines for cut and awk",
    )
    common.add_argument(
        "--query", type=_jmespath, metavar="JMESPATH", help="print only what this JMESPath expression selects"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log progress events to stderr")
    common.add_argument(
        "--no-daemon", action="store_true", help="work in this process even if a daemon runs (reads only are safe)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; the man page and the shell completions are generated from it (zfsbackd.clidoc)."""
    common = _global_options()
    parser = _ArgumentParser(
        prog="zfsbackd", description="Snapshot backups to object storage, in the style of FSx.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"zfsbackd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create-backup", parents=[common], help="snapshot a file system and back it up now")
    p.add_argument("--file-system-id", required=True, metavar="FS", help="a file system of the config, e.g. fs-home")
    p.add_argument("--name", help="the backup's name (1-256 letters, digits, spaces and . + - = _ : / @)")
    p.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="a tag (repeatable); replaces the file system's copied tags"
    )
    p.add_argument(
        "--client-request-token",
        metavar="TOKEN",
        help="idempotency token (1-63 of A-Z a-z 0-9 _ . -): the same token and parameters return the same backup",
    )
    p.add_argument("--wait", action="store_true", help="with a daemon: follow the backup until it finishes")
    p.set_defaults(func=cmd_create_backup)

    p = sub.add_parser("describe-backups", parents=[common], help="list backups")
    p.add_argument("--region", help=REGION_HELP)
    p.add_argument("--backup-id", action="append", metavar="ID", help="only this backup (repeatable)")
    p.add_argument("--filter", action="append", metavar="NAME=VALUE[,VALUE]", help=f"NAME: {', '.join(FILTER_NAMES)}")
    p.add_argument(
        "--filters",
        action="extend",
        nargs="+",
        metavar="Name=NAME,Values=VALUE[,VALUE]",
        help="the AWS CLI's form of --filter (also a JSON list of {Name, Values})",
    )
    p.add_argument("--max-results", type=_number_at_least(int, 1), metavar="N", help="at most N backups per page")
    p.add_argument("--next-token", metavar="TOKEN", help="the NextToken of the previous page")
    p.add_argument(
        "--all-hosts",
        action="store_true",
        help="backups of every host sharing the store (default: this host's, see host_name)",
    )
    p.set_defaults(func=cmd_describe_backups)

    p = sub.add_parser("delete-backup", parents=[common], help="delete a backup and free its unique data")
    p.add_argument("--backup-id", required=True, metavar="ID")
    p.add_argument("--region", help=REGION_HELP)
    p.set_defaults(func=cmd_delete_backup)

    p = sub.add_parser("copy-backup", parents=[common], help="copy a backup to another region (only new data travels)")
    p.add_argument("--source-backup-id", required=True, metavar="ID")
    p.add_argument("--source-region", help="region of the source backup (default: the home region)")
    p.add_argument("--destination-region", required=True, metavar="REGION", help="a region of the config")
    p.add_argument("--copy-tags", action="store_true", help="copy the source backup's tags (merged with --tag)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag for the copy (repeatable)")
    p.add_argument("--wait", action="store_true", help="with a daemon: follow the copy until it finishes")
    p.set_defaults(func=cmd_copy_backup)

    p = sub.add_parser("restore-backup", parents=[common], help="restore a backup, whole or selected paths")
    p.add_argument("--backup-id", required=True, metavar="ID")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target", metavar="DIR", help="an existing directory; the restore goes into a new subdirectory"
    )
    target.add_argument("--target-dataset", help="a new ZFS dataset POOL/NAME")
    p.add_argument(
        "--encryption-key-location",
        metavar="file:///PATH",
        help="with --target-dataset: encrypt the new dataset with its own key, read from this file (ZFS "
        "keylocation; the file must exist, mode 0600)",
    )
    p.add_argument(
        "--encryption-key-format",
        choices=KEY_FORMATS,
        help="the key file's format: raw (32 bytes), hex (64 hex digits) or passphrase (8-512 bytes); default: "
        "the backed-up dataset's keyformat",
    )
    p.add_argument(
        "--no-encryption",
        action="store_true",
        help="with --target-dataset: create the new dataset unencrypted, even when the backup's source was encrypted",
    )
    p.add_argument("--path", action="append", help="restore only this path (repeatable)")
    p.add_argument("--region", help=REGION_HELP)
    p.set_defaults(func=cmd_restore_backup)

    p = sub.add_parser("check", parents=[common], help="verify the store's structure (and every byte with --read-data)")
    p.add_argument("--region", help=REGION_HELP)
    p.add_argument("--read-data", action="store_true", help="also decrypt and re-hash every blob")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("gc", parents=[common], help="remove data no backup needs (runs after delete-backup too)")
    p.add_argument("--region", help=REGION_HELP)
    p.add_argument(
        "--grace-period",
        type=_number_at_least(int, 0),
        metavar="SECONDS",
        help="override garbage_collection.grace_period_seconds",
    )
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("status", parents=[common], help="what the daemon is doing")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("daemon", parents=[common], help="run the service (systemd starts it)")
    p.add_argument(
        "--tick-seconds", type=_number_at_least(float, 0.01), default=None, help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("config", parents=[common], help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    v = config_sub.add_parser("validate", parents=[common], help="check a config file; exit 0 if valid, 2 if not")
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("store", parents=[common], help="store tools")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    i = store_sub.add_parser(
        "init",
        parents=[common],
        help="create the region's store (a local region's directory too); zfsbackd never creates one implicitly",
    )
    i.add_argument("--region", help=REGION_HELP)
    i.set_defaults(func=cmd_store_init)

    p = sub.add_parser("key", parents=[common], help="encryption key tools")
    key_sub = p.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    g = key_sub.add_parser("generate", parents=[common], help="write a new random key file (mode 0600)")
    g.add_argument("--key-file", required=True, metavar="PATH", help="the file to create; never overwritten")
    g.set_defaults(func=cmd_key_generate)

    p = sub.add_parser("completion", parents=[common], help="print the bash or zsh completion script")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    p.set_defaults(func=cmd_completion)
    return parser


def _print_error(error: ZfsbackdError) -> None:
    payload = error.to_dict()
    if isinstance(error, ConfigError) and len(error.errors) > 1:
        payload["Error"]["Errors"] = error.errors  # type: ignore[assignment]
    backup_id = getattr(error, "backup_id", None)
    if backup_id:
        payload["Error"].setdefault("BackupId", backup_id)
    _print_error_payload(payload)


def _print_error_payload(payload: dict[str, Any]) -> None:
    """Every error goes out in one shape, so scripts (and tests) find it the same way."""
    print(json.dumps(payload, indent=2, ensure_ascii=False), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    tune_process()
    try:
        args = build_parser().parse_args(argv)
    except ZfsbackdError as error:  # a wrong argument (_ArgumentParser.error)
        _print_error(error)
        return error.exit_code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    configure_logging(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return int(args.func(args))
    except ZfsbackdError as error:
        _print_error(error)
        return error.exit_code
    except (KeyboardInterrupt, BackupCancelled, SlotWaitCancelled):
        _print_error_payload(
            {"Error": {"Code": "Interrupted", "Message": "interrupted; run the command again to resume"}}
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os._exit(0)
    except Exception as error:  # a bug: say so plainly, with what to report
        _print_error_payload(
            {
                "Error": {
                    "Code": "InternalError",
                    "Message": f"{type(error).__name__}: {error}; "
                    "this is a bug in zfsbackd, please report it with the command you ran",
                }
            }
        )
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
