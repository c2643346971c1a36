"""User-facing errors: a code (FSx-style), a message that says what, where and
how to fix it, and the documented process exit code.

Every error that can reach a person goes through :class:`ZfsbackdError` so that
the CLI prints ``{"Error": {"Code": ..., "Message": ...}}`` and exits with the
code listed in the README ("Exit codes").
"""

from __future__ import annotations

# Exit codes (documented in README.md, "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_REQUEST = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_STORE = 5
EXIT_INTEGRITY = 6
EXIT_BACKUP_FAILED = 7
EXIT_INTERRUPTED = 130


class ZfsbackdError(Exception):
    """Base class: ``code`` names the error, ``exit_code`` is what the CLI returns."""

    code = "InternalError"
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"Error": {"Code": self.code, "Message": self.message}}


class BadRequest(ZfsbackdError):
    """An argument is malformed or out of range."""

    code = "BadRequest"
    exit_code = EXIT_BAD_REQUEST


class ConfigError(ZfsbackdError):
    """The configuration file is unreadable or invalid; ``errors`` lists every problem."""

    code = "InvalidConfiguration"
    exit_code = EXIT_BAD_REQUEST

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class KeyFileError(ZfsbackdError):
    """A key file (the store's, or the ZFS key of a dataset a restore creates) is missing, malformed or
    readable by others."""

    code = "InvalidKeyFile"
    exit_code = EXIT_BAD_REQUEST


class StateDirUnusable(ZfsbackdError):
    """``state_dir`` cannot be created, read or written by this process (another user, a read-only
    or full file system): nothing can run without its locks, host id and caches."""

    code = "StateDirectoryUnusable"
    exit_code = EXIT_BAD_REQUEST


class FileSystemNotFound(ZfsbackdError):
    code = "FileSystemNotFound"
    exit_code = EXIT_NOT_FOUND


class BackupNotFound(ZfsbackdError):
    code = "BackupNotFound"
    exit_code = EXIT_NOT_FOUND


class InvalidRegion(ZfsbackdError):
    code = "InvalidRegion"
    exit_code = EXIT_NOT_FOUND


class BackupInProgress(ZfsbackdError):
    """Another backup of the same file system is running (here or in another process)."""

    code = "BackupInProgress"
    exit_code = EXIT_CONFLICT


class StoreBusy(BackupInProgress):
    """The store is in use in a way that excludes the request now: a local store lock that could not
    be taken without waiting, or another host's garbage collection holding the store's GC lease."""

    code = "StoreBusy"


class LeaseLost(ZfsbackdError):
    """This process's store lease lapsed (the store did not take a renewal in time), so garbage
    collection on another host may have treated it as dead: the work is not committed, and resumes."""

    code = "LeaseLost"
    exit_code = EXIT_CONFLICT


class HostConflict(ZfsbackdError):
    """Another live process in the fleet uses this host's id or name on the store."""

    code = "HostConflict"
    exit_code = EXIT_CONFLICT


class BackupBeingCopied(ZfsbackdError):
    code = "BackupBeingCopied"
    exit_code = EXIT_CONFLICT


class SourceBackupUnavailable(ZfsbackdError):
    code = "SourceBackupUnavailable"
    exit_code = EXIT_CONFLICT


class BackupRestoring(ZfsbackdError):
    """The backup is not in a state that can be restored (not AVAILABLE)."""

    code = "BackupNotAvailable"
    exit_code = EXIT_CONFLICT


class SnapshotError(ZfsbackdError):
    """A snapshot could not be taken (unsupported file system, hook failed, …)."""

    code = "SnapshotFailed"
    exit_code = EXIT_BAD_REQUEST


class StoreError(ZfsbackdError):
    """The object store cannot be reached or refused an operation."""

    code = "StoreUnavailable"
    exit_code = EXIT_STORE


class IntegrityError(ZfsbackdError):
    """Stored data failed authentication or its id did not re-hash: never silent wrong data."""

    code = "IntegrityError"
    exit_code = EXIT_INTEGRITY


class DaemonNotRunning(ZfsbackdError):
    code = "DaemonNotRunning"
    exit_code = EXIT_STORE


class RestoreError(ZfsbackdError):
    """A restore was refused (unsafe name, bad target) or failed while writing."""

    code = "RestoreFailed"
    exit_code = EXIT_BAD_REQUEST


class StoreNotInitialized(ZfsbackdError):
    """A region holds no store, and none may be created implicitly.

    Stores are created deliberately (``zfsbackd store init`` or the region's
    ``create_if_missing: true``), so that an unmounted file system or a
    mistyped path never quietly receives backups.
    """

    code = "StoreNotInitialized"
    exit_code = EXIT_NOT_FOUND


class WorkerProcessLost(ZfsbackdError):
    """A process working for a backup died before its part was durable (the OOM killer, a kill by hand).

    The backup fails; the packs the process uploaded are reused by the next attempt.
    """

    code = "WorkerProcessLost"
    exit_code = EXIT_BACKUP_FAILED


class BackupFailed(ZfsbackdError):
    """A backup or copy the daemon ran ended FAILED; ``create-backup``/``copy-backup --wait`` report it.

    The record keeps only the failure's message (its FailureDetails), so the
    code is this one whatever stopped the backup; the error names the backup
    so that a script can look at it (describe-backups) or delete it.
    """

    code = "BackupFailed"
    exit_code = EXIT_BACKUP_FAILED

    def __init__(self, message: str, backup_id: str | None = None, region: str | None = None) -> None:
        super().__init__(message)
        self.backup_id = backup_id
        self.region = region

    def to_dict(self) -> dict[str, dict[str, str]]:
        payload = super().to_dict()
        if self.backup_id:
            payload["Error"]["BackupId"] = self.backup_id
        if self.region:
            payload["Error"]["Region"] = self.region
        return payload


class DaemonBusy(ZfsbackdError):
    """The daemon cannot take the request now (every control connection or backup worker is busy)."""

    code = "DaemonBusy"
    exit_code = EXIT_CONFLICT


class DaemonUnresponsive(ZfsbackdError):
    """A daemon listens on the control socket but did not answer, or answered garbage."""

    code = "DaemonUnresponsive"
    exit_code = EXIT_STORE


#: documented in README.md ("Exit codes"); not a bad request: the same restore works once there is room
EXIT_TARGET_FULL = 8


class RestoreTargetFull(RestoreError):
    """The restore target ran out of space or quota (ENOSPC, EDQUOT): free space and run the restore again.

    A subclass of :class:`RestoreError` (whoever catches restore failures catches it) with
    its own code and exit code, so that a script can tell "make room and retry" apart
    from a request that will never work.
    """

    code = "InsufficientStorage"
    exit_code = EXIT_TARGET_FULL


class IncompatibleParameterError(BadRequest):
    """A client request token was reused with other parameters (FSx's IncompatibleParameterError).

    A subclass of :class:`BadRequest` with the same exit code (2): the request
    can never succeed as written, and scripts that treat every exit 2 as "fix
    the command" stay right; the code tells it apart from a malformed argument.
    """

    code = "IncompatibleParameterError"
