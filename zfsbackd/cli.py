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

from zfsbackd import __version__
from zfsbackd.config import load_config, resolve_config_path
from zfsbackd.daemon.client import DaemonClient, DaemonUnavailable
from zfsbackd.daemon.service import DEFAULT_TICK_SECONDS, Daemon
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
from zfsbackd.store.crypto import generate_key_file
from zfsbackd.validation import parse_tags, validate_file_system_id


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


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if getattr(args, "output", "json") == "table":
        if "Backups" in payload:
            print(
                _table(
                    payload["Backups"],
                    ("BackupId", "FileSystemId", "Type", "Lifecycle", "CreationTime", "SizeInBytes", "Name"),
                )
            )
        elif "Backup" in payload:
            print(
                _table(
                    [payload["Backup"]],
                    ("BackupId", "FileSystemId", "Type", "Lifecycle", "CreationTime", "SizeInBytes"),
                )
            )
        else:
            for key, value in payload.items():
                if isinstance(value, dict):
                    print(
                        _table(
                            [{k: v for k, v in value.items() if not isinstance(v, list | dict)}],
                            list(k for k, v in value.items() if not isinstance(v, list | dict)),
                        )
                    )
                    for k, v in value.items():
                        if isinstance(v, list):
                            print(f"{k}:" + ("".join(f"\n  - {item}" for item in v) if v else " none"))
                else:
                    print(f"{key}: {value}")
        return
    print(json.dumps(payload, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------- commands
def _engine(args: argparse.Namespace) -> Engine:
    return Engine(load_config(resolve_config_path(args.config)))


def _parse_filters(values: Sequence[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for raw in values:
        name, sep, value = raw.partition("=")
        if not sep or not value:
            raise BadRequest(f"--filter {raw!r}: expected NAME=VALUE with NAME one of {', '.join(FILTER_NAMES)}")
        filters.setdefault(name, []).extend(v for v in value.split(",") if v)
    return filters


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
    filters = _parse_filters(args.filter or [])
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
            )
        _emit(args, payload)
        return 0
    page = _engine(args).describe_backups(
        region=args.region,
        backup_ids=args.backup_id or [],
        filters=filters,
        max_results=args.max_results,
        next_token=args.next_token,
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
    return Daemon(resolve_config_path(args.config), tick_seconds=args.tick_seconds).run()


def cmd_restore_backup(args: argparse.Namespace) -> int:
    engine = _engine(args)
    bar = TerminalProgress("restore")
    progress = Progress(on_update=bar)
    try:
        result = engine.restore_backup(
            args.backup_id,
            Path(args.target) if args.target else None,
            target_dataset=args.target_dataset,
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $ZFSBACKD_CONFIG, then /etc/zfsbackd/zfsbackd.yaml)")
    common.add_argument("--output", choices=("json", "table"), default="json", help="output format")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress events to stderr")
    common.add_argument(
        "--no-daemon", action="store_true", help="work in this process even if a daemon runs (reads only are safe)"
    )

    parser = _ArgumentParser(prog="zfsbackd", description="Snapshot backups to object storage.")
    parser.add_argument("--version", action="version", version=f"zfsbackd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create-backup", parents=[common], help="snapshot a file system and back it up now")
    p.add_argument("--file-system-id", required=True)
    p.add_argument("--name")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE")
    p.add_argument("--client-request-token", help="idempotency token: the same token returns the same backup")
    p.add_argument("--wait", action="store_true", help="with a daemon: follow the backup until it finishes")
    p.set_defaults(func=cmd_create_backup)

    p = sub.add_parser("describe-backups", parents=[common], help="list backups")
    p.add_argument("--region")
    p.add_argument("--backup-id", action="append")
    p.add_argument("--filter", action="append", metavar="NAME=VALUE[,VALUE]", help=f"NAME: {', '.join(FILTER_NAMES)}")
    p.add_argument("--max-results", type=_number_at_least(int, 1))
    p.add_argument("--next-token")
    p.set_defaults(func=cmd_describe_backups)

    p = sub.add_parser("delete-backup", parents=[common], help="delete a backup and free its unique data")
    p.add_argument("--backup-id", required=True)
    p.add_argument("--region")
    p.set_defaults(func=cmd_delete_backup)

    p = sub.add_parser("copy-backup", parents=[common], help="copy a backup to another region (only new data travels)")
    p.add_argument("--source-backup-id", required=True)
    p.add_argument("--source-region", help="region of the source backup (default: the home region)")
    p.add_argument("--destination-region", required=True)
    p.add_argument("--copy-tags", action="store_true", help="copy the source backup's tags (merged with --tag)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE")
    p.add_argument("--wait", action="store_true", help="with a daemon: follow the copy until it finishes")
    p.set_defaults(func=cmd_copy_backup)

    p = sub.add_parser("restore-backup", parents=[common], help="restore a backup, whole or selected paths")
    p.add_argument("--backup-id", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="an existing directory; the restore goes into a new subdirectory")
    target.add_argument("--target-dataset", help="a new ZFS dataset POOL/NAME")
    p.add_argument("--path", action="append", help="restore only this path (repeatable)")
    p.add_argument("--region")
    p.set_defaults(func=cmd_restore_backup)

    p = sub.add_parser("check", parents=[common], help="verify the store's structure (and every byte with --read-data)")
    p.add_argument("--region")
    p.add_argument("--read-data", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("gc", parents=[common], help="remove data no backup needs (runs after delete-backup too)")
    p.add_argument("--region")
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
        "--tick-seconds", type=_number_at_least(float, 0.01), default=DEFAULT_TICK_SECONDS, help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    v = config_sub.add_parser("validate", parents=[common], help="check a config file; exit 0 if valid, 2 if not")
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("store", help="store tools")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    i = store_sub.add_parser(
        "init",
        parents=[common],
        help="create the region's store (a local region's directory too); zfsbackd never creates one implicitly",
    )
    i.add_argument("--region", help="the region (default: the home region)")
    i.set_defaults(func=cmd_store_init)

    p = sub.add_parser("key", help="encryption key tools")
    key_sub = p.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    g = key_sub.add_parser("generate", parents=[common], help="write a new random key file (mode 0600)")
    g.add_argument("--key-file", required=True)
    g.set_defaults(func=cmd_key_generate)
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
    try:
        args = build_parser().parse_args(argv)
    except ZfsbackdError as error:  # a wrong argument (_ArgumentParser.error)
        _print_error(error)
        return error.exit_code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
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
